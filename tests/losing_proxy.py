"""A stand-in HTTP gateway in front of a real server that loses one answer, as a proxy's 502/504 does.

Every request is forwarded to ``upstream`` and its answer passed back, except the first ``lose``
requests to ``path``: those are forwarded too (the server does the work), but the client gets a
503 instead of the answer. MLflow's HTTP client retries a 503, so it sends the request again.

    with LosingProxy(server.uri, "/api/2.0/mlflow/runs/create") as proxy:
        MlflowClient(proxy.uri).create_run("0")   # the server made two runs
    assert proxy.lost == 1
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class LosingProxy:
    def __init__(self, upstream: str, path: str, lose: int = 1) -> None:
        self.upstream, self.path, self.to_lose, self.lost = urlsplit(upstream), path, lose, 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                upstream.close()
                if proxy._lose(self.path):
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in _HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *_args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _lose(self, path: str) -> bool:
        with self._lock:
            if urlsplit(path).path == self.path and self.lost < self.to_lose:
                self.lost += 1
                return True
            return False

    def __enter__(self) -> LosingProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
