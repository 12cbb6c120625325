"""A local stand-in for the Hub's endpoints, enough for huggingface_hub to resolve, list and download one
repository: `GET /api/models/{repo}[/revision/{rev}]` (the commit a revision points to),
`GET /api/models/{repo}/tree/{rev}`, and `HEAD/GET /{repo}/resolve/{rev}/{path}` (with Range).

It answers errors as the Hub does, with the status and `X-Error-Code` header huggingface_hub maps to its
exception types: an unknown repository (401 `RepoNotFound`), an unknown revision (404 `RevisionNotFound`), a
missing file (404 `EntryNotFound`) and, with `gated`, the files of a gated repository (401 `GatedRepo`; its
metadata and listing stay public, as on the Hub). `fail_listing` is a status the file listing answers with.
It records every request, so tests can see what was fetched, at which revision and how."""

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


class FakeHub:
    def __init__(self, repo_id: str, folder: Path, gated: bool = False, fail_listing: int | None = None):
        self.repo_id, self.folder = repo_id, folder
        self.gated, self.fail_listing = gated, fail_listing
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, range)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

            def do_POST(self):  # the upload endpoints: tests/fake_hub_upload.py
                hub._serve(self, body=True)

            def do_PUT(self):
                hub._serve(self, body=True)

            def do_DELETE(self):
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()

    def _serve(self, handler, body: bool):
        from urllib.parse import unquote

        path = unquote(handler.path.split("?")[0])
        self.requests.append((handler.command, path, handler.headers.get("Range")))
        api = re.match(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree)/(.+?))?/?$", path)
        resolve = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        repo_id = (api or resolve).group(1) if api or resolve else None
        if repo_id != self.repo_id:
            return self._error(handler, 401, "RepoNotFound", "Repository not found", body)
        revision = api.group(3) if api else resolve.group(2)
        if revision not in (None, "main", COMMIT):
            return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
        if api and api.group(2) == "tree":
            if self.fail_listing:
                return self._send(handler, self.fail_listing, b"refused", {}, body)
            files = [{"type": "file", "path": p.relative_to(self.folder).as_posix(), "size": p.stat().st_size,
                      "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                     for p in sorted(self.folder.rglob("*")) if p.is_file()]
            return self._send(handler, 200, json.dumps(files).encode(), {"Content-Type": "application/json"}, body)
        if api:
            info = {"id": self.repo_id, "sha": COMMIT, "gated": "manual" if self.gated else False}
            return self._send(handler, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if self.gated:
            return self._error(handler, 401, "GatedRepo", f"Access to model {self.repo_id} is restricted. You must "
                               "have access to it and be authenticated to access it. Please log in.", body)
        target = self.folder / resolve.group(3)
        if not target.is_file():
            return self._error(handler, 404, "EntryNotFound", "Entry not found", body, {"X-Repo-Commit": COMMIT})
        data = target.read_bytes()
        headers = {"X-Repo-Commit": COMMIT, "ETag": '"' + hashlib.sha256(data).hexdigest() + '"',
                   "Accept-Ranges": "bytes"}
        wanted = handler.headers.get("Range")
        if wanted:
            start, end = (int(v) for v in re.match(r"bytes=(\d+)-(\d+)", wanted).groups())
            part = data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{start + len(part) - 1}/{len(data)}"
            return self._send(handler, 206, part, headers, body)
        return self._send(handler, 200, data, headers, body)

    def _error(self, handler, status, code, message, body, extra=None):
        payload = json.dumps({"error": message}).encode()
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        return self._send(handler, status, payload, {**headers, **(extra or {})}, body)

    @staticmethod
    def _send(handler, status, data, headers, body):
        handler.send_response(status)
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)
