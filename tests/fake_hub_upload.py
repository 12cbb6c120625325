"""The stand-in Hub of `fake_hub.py` with the endpoints huggingface_hub's upload API calls, for publishing tests.
Each behaviour the client depends on is written from huggingface_hub's own client code (`_commit_api.py`,
`lfs.py`, `hf_api.py`: `preupload_lfs_files`, `create_commit`, `lfs_upload`), and `tests/test_fake_hub.py` drives
it with that client:

- `GET /api/whoami-v2` (the token and its role; tokens are given as `{token: "write" | "read"}`),
- `POST /api/repos/create` (409 with the URL when it exists; a new repository holds `.gitattributes`),
  `DELETE /api/repos/delete` (the repository goes, and its LFS objects with it; `delete_repo` does the same),
- `POST /api/models/{repo}/branch/{branch}`, `GET /api/models/{repo}[/revision/{rev}]` (head commit, files),
- `GET /api/models/{repo}/tree/{rev}` (recursive listing: git blob id `oid` of files kept in git, `lfs` {oid
  (sha256), size} of LFS files), `GET /{repo}/resolve/{rev}/{path}` (a file kept in git),
- `POST /api/models/{repo}/preupload/{rev}` (per path: `uploadMode`, `lfs` for weights and files over 10 MB,
  `lfs_suffixes` naming what a weight is, `()` for a repository whose `.gitattributes` keeps small weights in git;
  `shouldIgnore` from the `.gitignore` the request brings (`gitIgnore`) or else the branch's; `oid` of the file the
  branch holds at that path: its sha256 when in LFS, its git blob id when in git; `preuploaded` lists every
  (path, size) asked about),
- `POST /{repo}.git/info/lfs/objects/batch` (per repository: no action for an object it holds; an upload action
  for one it lacks: `basic` (one PUT), or, over `chunk_size` bytes, `multipart`: a `chunk_size` header and one
  URL per part, and the completion URL as `href`, as the Hub answers for large files),
- `PUT /lfs-upload/{repo}/{oid}` (the sha256 and size checked while reading; `upload_rate` bytes/s caps all
  uploads together), `PUT /lfs-part/{repo}/{oid}/{n}` (answers an ETag), `POST /lfs-complete/{repo}/{oid}` (the
  parts, by their ETags, make the object, checked), `POST /lfs-verify/{repo}/{oid}`, `POST /api/validate-yaml`,
- `POST /api/models/{repo}/commit/{rev}` (ndjson; every `lfsFile` must name an object of this repository, of its
  size; a `parentCommit` other than the branch's head is refused with 412).

Faults: `fault(kind, how, times)` makes the next `times` requests of a kind (`whoami`, `create`, `info`,
`preupload`, `batch`, `put`, `part`, `complete`, `verify`, `tree`, `commit`) fail: `refuse` (HTTP 400 with a
reason; in a batch answer, an object error), `quota` (HTTP 402; in a batch answer, an object error), `drop` (the
connection closes before the request is handled) or `lose` (the request is handled, then the connection closes
without its answer: a commit made whose reply is lost). `drop_puts` drops that many upload connections of the
first object uploaded half-way (its later tries, and other objects, go through); `hold_after` (with `held`, an
Event) lets the uploads of that many objects through, however many run at once, and blocks every other until
`release` is set, then drops it unless `abandon_held` is False (a killed client's upload); `quota` (bytes) makes
the batch endpoint answer a quota error past it (over all repositories: the account's); `fail_commit` is a status
the commit endpoint answers with.
`check_sha=False` (for the bench) takes each upload's bytes without hashing them. LFS objects are kept as sha256 ->
size only (the bytes are hashed as they arrive, then dropped; multipart parts are kept until completed), so the
bench can push gigabytes through it. `stored` lists the oids stored, in order (an object stored again in
another repository too); `commits` every commit made.

The Xet path (hf_xet's CAS protocol) is not served: tests run the LFS path with HF_HUB_DISABLE_XET=1.
"""

import base64
import fnmatch
import hashlib
import io
import json
import re
import socket
import threading
import time
from pathlib import Path

from .fake_hub import FakeHub

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_LFS = (".safetensors", ".bin", ".pth", ".pt", ".gguf")
KINDS = ("whoami", "create", "info", "preupload", "batch", "put", "part", "complete", "verify", "tree", "commit")


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def gitignored(path: str, text: str) -> bool:
    """Whether git's ignore rules `text` drop `path` (the last matching rule decides; `!` re-includes)."""
    ignored = False
    parts = path.split("/")
    for line in text.splitlines():
        rule = line.strip()
        if not rule or rule.startswith("#"):
            continue
        negated, rule = rule.startswith("!"), rule.lstrip("!")
        directory, rule = rule.endswith("/"), rule.rstrip("/")
        if "/" in rule:  # anchored at the root
            rule = rule.lstrip("/")
            prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + (0 if directory else 1))]
            hit = any(fnmatch.fnmatchcase(p, rule) for p in prefixes)
        else:
            hit = any(fnmatch.fnmatchcase(n, rule) for n in (parts[:-1] if directory else parts))
        if hit:
            ignored = not negated
    return ignored


class UploadHub(FakeHub):
    def __init__(self, tokens: dict | None = None, upload_rate: float | None = None, drop_puts: int = 0,
                 hold_after: int | None = None, quota: int | None = None, fail_commit: int | None = None,
                 source: tuple[str, Path] | None = None, abandon_held: bool = True, check_sha: bool = True,
                 lfs_suffixes: tuple[str, ...] = _LFS, chunk_size: int | None = None, hold_commit: bool = False):
        repo_id, folder = source or ("acme/source", Path("/nonexistent"))
        super().__init__(repo_id, folder)
        self.tokens = {"hf_write": "write", "hf_read": "read"} if tokens is None else tokens
        self.upload_rate, self.drop_puts, self.quota, self.fail_commit = upload_rate, drop_puts, quota, fail_commit
        self.hold_after, self.held, self.release = hold_after, threading.Event(), threading.Event()
        self.abandon_held, self.check_sha, self.lfs_suffixes = abandon_held, check_sha, lfs_suffixes
        self.chunk_size = chunk_size
        self.hold_commit = hold_commit  # a commit made waits for `release` before answering, then hangs up
        self.preuploaded: list[tuple[str, int]] = []
        self.repos: dict[str, dict] = {}
        self.stored: list[str] = []
        self.commits: list[dict] = []
        self.faults: dict[str, list] = {}  # kind -> [how, times left]
        self.faulted: list[tuple[str, str]] = []  # (kind, how) of each fault made
        self.lock = threading.Lock()
        self._free_at = 0.0  # when the capped uplink is free again
        self._dropping: str | None = None  # the object whose uploads `drop_puts` drops
        self._parts: dict[tuple[str, str], dict[int, bytes | int]] = {}
        self._admitted: set[str] = set()  # the objects `hold_after` lets through

    def fault(self, kind: str, how: str, times: int = 1) -> None:
        assert kind in KINDS and how in ("refuse", "quota", "drop", "lose"), (kind, how)
        self.faults[kind] = [how, times]

    @property
    def objects(self) -> dict[str, int]:
        """sha256 -> size over every repository."""
        return {oid: size for repo in self.repos.values() for oid, size in repo["objects"].items()}

    def seed(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> None:
        """Commit small files (kept in git) to a repository, creating it if missing."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, {"private": False, "branches": {}, "commits": {}, "objects": {}})
            head = repo["branches"].get(branch)
            held = dict(repo["commits"][head]["files"]) if head else {
                ".gitattributes": {"size": len(GITATTRIBUTES), "sha256": None, "content": GITATTRIBUTES}}
            held.update({p: {"size": len(c), "sha256": None, "content": c} for p, c in files.items()})
            repo["branches"][branch] = self._new_commit(repo, head, held, "seed")

    def delete_repo(self, repo_id: str) -> None:
        """The repository goes, with its LFS objects (as on the Hub)."""
        with self.lock:
            self.repos.pop(repo_id, None)

    def drop_object(self, repo_id: str, oid: str) -> None:
        """An LFS object lost by the Hub's storage (garbage-collected): its commits still name it."""
        with self.lock:
            self.repos[repo_id]["objects"].pop(oid, None)

    # --- routing ----------------------------------------------------------------------------------------------

    def _serve(self, handler, body: bool):
        from urllib.parse import unquote

        path = unquote(handler.path.split("?")[0])
        query = handler.path.split("?", 1)[1] if "?" in handler.path else ""
        method = handler.command
        repo = r"([^/]+/[^/]+)"
        routes = [
            ("whoami", "GET", r"^/api/whoami-v2$", self._whoami),
            ("create", "POST", r"^/api/repos/create$", self._create),
            ("create", "DELETE", r"^/api/repos/delete$", self._delete),
            ("info", "POST", r"^/api/validate-yaml$", lambda h: self._json(h, 200, {})),
            ("create", "POST", rf"^/api/models/{repo}/branch/(.+)$", self._branch),
            ("preupload", "POST", rf"^/api/models/{repo}/preupload/(.+)$", self._preupload),
            ("commit", "POST", rf"^/api/models/{repo}/commit/(.+)$", self._commit),
            ("batch", "POST", rf"^/{repo}\.git/info/lfs/objects/batch$", self._batch),
            ("put", "PUT", rf"^/lfs-upload/{repo}/([0-9a-f]{{64}})$", self._put),
            ("part", "PUT", rf"^/lfs-part/{repo}/([0-9a-f]{{64}})/(\d+)$", self._part),
            ("complete", "POST", rf"^/lfs-complete/{repo}/([0-9a-f]{{64}})$", self._complete),
            ("verify", "POST", rf"^/lfs-verify/{repo}/([0-9a-f]{{64}})$", self._verify),
            ("tree", "GET", rf"^/api/models/{repo}/tree/([^/]+)(?:/(.*))?$", self._tree),
            ("info", "GET", rf"^/api/models/{repo}(?:/revision/([^/]+))?/?$", self._info),
            ("info", "GET", rf"^/{repo}/resolve/([^/]+)/(.+)$", self._resolve),
            ("info", "HEAD", rf"^/{repo}/resolve/([^/]+)/(.+)$", self._resolve),
        ]
        for kind, verb, pattern, handle in routes:
            found = re.match(pattern, path)
            if verb != method or not found:
                continue
            if verb in ("GET", "HEAD") and found.groups() and found.group(1) not in self.repos:
                break  # the source repository of `fake_hub.FakeHub`, or an unknown one (RepoNotFound)
            self.requests.append((method, path, query or None))
            return self._faulty(kind, handler, lambda **fault: handle(handler, *found.groups(), **fault))
        if method in ("GET", "HEAD"):
            return super()._serve(handler, body)
        self.requests.append((method, path, None))
        return self._error(handler, 404, "EntryNotFound", f"no route {method} {path}", True)

    def _faulty(self, kind: str, handler, handle):
        with self.lock:
            fault = self.faults.get(kind)
            how = None
            if fault and fault[1] > 0:
                how = fault[0]
                fault[1] -= 1
                self.faulted.append((kind, how))
        if how is None:
            return handle()
        if kind == "batch" and how in ("refuse", "quota"):  # the batch answers 200, with an error per object
            return handle(fault=how)
        if how == "refuse":
            return self._error(handler, 400, "BadRequest", f"{kind} refused by the stand-in", True)
        if how == "quota":
            return self._error(handler, 402, "PaymentRequired", "Storage quota exceeded: upgrade your plan or free "
                               "some space", True)
        if how == "drop":
            return self._hang_up(handler)
        real = handler.wfile  # lose: handled, then the connection closes with no answer
        handler.wfile = io.BytesIO()
        try:
            handle()
        finally:
            handler.wfile = real
        return self._hang_up(handler)

    @staticmethod
    def _hang_up(handler):
        handler.close_connection = True
        try:
            handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
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
                    "branches": {}, "commits": {}, "objects": {}}
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

    def _delete(self, handler):
        payload = json.loads(self._body(handler) or b"{}")
        if not self._writer(handler):
            return
        repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
        if repo_id not in self.repos:
            return self._error(handler, 404, "RepoNotFound", "Repository not found", True)
        self.delete_repo(repo_id)
        return self._json(handler, 200, {})

    def _resolve(self, handler, repo_id, revision, path):
        repo = self.repos[repo_id]
        head = self._head(repo, revision)
        f = repo["commits"][head]["files"].get(path) if head else None
        if f is None or f["content"] is None:
            return self._error(handler, 404, "EntryNotFound", "Entry not found", handler.command != "HEAD")
        return self._send(handler, 200, f["content"], {"X-Repo-Commit": head, "ETag": f'"{git_blob_id(f["content"])}"'},
                          handler.command != "HEAD")

    def _gitignore(self, repo, revision) -> str:
        head = self._head(repo, revision)
        f = repo["commits"][head]["files"].get(".gitignore") if head else None
        return (f["content"] or b"").decode() if f else ""

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
            pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{f['sha256']}\nsize {f['size']}\n"
                       .encode() if f["sha256"] else None)
            entry = {"type": "file", "path": path, "size": f["size"],
                     "oid": git_blob_id(pointer if pointer is not None else f["content"])}
            if f["sha256"] is not None:
                entry["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": 134}
            entries.append(entry)
        return self._json(handler, 200, entries)

    def _preupload(self, handler, repo_id, revision):
        payload = json.loads(self._body(handler))
        if not self._writer(handler) or self._repo(handler, repo_id) is None:
            return
        repo = self.repos[repo_id]
        head = self._head(repo, revision)
        held = repo["commits"][head]["files"] if head else {}
        ignore = payload["gitIgnore"] if "gitIgnore" in payload else self._gitignore(repo, revision)
        self.preuploaded += [(f["path"], f["size"]) for f in payload["files"]]
        lfs = self.lfs_suffixes
        files = []
        for f in payload["files"]:
            mode = "lfs" if (lfs and f["path"].endswith(lfs)) or f["size"] > 10 * 2**20 else "regular"
            there = held.get(f["path"])
            oid = None if there is None else there["sha256"] or git_blob_id(there["content"])
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": gitignored(f["path"], ignore),
                          "oid": oid})
        return self._json(handler, 200, {"files": files, "commitOid": head})

    def _batch(self, handler, repo_id, fault=None):
        payload = json.loads(self._body(handler))
        if not self._writer(handler) or self._repo(handler, repo_id) is None:
            return
        objects = []
        with self.lock:
            held = self.repos[repo_id]["objects"]
            used = sum(self.objects.values())
            for obj in payload["objects"]:
                oid, size = obj["oid"], obj["size"]
                if held.get(oid) == size:
                    objects.append({"oid": oid, "size": size})
                elif fault == "refuse":
                    objects.append({"oid": oid, "size": size, "error": {
                        "code": 422, "message": "File exceeds the maximum size allowed by the stand-in"}})
                elif fault == "quota" or (self.quota is not None and used + size > self.quota):
                    objects.append({"oid": oid, "size": size, "error": {
                        "code": 422, "message": "Storage quota exceeded: upgrade your plan or free some space"}})
                else:
                    used += size
                    base = f"{self.url}/lfs-%s/{repo_id}/{oid}"
                    upload = {"href": base % "upload"}
                    if self.chunk_size is not None and size > self.chunk_size:  # multipart, as for large files
                        parts = -(-size // self.chunk_size)
                        upload = {"href": base % "complete", "header": {
                            "chunk_size": str(self.chunk_size),
                            **{str(k): f"{base % 'part'}/{k}" for k in range(1, parts + 1)}}}
                    objects.append({"oid": oid, "size": size, "actions": {
                        "upload": upload, "verify": {"href": base % "verify"}}})
        return self._json(handler, 200, {"transfer": "basic", "objects": objects})

    def _held_upload(self, handler, oid) -> bool:
        """`hold_after`: the uploads of the first `hold_after` objects go through (however many run at once);
        any other waits for `release`. True when the connection is then dropped (its client was killed)."""
        with self.lock:
            through = self.hold_after is None or oid in self._admitted or len(self._admitted) < self.hold_after
            if through:
                self._admitted.add(oid)
        if not through:
            self.held.set()
            self.release.wait()
            if self.abandon_held:  # its client was killed meanwhile: the body never arrives whole
                handler.close_connection = True
                return True
        return False

    def _receive(self, handler, oid):
        """The body of an upload, at `upload_rate`: (sha256 hasher, size, bytes kept or None), or None when
        `drop_puts` drops it half-way."""
        digest, size, kept = hashlib.sha256(), 0, []
        chunked = handler.headers.get("Transfer-Encoding", "").lower() == "chunked"
        pieces = self._chunks(handler) if chunked else self._fixed(handler)
        with self.lock:
            self._dropping = self._dropping or oid
            drop = self.drop_puts > 0 and oid == self._dropping
            self.drop_puts -= drop
        for piece in pieces:
            if self.check_sha:
                digest.update(piece)
                kept.append(piece)
            size += len(piece)
            if drop and size >= 4096:  # the connection fails half-way, with no answer
                handler.close_connection = True
                handler.connection.shutdown(2)
                return None
            if self.upload_rate:  # one budget for all connections, as one uplink
                with self.lock:
                    self._free_at = max(self._free_at, time.monotonic()) + len(piece) / self.upload_rate
                    ahead = self._free_at - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        return digest, size, b"".join(kept)

    def _store(self, repo_id, oid, size):
        with self.lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                return False
            if repo["objects"].get(oid) != size:
                self.stored.append(oid)
            repo["objects"][oid] = size
        return True

    def _put(self, handler, repo_id, oid):
        if self._held_upload(handler, oid):
            return
        got = self._receive(handler, oid)
        if got is None:
            return
        digest, size, _ = got
        if self.check_sha and digest.hexdigest() != oid:
            return self._error(handler, 400, "BadRequest", "sha256 of the body differs from the oid", True)
        if not self._store(repo_id, oid, size):
            return self._error(handler, 404, "RepoNotFound", "Repository not found", True)
        return self._send(handler, 200, b"", {}, True)

    def _part(self, handler, repo_id, oid, number):
        if self._held_upload(handler, oid):
            return
        got = self._receive(handler, oid)
        if got is None:
            return
        digest, size, data = got
        with self.lock:
            self._parts.setdefault((repo_id, oid), {})[int(number)] = data if self.check_sha else size
        return self._send(handler, 200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}-{size}"'}, True)

    def _complete(self, handler, repo_id, oid):
        payload = json.loads(self._body(handler))
        with self.lock:
            parts = self._parts.get((repo_id, oid), {})
        with self.lock:
            done = self.repos.get(repo_id, {}).get("objects", {}).get(oid)
        if done is not None and not parts:  # completed already (a retry whose first answer was lost)
            return self._json(handler, 200, {})
        numbers = [p["partNumber"] for p in payload.get("parts", [])]
        if payload.get("oid") != oid or not numbers or numbers != list(range(1, len(numbers) + 1)) or \
                any(k not in parts for k in numbers) or any(not p.get("etag") for p in payload["parts"]):
            return self._error(handler, 400, "BadRequest", "incomplete multipart upload", True)
        if self.check_sha:
            data = b"".join(parts[k] for k in numbers)
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(handler, 400, "BadRequest", "sha256 of the parts differs from the oid", True)
            size = len(data)
        else:
            size = sum(parts[k] for k in numbers)
        if not self._store(repo_id, oid, size):
            return self._error(handler, 404, "RepoNotFound", "Repository not found", True)
        with self.lock:
            self._parts.pop((repo_id, oid), None)
        return self._json(handler, 200, {})

    @staticmethod
    def _fixed(handler, chunk: int = 2**20):
        left = int(handler.headers.get("Content-Length") or 0)
        while left:
            piece = handler.rfile.read(min(chunk, left))
            if not piece:
                return
            left -= len(piece)
            yield piece

    def _verify(self, handler, repo_id, oid):
        payload = json.loads(self._body(handler))
        repo = self.repos.get(repo_id)
        if repo is None or repo["objects"].get(oid) != payload.get("size"):
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
                    held = repo["objects"]
                    if held.get(value["oid"]) is None or ("size" in value and held[value["oid"]] != value["size"]):
                        return self._error(handler, 422, "BadRequest",
                                           f"LFS object {value['oid']} of {value['path']} was not uploaded", True)
                    files[value["path"]] = {"size": held[value["oid"]], "sha256": value["oid"],
                                            "content": None}
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    files = {p: f for p, f in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            sha = self._new_commit(repo, head, files, header.get("summary", ""))
            repo["branches"][revision] = sha
        if self.hold_commit:  # made; its answer waits, then is lost (the client killed or interrupted meanwhile)
            self.held.set()
            self.release.wait()
            return self._hang_up(handler)
        return self._json(handler, 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                                         "success": True})
