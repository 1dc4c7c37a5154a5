"""vLLM's CPU engine and OpenVINO GenAI, as their users run them, each in a venv of its own (bench/peers.sh,
run by `make bench-install`): the Hugging Face export they load (convert.py to-hf, the same weights as ours),
OpenVINO's exports, a fixed batch through either (bench/peer_run.py, in the peer's venv), and vLLM's server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT

PEERS = ROOT / ".cache" / "peers"
OPENVINO_FORMATS = {"fp16": [], "int8": [], "int4": ["--group-size", "32"]}  # 576 is not a multiple of 128


def python_of(peer: str) -> Path | None:
    """The peer venv's python ("vllm" or "openvino"), or None where bench/peers.sh has not made it."""
    path = PEERS / peer / "bin" / "python"
    return path if path.is_file() else None


def missing(peer: str) -> str | None:
    return None if python_of(peer) else "not installed (make bench-install)"


def hf_export(ckpt_path: str) -> Path:
    """The checkpoint as a Hugging Face directory, made once."""
    out = PEERS / f"hf-{Path(ckpt_path).name}"
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, "convert.py", "to-hf", ckpt_path, "--out", str(out)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    return out


def openvino_export(ckpt_path: str, fmt: str) -> Path:
    """optimum-cli's OpenVINO export of the checkpoint with `fmt` weights (fp16, int8 or int4), made once."""
    out = PEERS / f"ov-{Path(ckpt_path).name}-{fmt}"
    if not (out / "openvino_model.xml").is_file():
        cli = python_of("openvino").parent / "optimum-cli"
        subprocess.run([str(cli), "export", "openvino", "--model", str(hf_export(ckpt_path)), "--task",
                        "text-generation-with-past", "--weight-format", fmt, *OPENVINO_FORMATS[fmt], str(out)],
                       check=True, stdout=subprocess.DEVNULL)
    return out


def fixed_batch(peer: str, model_dir: Path, prompt: str, batch: int, new_tokens: int, threads: int) -> dict:
    """{"seconds": of one timed batch, "first_row": its first row's new token ids}, from the peer's own venv."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE": "4"}
    done = subprocess.run([str(python_of(peer)), str(ROOT / "bench" / "peer_run.py"), peer, str(model_dir), prompt,
                           str(batch), str(new_tokens), str(threads)], capture_output=True, text=True, env=env,
                          timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{peer} failed: {done.stderr[-1500:]}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"seconds"')))


def vllm_server_command(ckpt_path: str, port: int, rows: int) -> list[str]:
    """vLLM's OpenAI server on the same weights in bf16, `rows` sequences at once (the `vllm` command looks for a
    distribution named vllm, which vllm-cpu is not, so the module runs instead)."""
    return [str(python_of("vllm")), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_export(ckpt_path)),
            "--served-model-name", Path(ckpt_path).name, "--dtype", "bfloat16", "--max-num-seqs", str(rows),
            "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port)]
