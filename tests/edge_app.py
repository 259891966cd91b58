"""An edge app under a real uvicorn server in a thread, on a loopback port, for tests that bring their own core."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import uvicorn

from veil_cli.processes import free_port


class ThreadedEdge:
    def __init__(self, app: Any, port: int | None = None, wait_ready: bool = True):
        self.url = f"http://127.0.0.1:{port or free_port()}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=int(self.url.rsplit(":", 1)[1]),
                                                    log_config=None, access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.server.started and not wait_ready:
                return
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("edge did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
