# Two commands do everything on a fresh machine:  make train   and   make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUDGET ?= 10   # minutes of training for `make train`
DEV_STAMP := $(VENV)/.installed-dev
LOCK := requirements.lock
# Every install goes through the lock: exact versions of every direct and transitive dependency.
PIP_INSTALL := $(PY) -m pip install -q -c $(LOCK)
# The CPU kernels capped at AVX2 (no AVX-512, bf16 or AMX instructions), as on the smaller of our machines.
AVX2_ENV := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2

$(STAMP): requirements.txt $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -r requirements.txt
	$(PY) -c "import layers; layers.quant_ops()"   # builds kernels.cpp + step.cpp for this CPU, once
	touch $@

# Test-only deps: the transformers and openai references, gradio + playwright, and Debian's chromium.
$(DEV_STAMP): $(STAMP) requirements-dev.txt requirements-app.txt
	$(PIP_INSTALL) -r requirements.txt -r requirements-dev.txt -r requirements-app.txt
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	touch $@

install: $(STAMP)

train: $(STAMP)
	$(PY) train.py --preset tiny --run-name tiny --time-budget $(BUDGET)
	$(PY) inference.py --checkpoint checkpoints/tiny --max-new-tokens 100 --output checkpoints/tiny/samples.md

test: $(DEV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests
	# The kernels, the model and the engine again with the CPU capped at AVX2, as on the smallest of our machines
	# (under a minute; torch.compile's steps are left to `make test-avx2`, which runs every test capped).
	$(AVX2_ENV) $(PY) -m pytest -q -k "not compiled" tests/test_layers.py tests/test_quantize.py tests/test_model.py tests/test_runner.py tests/test_engine.py

# Optional: bench's peers. llama.cpp's own tools (llama-bench, llama-batched-bench, llama-server), built from the
# llama.cpp tree in llama-cpp-python's source package on PyPI into .cache/llama.cpp (about 7 minutes, once);
# vLLM's CPU engine and OpenVINO GenAI, each in a venv of its own under .cache/peers.
bench-install: $(DEV_STAMP)
	sh bench/llama_cpp.sh .cache/llama.cpp
	PYTHON=$(PYTHON) sh bench/peers.sh .cache/peers

test-avx2: $(DEV_STAMP)
	$(AVX2_ENV) $(PY) -m pytest -q tests

# Re-resolve every requirement set to its newest allowed versions; run `make test` after, and commit both.
# torch keeps its plain pin (pip-compile writes the local wheel's +cpu label, which other machines lack).
lock: $(STAMP)
	$(PY) -m pip install -q pip-tools==7.6.2
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile -q --strip-extras --no-emit-find-links --no-emit-index-url --output-file $(LOCK) \
		requirements.txt requirements-dev.txt requirements-app.txt
	sed -i 's/^torch==.*/torch==2.13.0/' $(LOCK)

.PHONY: install train test test-avx2 bench-install lock
