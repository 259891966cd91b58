"""helm/veil-core/files/fetch-bundle.py, the url-source init container, against a local server."""

from __future__ import annotations

import hashlib
import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "helm" / "veil-core" / "files" / "fetch-bundle.py"
FILES = {"core.json": b'{"layers": 2}', "core.safetensors": bytes(range(256)) * 4096}


@pytest.fixture
def server() -> Iterator[tuple[str, list[str | None]]]:
    seen_auth: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen_auth.append(self.headers.get("Authorization"))
            body = FILES.get(self.path.rsplit("/", 1)[-1])
            if body is None or not self.path.startswith("/bundles/core/"):
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/bundles/core/", seen_auth
    finally:
        httpd.shutdown()
        httpd.server_close()


def fetch(base: str, dest: Path, sums: dict[str, str], auth: str = "") -> subprocess.CompletedProcess:
    env = {
        "BUNDLE_BASE_URL": base,
        "BUNDLE_FILES": ",".join(FILES),
        "BUNDLE_SHA256": json.dumps(sums),
        "BUNDLE_DEST": str(dest),
        "BUNDLE_AUTHORIZATION": auth,
    }
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def test_downloads_and_verifies_every_file(server: tuple[str, list], tmp_path: Path) -> None:
    base, seen_auth = server
    sums = {name: hashlib.sha256(body).hexdigest() for name, body in FILES.items()}
    result = fetch(base, tmp_path, sums, auth="Bearer t0ken")
    assert result.returncode == 0, result.stderr
    for name, body in FILES.items():
        assert (tmp_path / name).read_bytes() == body
    assert not list(tmp_path.glob("*.part"))
    assert seen_auth == ["Bearer t0ken"] * len(FILES)


def test_checksum_mismatch_fails_and_leaves_nothing(server: tuple[str, list], tmp_path: Path) -> None:
    base, _ = server
    result = fetch(base, tmp_path, {"core.json": "0" * 64})
    assert result.returncode != 0
    assert "does not match" in result.stderr
    assert not (tmp_path / "core.json").exists() and not list(tmp_path.glob("*.part"))


def test_missing_file_fails_at_once(server: tuple[str, list], tmp_path: Path) -> None:
    base, _ = server
    result = fetch(base.replace("/core/", "/other/"), tmp_path, {})
    assert result.returncode != 0 and "HTTP 404" in result.stderr
