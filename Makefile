# Two commands do everything on a fresh machine:  make train   and   make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUDGET ?= 10   # minutes of training for `make train`
DEV_STAMP := $(VENV)/.installed-dev

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Test-only deps: the transformers reference, gradio + playwright, and Debian's chromium for the browser test.
$(DEV_STAMP): $(STAMP) requirements-dev.txt requirements-app.txt
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt -r requirements-app.txt
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	touch $@

install: $(STAMP)

train: $(STAMP)
	$(PY) train.py --preset tiny --run-name tiny --time-budget $(BUDGET)
	$(PY) inference.py --checkpoint checkpoints/tiny --max-new-tokens 200 --output generated_texts/tiny_samples.md

test: $(DEV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

.PHONY: install train test
