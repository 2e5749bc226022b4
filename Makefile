# Two commands set everything up (see README): `make repro` and `make test`. Both are idempotent: the venv is
# built once (torch pinned first: torch==2.13.0 is a local CPU wheel here, an open range pulls a CUDA build), and
# rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# dvc.yaml stages call the `fluent-reward` console script: make the venv's bin win on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: repro test lint format bench clean-venv

repro: $(STAMP)
	$(BIN)/dvc repro
	$(BIN)/fluent-reward outputs

test: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/fluent-reward rubric --check    # docs/JUDGING_CRITERIA.md matches YOUR rubric.yaml (`dvc repro` refreshes it)
	$(BIN)/pytest

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/scoring.py
	$(BIN)/python bench/judge_throughput.py

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
