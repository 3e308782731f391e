"""A pass-through HTTP proxy in front of the real Label Studio that fails chosen endpoints.

For faults Label Studio cannot be made to produce on cue (one endpoint failing while the rest
works). Everything else is forwarded unchanged, headers and bodies included, so the backend
talks to the real server through it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from ml_backend.devtools.local_services import free_port

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-encoding", "content-length"}


class FaultyProxy:
    """``http://127.0.0.1:<port>`` forwarding to ``target``.

    Args:
        target: the real server's base URL.
        fail: ``fail(method, path)`` returns an HTTP status to answer instead of forwarding, or
            None to forward.
    """

    def __init__(self, target: str, fail: Callable[[str, str], int | None]):
        self.target, self.fail = target.rstrip("/"), fail
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.failed: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                status = proxy.fail(self.command, self.path)
                if status is not None:
                    proxy.failed.append((self.command, self.path))
                    body = b'{"detail": "injected fault"}'
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                reply = requests.request(
                    self.command,
                    proxy.target + self.path,
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                    timeout=120,
                )
                self.send_response(reply.status_code)
                for key, value in reply.headers.items():
                    if key.lower() not in _HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(reply.content)))
                self.end_headers()
                self.wfile.write(reply.content)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
