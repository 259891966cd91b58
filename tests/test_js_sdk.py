"""The official `openai` JavaScript SDK against real edge and core servers: runs tests/js/openai_sdk.test.mjs
with node's built-in test runner (`make install` puts the SDK, pinned by tests/js/package-lock.json, in place)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SMOL_NAME

pytestmark = pytest.mark.slow

JS_DIR = Path(__file__).parent / "js"


@pytest.fixture(scope="session")
def node() -> str:
    """node, with the SDK installed: checked before the servers start, and a failure (never a skip) if absent."""
    path = shutil.which("node")
    if path is None:
        pytest.fail("these tests need node (v20 or later) on PATH")
    if not (JS_DIR / "node_modules" / "openai" / "package.json").is_file():
        pytest.fail("tests/js/node_modules is missing the openai SDK: run `make install` "
                    "(it runs `npm ci --prefix tests/js`)")
    return path


def test_openai_js_sdk_against_the_edge(node: str, smol_servers) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VEIL_")}
    env.update({"VEIL_BASE_URL": smol_servers.base_url, "VEIL_MODEL": SMOL_NAME, "NO_COLOR": "1"})
    proc = subprocess.run([node, "--test", "--test-reporter=spec", "openai_sdk.test.mjs"], cwd=JS_DIR, env=env,
                          capture_output=True, text=True, timeout=550)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"node --test exited with {proc.returncode}:\n{output}"
    assert "fail 0" in output, output
