# ipshield: two commands do all the set-up on a fresh machine.
#   make demo   - make the data, pretrain (or reuse) the small CLIP, run the main job
#   make test   - run the test suite
# Both create or reuse .venv and install what they need.
# CPU path: torch==2.13.0 (the CPU wheel). GPU users: `make setup TORCH_SPEC="torch --index-url <cuda index>"`
# or install torch first into .venv; an installed torch is kept.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
TORCH_SPEC  ?= torch==2.13.0
OUT         ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[test]"
	@# torchvision breaks the CPU torch build and transformers imports it when present.
	@$(PY) -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torchvision') is not None and not __import__('torch').cuda.is_available())" || \
	  (echo "torchvision is installed on a CPU-only torch: removing it (it breaks transformers' CLIP)"; $(PIP) uninstall -y -q torchvision)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/ipshield demo --out $(OUT)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/ipshield bench embedded --out runs/bench-embedded

clean:
	rm -rf runs .pytest_cache
