# The two commands: `make demo` (TLM on the real SmolLM2 demo model, CPU) and `make test` (the whole suite).
# Both create .venv and install what is missing; nothing here reads ../shared.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_STAMP := $(VENV)/.llamafactory-tlm-demo
DEV_STAMP := $(VENV)/.llamafactory-tlm-dev
# OpenAI Evals ships the offline demo/AdaptEval data; its own dependency list is large and unneeded here.
EVALS := evals==3.0.1.post1
# Optional: a torch index to install torch from first, e.g. https://download.pytorch.org/whl/cpu for a CPU-only
# torch (about 5 GB less than PyPI's CUDA build).
TORCH_INDEX ?=

.PHONY: install demo test test-ui lint bench clean test-floor gpu-check-cpu

install: $(DEV_STAMP)

# The demo: the project, LLaMA-Factory, the demo model's converter and the data package; nothing else.
$(DEMO_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install --quiet torch --index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e '.[demo]'
	$(PY) -m pip install --quiet --no-deps $(EVALS)
	touch $(DEMO_STAMP)

# Development: the demo's set plus the test tools, the CPU backends (DeepSpeed, Ray), faiss and AdaptEval's packages.
$(DEV_STAMP): $(DEMO_STAMP)
	$(PY) -m pip install --quiet -e '.[dev,demo,offline,adapteval]'
	touch $(DEV_STAMP)

demo: $(DEMO_STAMP)
	$(PY) -m tlm_plugin.demo

lint: $(DEV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest

# Stage tlm in LlamaBoard, driven in headless Chromium: Debian's chromium and chromium-driver (installed with apt-get
# when missing; needs root), Selenium from the dev extra. `make test` runs the same test whenever they are present.
test-ui: $(DEV_STAMP)
	command -v chromedriver >/dev/null && (command -v chromium || command -v chromium-browser) >/dev/null || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -rs tests/ui

# The declared lower bounds, installed exactly in their own venv (Python 3.11, LLaMA-Factory's floor), and the
# backend, skip and resume tests run there; the demo model is converted again with the floor's gguf/transformers.
FLOOR_VENV ?= .venv-floor
FLOOR_PYTHON ?= python3.11
FLOOR_TESTS := tests/train/test_backends.py tests/train/test_gpu_paths.py tests/train/test_deepspeed_paths.py \
	tests/train/test_resume.py tests/train/test_ranks.py tests/train/test_cli.py tests/test_assets.py

test-floor:
	test -x $(FLOOR_VENV)/bin/python || $(FLOOR_PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOOR_VENV)/bin/python tests/floor_requirements.py > $(FLOOR_VENV)/floors.txt
	$(FLOOR_VENV)/bin/python -m pip install --quiet -e '.[dev,demo,offline,adapteval]' -r $(FLOOR_VENV)/floors.txt
	$(FLOOR_VENV)/bin/python -m pip install --quiet --no-deps $(EVALS)
	$(FLOOR_VENV)/bin/python tests/floor_requirements.py --check
	HF_HUB_OFFLINE=1 LLAMAFACTORY_TLM_CACHE=$(CURDIR)/$(FLOOR_VENV)/cache $(FLOOR_VENV)/bin/python -m pytest -p no:cacheprovider $(FLOOR_TESTS)
	$(FLOOR_VENV)/bin/python tests/floor_requirements.py --check

# The air-gapped GPU check, proven on this CPU: prepare the bundle (needs PyPI), then run it with no network at all
# (a network namespace; needs root) beside a venv that holds only torch / transformers / accelerate / peft.
gpu-check-cpu: $(DEV_STAMP)
	$(PY) bench/gpu_check_cpu.py

bench: $(DEV_STAMP)
	$(PY) bench/bench_tlm.py
	$(PY) bench/bench_sift.py

clean:
	rm -rf saves .pytest_cache .ruff_cache
