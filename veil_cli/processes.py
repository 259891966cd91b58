"""Real Veil servers for tests: `veil core` / `veil edge` subprocesses on free loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `python -m veil <role>` process whose stderr goes to a log file the test can read."""

    def __init__(self, role: str, env: dict[str, str], port: int, log_path: Path):
        self.role, self.port, self.log_path = role, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "veil_cli", role], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} exited ({self.proc.returncode}): {self.log()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.role} not ready after {timeout}s: {self.log()[-2000:]}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def base_env(home: Path, **settings: str) -> dict[str, str]:
    """The test process's environment without VEIL_* leftovers, plus the given settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VEIL_")}
    env.update({"HF_HUB_OFFLINE": "1", "VEIL_HOME": str(home), "VEIL_LOG_LEVEL": "info"})
    env.update(settings)
    return env


class VeilPair:
    """A core and an edge wired together, for API tests with the real openai client."""

    def __init__(self, tmp: Path, edge_bundle: Path, core_bundle: Path, key_file: Path, model_name: str,
                 core_env: dict[str, str] | None = None, edge_env: dict[str, str] | None = None):
        core_port, edge_port = free_port(), free_port()
        common = {"VEIL_BUNDLE_KEY_FILE": str(key_file), "VEIL_MODEL_NAME": model_name}
        self.core = Server("core", base_env(tmp, VEIL_CORE_PORT=str(core_port), VEIL_CORE_BUNDLE=str(core_bundle),
                                            **common, **(core_env or {})), core_port, tmp / f"core-{core_port}.log")
        self.edge = None
        try:
            self.core.wait_ready()
            self.edge = Server("edge", base_env(tmp, VEIL_EDGE_PORT=str(edge_port),
                                                VEIL_EDGE_CORE_URL=self.core.url, VEIL_BUNDLE_EDGE_DIR=str(edge_bundle),
                                                **common, **(edge_env or {})), edge_port, tmp / f"edge-{edge_port}.log")
            self.edge.wait_ready()
        except Exception:
            self.stop()
            raise
        self.base_url = self.edge.url + "/v1"

    def stop(self) -> None:
        for s in (self.edge, self.core):
            if s is not None:
                s.stop()
