# The two commands: `make demo` (TLM on the real SmolLM2 demo model, CPU) and `make test` (the whole suite).
# Both create .venv and install what is missing; nothing here reads ../shared.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llamafactory-tlm-installed
# OpenAI Evals ships the offline demo/AdaptEval data; its own dependency list is large and unneeded here.
EVALS := evals==3.0.1.post1

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,demo,offline]'
	$(PY) -m pip install --quiet --no-deps $(EVALS)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tlm_plugin.demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/bench_tlm.py
	$(PY) bench/bench_sift.py

clean:
	rm -rf saves .pytest_cache .ruff_cache
