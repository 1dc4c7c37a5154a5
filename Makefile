# Two commands do everything on a fresh machine:  make train   and   make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

install: $(STAMP)

train: $(STAMP)
	$(PY) train.py --preset tiny --run-name tiny --time-budget 10
	$(PY) inference.py --checkpoint checkpoints/tiny --max-new-tokens 200 --output generated_texts/tiny_samples.md

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

.PHONY: install train test
