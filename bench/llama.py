"""llama.cpp's own C++ tools, as its users run them: llama-bench, llama-batched-bench and llama-server, built by
`make bench-install` (bench/llama_cpp.sh) from the llama.cpp tree in llama-cpp-python's source package, on the
checkpoint's own GGUF file."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench.common import ROOT
from checkpoint import load_checkpoint

BIN = ROOT / ".cache" / "llama.cpp" / "build" / "bin"


def tool(name: str) -> Path | None:
    """The path of one of llama.cpp's binaries, or None where `make bench-install` has not built it."""
    path = BIN / name
    return path if path.is_file() else None


def gguf_of(ckpt_path: str) -> Path | None:
    """The GGUF file a checkpoint was converted from (convert.py records it), where it is still there."""
    source = load_checkpoint(ckpt_path, mmap=True).get("source")
    return Path(source) if source and str(source).endswith(".gguf") and Path(source).is_file() else None


def missing(ckpt_path: str, name: str) -> str | None:
    """Why llama.cpp cannot run here ("not installed", "no GGUF"), or None when it can."""
    if tool(name) is None:
        return "not installed (make bench-install)"
    if gguf_of(ckpt_path) is None:
        return "no GGUF file for this checkpoint"
    return None


def llama_bench(gguf: Path, threads: int, prompt: int, new_tokens: int, repeats: int = 5) -> dict:
    """llama-bench: prompt processing (pp) and token generation (tg) rates, tokens/s (mean of its repeats)."""
    done = subprocess.run([str(tool("llama-bench")), "-m", str(gguf), "-t", str(threads), "-p", str(prompt),
                           "-n", str(new_tokens), "-r", str(repeats), "-o", "json"], capture_output=True, text=True,
                          check=True)
    rates = {}
    for test in json.loads(done.stdout):
        kind = "pp" if test["n_gen"] == 0 else "tg"
        rates[f"{kind}{test['n_prompt'] or test['n_gen']}"] = test["avg_ts"]
    return rates


def batched_bench(gguf: Path, threads: int, prompt: int, new_tokens: int, parallel: list[int]) -> list[dict]:
    """llama-batched-bench: `parallel` sequences at once, each a `prompt`-token prompt then `new_tokens` tokens.
    One row per level: speed_pp and speed_tg (tokens/s of all sequences) and speed (both, over the wall time)."""
    done = subprocess.run([str(tool("llama-batched-bench")), "-m", str(gguf), "-t", str(threads), "-c",
                           str(max(parallel) * (prompt + new_tokens) + 64), "-npp", str(prompt), "-ntg",
                           str(new_tokens), "-npl", ",".join(map(str, parallel)), "--output-format", "jsonl"],
                          capture_output=True, text=True, check=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def server_command(gguf: Path, threads: int, port: int, parallel: int, context: int, *extra: str) -> list[str]:
    """llama-server with `parallel` slots of `context / parallel` tokens each."""
    return [str(tool("llama-server")), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-np",
            str(parallel), "-c", str(context), "--host", "127.0.0.1", "--port", str(port), *extra]
