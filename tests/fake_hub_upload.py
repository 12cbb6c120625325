"""The stand-in Hub of `fake_hub.py` with the endpoints huggingface_hub's upload API calls, for publishing tests:

- `GET /api/whoami-v2` (the token and its role; tokens are given as `{token: "write" | "read"}`),
- `POST /api/repos/create` (409 with the URL when it exists; a new repository holds `.gitattributes`),
- `POST /api/models/{repo}/branch/{branch}`, `GET /api/models/{repo}[/revision/{rev}]` (head commit, files),
- `GET /api/models/{repo}/tree/{rev}` (recursive listing, with `lfs` {oid (sha256), size} for LFS files),
- `POST /api/models/{repo}/preupload/{rev}` (upload mode: `lfs` for weights and files over 10 MB; `lfs_suffixes`
  names what a weight is, `()` for a repository whose `.gitattributes` keeps small weights in git; `preuploaded`
  lists every path asked about, once per request),
- `POST /{repo}.git/info/lfs/objects/batch` (an upload action only for objects the store lacks),
- `PUT /lfs-upload/{oid}` (the sha256 and size checked while reading; `upload_rate` bytes/s caps all uploads
  together),
  `POST /lfs-verify/{oid}`, `POST /api/validate-yaml`,
- `POST /api/models/{repo}/commit/{rev}` (ndjson; every `lfsFile` must name a stored object of its size; a
  `parentCommit` other than the branch's head is refused with 412).

LFS objects are kept as sha256 -> size only (the bytes are hashed as they arrive, then dropped), so the bench
can push gigabytes through it. Faults: `drop_puts` drops that many upload connections of the first object
uploaded half-way (its later tries, and other objects, go through);
`hold_after` (with `held`, an Event) blocks every upload after that many stored objects until `release` is set,
then drops it unless `abandon_held` is False (a killed client's upload);
`quota` (bytes) makes the batch endpoint answer a quota error past it; `fail_commit` is a status the commit
endpoint answers with. `check_sha=False` (for the bench) takes each upload's bytes without hashing them.
`stored` lists the oids stored, in order; `commits` every commit made.

The Xet path (hf_xet's CAS protocol) is not served: tests run the LFS path with HF_HUB_DISABLE_XET=1.
"""

import base64
import hashlib
import json
import re
import threading
import time
from pathlib import Path

from .fake_hub import FakeHub

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_LFS = (".safetensors", ".bin", ".pth", ".pt", ".gguf")


class UploadHub(FakeHub):
    def __init__(self, tokens: dict | None = None, upload_rate: float | None = None, drop_puts: int = 0,
                 hold_after: int | None = None, quota: int | None = None, fail_commit: int | None = None,
                 source: tuple[str, Path] | None = None, abandon_held: bool = True, check_sha: bool = True,
                 lfs_suffixes: tuple[str, ...] = _LFS):
        repo_id, folder = source or ("acme/source", Path("/nonexistent"))
        super().__init__(repo_id, folder)
        self.tokens = {"hf_write": "write", "hf_read": "read"} if tokens is None else tokens
        self.upload_rate, self.drop_puts, self.quota, self.fail_commit = upload_rate, drop_puts, quota, fail_commit
        self.hold_after, self.held, self.release = hold_after, threading.Event(), threading.Event()
        self.abandon_held, self.check_sha, self.lfs_suffixes = abandon_held, check_sha, lfs_suffixes
        self.preuploaded: list[str] = []
        self.repos: dict[str, dict] = {}
        self.objects: dict[str, int] = {}  # sha256 -> size
        self.stored: list[str] = []
        self.commits: list[dict] = []
        self.lock = threading.Lock()
        self._free_at = 0.0  # when the capped uplink is free again
        self._dropping: str | None = None  # the object whose uploads `drop_puts` drops

    # --- routing ----------------------------------------------------------------------------------------------

    def _serve(self, handler, body: bool):
        from urllib.parse import unquote

        path = unquote(handler.path.split("?")[0])
        query = handler.path.split("?", 1)[1] if "?" in handler.path else ""
        method = handler.command
        routes = [
            ("GET", r"^/api/whoami-v2$", self._whoami),
            ("POST", r"^/api/repos/create$", self._create),
            ("POST", r"^/api/validate-yaml$", lambda h: self._json(h, 200, {})),
            ("POST", r"^/api/models/([^/]+/[^/]+)/branch/(.+)$", self._branch),
            ("POST", r"^/api/models/([^/]+/[^/]+)/preupload/(.+)$", self._preupload),
            ("POST", r"^/api/models/([^/]+/[^/]+)/commit/(.+)$", self._commit),
            ("POST", r"^/([^/]+/[^/]+)\.git/info/lfs/objects/batch$", self._batch),
            ("PUT", r"^/lfs-upload/([0-9a-f]{64})$", self._put),
            ("POST", r"^/lfs-verify/([0-9a-f]{64})$", self._verify),
            ("GET", r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$", self._tree),
            ("GET", r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?/?$", self._info),
        ]
        for verb, pattern, handle in routes:
            found = re.match(pattern, path)
            if verb == method and found and (verb != "GET" or not pattern.startswith("^/api/models") or
                                              found.group(1) in self.repos):
                self.requests.append((method, path, query or None))
                return handle(handler, *found.groups())
        if method in ("GET", "HEAD"):
            return super()._serve(handler, body)
        self.requests.append((method, path, None))
        return self._error(handler, 404, "EntryNotFound", f"no route {method} {path}", True)

    # --- helpers ----------------------------------------------------------------------------------------------

    def _json(self, handler, status, data, extra=None):
        return self._send(handler, status, json.dumps(data).encode(),
                          {"Content-Type": "application/json", **(extra or {})}, True)

    def _role(self, handler) -> str | None:
        auth = handler.headers.get("Authorization") or ""
        return self.tokens.get(auth[len("Bearer "):]) if auth.startswith("Bearer ") else None

    def _writer(self, handler) -> bool:
        role = self._role(handler)
        if role is None:
            self._error(handler, 401, "Unauthorized", "Invalid credentials in Authorization header", True)
            return False
        if role != "write":
            self._error(handler, 403, "Forbidden", "You don't have the rights to write to this repository", True)
            return False
        return True

    @staticmethod
    def _body(handler) -> bytes:
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return b"".join(UploadHub._chunks(handler))
        return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))

    @staticmethod
    def _chunks(handler):
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                handler.rfile.readline()
                return
            yield handler.rfile.read(size)
            handler.rfile.readline()

    def _repo(self, handler, repo_id):
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(handler, 404, "RepoNotFound", "Repository not found", True)
        return repo

    def _head(self, repo, revision):
        if revision in repo["branches"]:
            return repo["branches"][revision]
        return revision if revision in repo["commits"] else None

    def _new_commit(self, repo, parent, files, message=""):
        sha = hashlib.sha1(json.dumps([parent, sorted(files), message, len(self.commits)]).encode()).hexdigest()
        repo["commits"][sha] = {"parent": parent, "files": files, "message": message}
        self.commits.append({"sha": sha, "files": sorted(files), "message": message})
        return sha

    def files_at(self, repo_id: str, revision: str = "main") -> dict:
        """path -> {"size", "sha256"} (sha256 None for a file kept in git) at a revision of a repository."""
        repo = self.repos[repo_id]
        return repo["commits"][self._head(repo, revision)]["files"]

    # --- endpoints --------------------------------------------------------------------------------------------

    def _whoami(self, handler):
        role = self._role(handler)
        if role is None:
            return self._error(handler, 401, "Unauthorized", "Invalid credentials in Authorization header", True)
        return self._json(handler, 200, {"type": "user", "name": "tester", "orgs": [{"name": "acme"}],
                                         "auth": {"type": "access_token",
                                                  "accessToken": {"displayName": "test", "role": role}}})

    def _create(self, handler):
        payload = json.loads(self._body(handler) or b"{}")
        if not self._writer(handler):
            return
        repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id.split("/")[0] not in ("tester", "acme"):  # the namespaces the token's account writes to
            return self._error(handler, 403, "Forbidden", "You don't have the rights to create a model under "
                               "this namespace", True)
        with self.lock:
            if repo_id in self.repos:
                return self._json(handler, 409, {"error": "You already created this model repo", "url": url},
                                  {"X-Error-Message": "You already created this model repo"})
            repo = {"private": payload.get("visibility") == "private" or bool(payload.get("private")),
                    "branches": {}, "commits": {}}
            files = {".gitattributes": {"size": len(GITATTRIBUTES), "sha256": None, "content": GITATTRIBUTES}}
            repo["branches"]["main"] = self._new_commit(repo, None, files, "initial commit")
            self.repos[repo_id] = repo
        return self._json(handler, 200, {"url": url, "name": repo_id})

    def _branch(self, handler, repo_id, branch):
        self._body(handler)
        if not self._writer(handler):
            return
        repo = self._repo(handler, repo_id)
        if repo is None:
            return
        if branch in repo["branches"]:
            return self._error(handler, 409, "Conflict", "Reference already exists", True)
        repo["branches"][branch] = repo["branches"]["main"]
        return self._json(handler, 200, {})

    def _info(self, handler, repo_id, revision=None):
        repo = self.repos[repo_id]
        head = self._head(repo, revision or "main")
        if head is None:
            return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}", True)
        files = repo["commits"][head]["files"]
        return self._json(handler, 200, {"id": repo_id, "sha": head, "private": repo["private"],
                                         "siblings": [{"rfilename": f} for f in sorted(files)]})

    def _tree(self, handler, repo_id, revision, prefix=None):
        repo = self.repos[repo_id]
        head = self._head(repo, revision)
        if head is None:
            return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}", True)
        entries = []
        for path, f in sorted(repo["commits"][head]["files"].items()):
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            entry = {"type": "file", "path": path, "size": f["size"],
                     "oid": hashlib.sha1(path.encode() + (f["sha256"] or "").encode()).hexdigest()}
            if f["sha256"] is not None:
                entry["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": 134}
            entries.append(entry)
        return self._json(handler, 200, entries)

    def _preupload(self, handler, repo_id, revision):
        payload = json.loads(self._body(handler))
        if not self._writer(handler) or self._repo(handler, repo_id) is None:
            return
        self.preuploaded += [f["path"] for f in payload["files"]]
        lfs = self.lfs_suffixes
        files = [{"path": f["path"], "shouldIgnore": False, "oid": None,
                  "uploadMode": "lfs" if (lfs and f["path"].endswith(lfs)) or f["size"] > 10 * 2**20 else "regular"}
                 for f in payload["files"]]
        return self._json(handler, 200, {"files": files, "commitOid": self._head(self.repos[repo_id], revision)})

    def _batch(self, handler, repo_id):
        payload = json.loads(self._body(handler))
        if not self._writer(handler) or self._repo(handler, repo_id) is None:
            return
        objects = []
        with self.lock:
            used = sum(self.objects.values())
            for obj in payload["objects"]:
                oid, size = obj["oid"], obj["size"]
                if self.objects.get(oid) == size:
                    objects.append({"oid": oid, "size": size})
                elif self.quota is not None and used + size > self.quota:
                    objects.append({"oid": oid, "size": size, "error": {
                        "code": 422, "message": "Storage quota exceeded: upgrade your plan or free some space"}})
                else:
                    used += size
                    objects.append({"oid": oid, "size": size, "actions": {
                        "upload": {"href": f"{self.url}/lfs-upload/{oid}"},
                        "verify": {"href": f"{self.url}/lfs-verify/{oid}"}}})
        return self._json(handler, 200, {"transfer": "basic", "objects": objects})

    def _put(self, handler, oid):
        if self.hold_after is not None and len(self.stored) >= self.hold_after:
            self.held.set()
            self.release.wait()
            if self.abandon_held:  # its client was killed meanwhile: the body never arrives whole
                handler.close_connection = True
                return
        digest, size = hashlib.sha256(), 0
        chunked = handler.headers.get("Transfer-Encoding", "").lower() == "chunked"
        pieces = self._chunks(handler) if chunked else self._fixed(handler)
        with self.lock:
            self._dropping = self._dropping or oid
            drop = self.drop_puts > 0 and oid == self._dropping
            self.drop_puts -= drop
        for piece in pieces:
            if self.check_sha:
                digest.update(piece)
            size += len(piece)
            if drop and size >= 4096:  # the connection fails half-way, with no answer
                handler.close_connection = True
                handler.connection.shutdown(2)
                return
            if self.upload_rate:  # one budget for all connections, as one uplink
                with self.lock:
                    self._free_at = max(self._free_at, time.monotonic()) + len(piece) / self.upload_rate
                    ahead = self._free_at - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        if self.check_sha and digest.hexdigest() != oid:
            return self._error(handler, 400, "BadRequest", "sha256 of the body differs from the oid", True)
        with self.lock:
            if oid not in self.objects:
                self.stored.append(oid)
            self.objects[oid] = size
        return self._send(handler, 200, b"", {}, True)

    @staticmethod
    def _fixed(handler, chunk: int = 2**20):
        left = int(handler.headers.get("Content-Length") or 0)
        while left:
            piece = handler.rfile.read(min(chunk, left))
            if not piece:
                return
            left -= len(piece)
            yield piece

    def _verify(self, handler, oid):
        payload = json.loads(self._body(handler))
        if self.objects.get(oid) != payload.get("size"):
            return self._error(handler, 404, "EntryNotFound", "object not found", True)
        return self._json(handler, 200, {})

    def _commit(self, handler, repo_id, revision):
        lines = [json.loads(line) for line in self._body(handler).splitlines() if line.strip()]
        if not self._writer(handler):
            return
        repo = self._repo(handler, repo_id)
        if repo is None:
            return
        if self.fail_commit:
            return self._error(handler, self.fail_commit, "Error", "commit refused by the stand-in", True)
        with self.lock:
            head = repo["branches"].get(revision)
            if head is None:
                return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}", True)
            header = lines[0]["value"]
            parent = header.get("parentCommit")
            if parent and parent != head:
                return self._error(handler, 412, "PreconditionFailed", "A commit has happened since", True)
            files = dict(repo["commits"][head]["files"])
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    content = base64.b64decode(value["content"])
                    files[value["path"]] = {"size": len(content), "sha256": None, "content": content}
                elif key == "lfsFile":
                    if self.objects.get(value["oid"]) is None or \
                            ("size" in value and self.objects[value["oid"]] != value["size"]):
                        return self._error(handler, 422, "BadRequest",
                                           f"LFS object {value['oid']} of {value['path']} was not uploaded", True)
                    files[value["path"]] = {"size": self.objects[value["oid"]], "sha256": value["oid"],
                                            "content": None}
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    files = {p: f for p, f in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            sha = self._new_commit(repo, head, files, header.get("summary", ""))
            repo["branches"][revision] = sha
        return self._json(handler, 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                                         "success": True})
