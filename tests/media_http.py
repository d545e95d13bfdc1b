"""A loopback HTTP server for media tests: serves files, redirects, bad responses; counts hits."""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _QuietServer(ThreadingHTTPServer):
    """Clients that hang up mid-body (a fetcher enforcing its byte cap) are expected, not errors."""

    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class MediaServer:
    """Routes: /file/NAME (registered bytes), /redirect?to=URL, /gzip/NAME.

    `hits` counts every request, `host_headers` records the Host header of each.
    """

    def __init__(self, host: str = "127.0.0.1"):
        self.files: dict[str, bytes] = {}
        self.hits = 0
        self.host_headers: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                owner.hits += 1
                owner.host_headers.append(self.headers.get("Host", ""))
                path = self.path
                if path.startswith("/redirect?to="):
                    self.send_response(302)
                    self.send_header("Location", path.split("=", 1)[1])
                    self.end_headers()
                    return
                name = path.rsplit("/", 1)[-1]
                data = owner.files.get(name)
                if data is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                gz = path.startswith("/gzip/")
                body = gzip.compress(data) if gz else data
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                if gz:
                    self.send_header("Content-Encoding", "gzip")
                self.end_headers()
                self.wfile.write(body)

        self.httpd = _QuietServer((host, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.base = f"http://{host}:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
