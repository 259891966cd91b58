"""The import contracts in pyproject.toml hold, and they can fail: a copy of the tree with a forbidden
import planted in it is rejected, naming the contracts it breaks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["veil", "cloaking", "core_server", "edge_proxy", "admin", "privacy_audit", "veil_cli"]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


def _copy_tree(tmp: Path) -> Path:
    root = tmp / "tree"
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_contracts_hold_on_the_tree() -> None:
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


def test_a_forbidden_import_is_rejected(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    assert _lint(root).returncode == 0, "the copied tree alone must pass"
    (root / "core_server" / "planted.py").write_text("import edge_proxy.app  # the core reaching into the edge\n")
    (root / "admin" / "planted.py").write_text("import torch  # the admin plane touching tensors\n")
    (root / "veil" / "planted.py").write_text("import veil_cli.main  # the ground floor importing the root\n")
    result = _lint(root)
    assert result.returncode != 0
    for contract in ("the core imports nothing of the edge's trust domain BROKEN",
                     "the admin plane knows nothing of tensors BROKEN"):
        assert contract in " ".join(result.stdout.split()), result.stdout[-3000:]
    assert "veil.planted" in result.stdout and "core_server.planted" in result.stdout
