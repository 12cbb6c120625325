"""A local stand-in for the Hub's file endpoints, enough for huggingface_hub to download and list one repository:
`HEAD/GET /{repo}/resolve/{revision}/{path}` (with Range) and `GET /api/models/{repo}/tree/{revision}`.
It records every request, so tests can see what was fetched and how."""

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


class FakeHub:
    def __init__(self, repo_id: str, folder: Path):
        self.repo_id, self.folder = repo_id, folder
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, range)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
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
        path = handler.path.split("?")[0]
        self.requests.append((handler.command, path, handler.headers.get("Range")))
        tree = re.match(rf"^/api/models/{re.escape(self.repo_id)}/tree/[^/]+/?$", path)
        if tree:
            files = [{"type": "file", "path": p.relative_to(self.folder).as_posix(), "size": p.stat().st_size,
                      "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                     for p in sorted(self.folder.rglob("*")) if p.is_file()]
            return self._send(handler, 200, json.dumps(files).encode(), {"Content-Type": "application/json"}, body)
        match = re.match(rf"^/{re.escape(self.repo_id)}/resolve/[^/]+/(.+)$", path)
        target = self.folder / match.group(1) if match else None
        if target is None or not target.is_file():
            return self._send(handler, 404, b"not found", {"X-Error-Code": "EntryNotFound"}, body)
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

    @staticmethod
    def _send(handler, status, data, headers, body):
        handler.send_response(status)
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)
