"""A plain HTTP server on a loopback port that answers every GET with JSON: the stand-in for something outside
Veil that a client of Veil's must reach (an identity provider's JWKS, a forward proxy)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@contextlib.contextmanager
def json_server(answer: Callable[[str], tuple[int, Any]]) -> Iterator[str]:
    """Serve `answer(request target) -> (status, JSON body)` for every GET; yields the server's base URL.
    The target is the request line's, so a client talking to a proxy shows the absolute URL it asked for."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            status, payload = answer(self.path)
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
