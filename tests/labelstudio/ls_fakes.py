"""Real HTTP servers on 127.0.0.1 playing Label Studio, a cloud bucket and an outside host.

Every request is recorded with the server's role and its Authorization header, so tests can
assert where the token went. ``FakeLS.routes`` lets a test script API answers.

Kept out of ``conftest.py`` so that test modules import it by a unique name (``ls_fakes``):
``from conftest import ...`` picks whichever conftest was imported first when several test
folders run in one session.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from PIL import Image

LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"
# Label Studio's own page-size cap (off by default) in the live server, below the client's 1000
# per page: every live test reads tasks the way a capped production server serves them.
LIVE_PAGE_SIZE_MAX = 100
# Colors of the local files the live Label Studio serves (files/dataset/img<i>.png).
LIVE_COLORS = [(250, 200, 0), (90, 90, 90), (20, 20, 20), (200, 10, 10), (10, 200, 10)]


def png_bytes(color=(200, 30, 30), size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


class Server:
    """One threading HTTP server; ``handle(server, handler)`` answers, ``log`` records."""

    def __init__(self, role: str, log: list, handle):
        self.role, self.log, self.handle = role, log, handle
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                self.route, self.query = parts.path, parse_qs(parts.query)
                outer.log.append(
                    (outer.role, self.command, self.path, self.headers.get("Authorization"))
                )
                outer.handle(outer, self)

            do_GET = do_POST = do_PATCH = do_DELETE = _any

            def send(self, status, body=b"", ctype="application/octet-stream", headers=None):
                if isinstance(body, (dict, list)):
                    body, ctype = json.dumps(body).encode(), "application/json"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeLS:
    """Label Studio (files, presign, scripted API) + a cloud bucket + an outside host."""

    def __init__(self, token_header: str = f"Token {LEGACY_TOKEN}"):
        self.log: list = []
        self.files: dict[str, bytes] = {}
        self.expected_auth = token_header
        self.routes: dict = {}  # (method, path) -> list of (status, body) or callable(handler)
        self.slow_seconds = 1.5
        self.ls = Server("ls", self.log, self._ls)
        self.cloud = Server("cloud", self.log, self._cloud)
        self.ext = Server("ext", self.log, self._ext)

    def requests_to(self, role):
        return [entry for entry in self.log if entry[0] == role]

    def _ls(self, server, h):
        key = (h.command, h.route)
        if key in self.routes:
            answer = self.routes[key]
            if callable(answer):
                return answer(h)
            status, body = answer.pop(0) if len(answer) > 1 else answer[0]
            return h.send(status, body)
        if h.headers.get("Authorization") != self.expected_auth:
            return h.send(401, {"detail": "Authentication credentials were not provided."})
        if h.route.startswith("/data/upload/"):
            return self._file(h, h.route.rsplit("/", 1)[-1])
        if h.route == "/data/local-files/":
            return self._file(h, h.query.get("d", [""])[0])
        if h.route.startswith("/tasks/") and h.route.endswith("/presign/"):
            uri = base64.urlsafe_b64decode(h.query["fileuri"][0]).decode()
            name = uri.split("/", 3)[-1]
            location = f"{self.cloud.url}/bucket/{name}?X-Amz-Signature=secret"
            return h.send(303, b"", headers={"Location": location})
        if h.route == "/to-ext":
            return h.send(302, b"", headers={"Location": f"{self.ext.url}/img/a.png"})
        return h.send(404, {"detail": "Not found."})

    def _file(self, h, name):
        if name not in self.files:
            return h.send(404, b"missing")
        return h.send(200, self.files[name], "image/png")

    def _cloud(self, server, h):
        return self._file(h, h.route.split("/bucket/", 1)[-1])

    def _ext(self, server, h):
        if h.route == "/slow.png":
            time.sleep(self.slow_seconds)
        if h.route.startswith("/data/"):  # Label Studio reached under another address
            return h.send(401, {"detail": "Authentication credentials were not provided."})
        if h.route == "/to-ls":
            return h.send(302, b"", headers={"Location": f"{self.ls.url}/data/upload/1/a.png"})
        return self._file(h, h.route.rsplit("/", 1)[-1])

    def close(self):
        for server in (self.ls, self.cloud, self.ext):
            server.close()
