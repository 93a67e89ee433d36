# koret: two commands do all set-up.
#   make quickstart   create .venv, install, run the offline quickstart
#   make test         create/reuse .venv, install with the dev extra, run pytest
#
# torch: pinned to 2.13.0 by default. PyPI's Linux wheel of that version is a CUDA build on machines that
# need one; where a CPU wheel lies in pip's find-links (as on this project's CI machines) pip takes that.
# Use another build with e.g. `make test TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu'`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install install-dev quickstart test lint bench quality clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e '.[examples]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev,examples]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

quickstart: install
	HF_HUB_OFFLINE=1 $(BIN)/koret run -c configs/quickstart.yaml

test: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check koret tests scripts

bench: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench.py

# the quality study on multilingual-e5-small and KorQuAD (needs ../shared; about 20 minutes an arm on 2 cores, one arm at a time, resumes)
quality: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/quality.py $(QUALITY_ARGS)

clean:
	rm -rf runs .pytest_cache
