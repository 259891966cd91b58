"""Veil servers as child processes: `veil core` / `veil edge` on loopback ports, waited on until ready.

`veil up` runs its pair this way; tests and benchmarks do the same with their own settings.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx

from edge_proxy.core_client import HttpCoreTransport
from veil.errors import VeilError
from veil.identity import CorePin, load_private_key
from veil_cli.enroll import enroll_locally


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `python -m veil_cli <role>` process; its output goes to a log file, or to this console if none.
    A core whose `python` is given (core.python: the vllm engine's own venv) runs as that interpreter's
    `python -m core_server.cli`, the core image's command, which needs nothing edge-side installed."""

    def __init__(self, role: str, env: dict[str, str], port: int, log_path: Path | None = None,
                 host: str = "127.0.0.1", config: str | None = None, python: str = ""):
        self.role, self.port, self.log_path = role, port, log_path
        self.url = f"http://{host}:{port}"
        options = ["--config", config] if config else []
        if python:
            if role != "core":
                raise VeilError("only the core runs with its own interpreter (core.python)")
            if not Path(python).is_file():
                raise VeilError(f"core.python {python} does not exist (the vllm engine's venv: make core-vllm)")
            command = [python, "-m", "core_server.cli"] + options
        else:
            command = [sys.executable, "-m", "veil_cli"] + options + [role]
        self._log: IO[str] | None = open(log_path, "w") if log_path is not None else None
        self.proc = subprocess.Popen(command, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT if self._log else None)

    def wait_ready(self, timeout: float = 180) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise VeilError(f"veil {self.role} exited during start-up (exit code {self.proc.returncode})"
                                + (f": {self.log()[-2000:]}" if self._log else ""))
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise VeilError(f"veil {self.role} was not ready after {timeout:.0f}s"
                        + (f": {self.log()[-2000:]}" if self._log else ""))

    def running(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        if self._log is None or self.log_path is None:
            return ""
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()


def base_env(home: Path, **settings: str) -> dict[str, str]:
    """This process's environment without VEIL_* leftovers, plus the given settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VEIL_")}
    env.update({"HF_HUB_OFFLINE": "1", "VEIL_HOME": str(home), "VEIL_LOG_LEVEL": "info"})
    env.update(settings)
    return env


def ready_all(*servers: Server, timeout: float = 180) -> None:
    """Wait for servers launched together, so that their start-ups (imports, weights) overlap; an edge launched
    beside its core answers /readyz once the core does. If one fails, all are stopped."""
    try:
        for server in servers:
            server.wait_ready(timeout)
    except BaseException:
        for server in servers:
            server.stop()
        raise


class VeilPair:
    """A core and an edge wired together, for API tests with the real openai client."""

    def __init__(self, tmp: Path, edge_bundle: Path, core_bundle: Path, key_file: Path, model_name: str,
                 core_env: dict[str, str] | None = None, edge_env: dict[str, str] | None = None):
        core_port, edge_port = free_port(), free_port()
        self.metrics_url = f"http://127.0.0.1:{free_port()}"
        self.wiring = enroll_locally(tmp / "core.key", tmp / "edge.key", tmp / "allowed_edges.yaml", 64)
        common = {"VEIL_BUNDLE_KEY_FILE": str(key_file), "VEIL_MODEL_NAME": model_name, **self.wiring}
        core_env = {"VEIL_CORE_METRICS_PORT": self.metrics_url.rsplit(":", 1)[1], **(core_env or {})}
        self.core_engine = core_env.get("VEIL_CORE_ENGINE", "native")
        self.core = Server("core", base_env(tmp, VEIL_CORE_PORT=str(core_port), VEIL_CORE_BUNDLE=str(core_bundle),
                                            **common, **core_env), core_port, tmp / f"core-{core_port}.log",
                           python=core_env.get("VEIL_CORE_PYTHON", ""))
        self.edge = Server("edge", base_env(tmp, VEIL_EDGE_PORT=str(edge_port), VEIL_EDGE_CORE_URL=self.core.url,
                                            VEIL_BUNDLE_EDGE_DIR=str(edge_bundle), **common, **(edge_env or {})),
                           edge_port, tmp / f"edge-{edge_port}.log")
        ready_all(self.core, self.edge)
        self.base_url = self.edge.url + "/v1"

    def core_transport(self, **kwargs: Any) -> HttpCoreTransport:
        """A sealed transport to this pair's core, as the edge (same key, same pin) would open it."""
        identity = load_private_key(Path(self.wiring["VEIL_EDGE_IDENTITY_KEY_FILE"]))
        return HttpCoreTransport(self.core.url, 60, identity=identity,
                                 pin=CorePin.parse(self.wiring["VEIL_EDGE_CORE_PUBLIC_KEY"]), **kwargs)

    def stop(self) -> None:
        for s in (self.edge, self.core):
            if s is not None:
                s.stop()
