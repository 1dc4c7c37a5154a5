"""What every bench section shares: interleaved timing, the machine's own rates, the contenders and their outputs."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from layers import bf16_gemms_run_in_fp32, kernel_isas
from machine import peak_matmul_flops

PROMPT = "The quick brown fox jumps over the lazy dog while the sun sets behind the hills"  # 16 SmolLM2 tokens
ROOT = Path(__file__).resolve().parent.parent
CHAT_PROMPTS = ROOT / "prompts" / "chat.txt"


def timed_interleaved(fns: dict, repeats: int = 3) -> tuple[dict, dict]:
    """Median seconds per call of each fn, and the seconds of its warm-up call (which includes any compile).
    The timed calls take turns (a, b, c, a, b, c, ...), so that a drift in the machine's speed (it is
    shared) hits every contender alike instead of the one that happens to run last."""
    warmups, times = {}, {name: [] for name in fns}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        warmups[name] = time.perf_counter() - t0
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}, warmups


def int8_activations() -> str | None:
    """The pin of the opt-in int8 kernels (activations rounded to 8 bits, as llama.cpp and OpenVINO do) where this
    CPU runs them with vector instructions (AVX-512 VNNI), else None."""
    return "quant_kernel=avx512-int8" if "avx512-int8" in kernel_isas() else None


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of fn() after one warm-up call."""
    return timed_interleaved({"fn": fn}, repeats)[0]["fn"]


def machine_facts() -> dict:
    """What bounds the figures: GEMM rate per dtype and the rate of reading memory (256 MB, past any cache)."""
    facts = {"cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                          if line.startswith("model name")), "unknown"), "threads": torch.get_num_threads()}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        # Where bf16 is the slow kind (emulated under an AVX2 cap, minutes at 2048), a smaller matmul says as much.
        n = 512 if dtype == torch.bfloat16 and bf16_gemms_run_in_fp32() else 2048
        facts[f"matmul_gflops_{name}"] = peak_matmul_flops(torch.device("cpu"), dtype, n=n, repeats=5) / 1e9
    big = torch.ones(64 * 2 ** 20)
    facts["memory_read_gb_s"] = big.numel() * 4 / timed(big.sum, 5) / 1e9
    facts["bf16_gemms_in_fp32"] = bf16_gemms_run_in_fp32()  # layers.Linear's choice for this process
    print(", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in facts.items()))
    return facts


def transformers_model(ckpt_path: str):
    """transformers' LlamaForCausalLM on the same weights, through our to-hf export (as a user would run it)."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "convert.py", "to-hf", ckpt_path, "--out", tmp], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()


def row_differences(a: list[list[int]], b: list[list[int]]) -> list[int | None]:
    """Per row, the index of the first generated token where two runs differ; None where they agree."""
    return [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), None) for ra, rb in zip(a, b)]


def first_difference(a: list[list[int]], b: list[list[int]]) -> int | None:
    """Index of the first generated token where two runs differ, in any row; None when they agree."""
    return min((d for d in row_differences(a, b) if d is not None), default=None)


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def start_server(command: list[str], health_url: str, log: Path, threads: int) -> subprocess.Popen:
    """A server process on `threads` threads, once health_url answers 200 (its log in `log`). vLLM's CPU engine
    gets 4 GB of KV cache, as its documentation starts it."""
    import httpx

    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                              env=os.environ | {"OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE": "4"})
    deadline = time.time() + 900
    while time.time() < deadline and server.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(health_url, timeout=5).status_code == 200:
                return server
        time.sleep(1)
    server.kill()
    raise RuntimeError(f"{command[1]} did not start; see {log}")


def named_bars(ax, values: dict, unit: str) -> None:
    """One bar per contender, ours in one colour, the peers in another, each with its figure."""
    names = list(values)
    colours = ["tab:blue" if n.startswith("ours") else "tab:orange" for n in names]
    ax.bar(range(len(names)), [values[n] for n in names], color=colours)
    ax.set_xticks(range(len(names)), [n.replace(" ", "\n", 2) for n in names], fontsize=7)
    for i, n in enumerate(names):
        ax.text(i, values[n], f"{values[n]:.1f}" if values[n] < 100 else f"{values[n]:.0f}", ha="center",
                va="bottom", fontsize=7)
    ax.set_ylabel(unit)
    ax.grid(alpha=0.3, axis="y")


