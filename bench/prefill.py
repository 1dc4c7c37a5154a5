"""A 512-token prompt through each model (last-position logits): ours, transformers, llama.cpp."""
from __future__ import annotations

import torch

from bench.common import contenders, named_bars, timed_interleaved


def bench_prefill(ckpt_path: str, threads: int, length: int = 512) -> list[dict]:
    """A 512-token prompt through each model (last-position logits): ours (quantized layers run their GEMM on
    the dequantized weights at this size), transformers, llama.cpp."""
    ours, _, ref, llm = contenders(ckpt_path, threads)
    ids = torch.randint(0, ref.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    fns = {f"ours {fmt}": (lambda m=m: m(ids, last_only=True)) for fmt, m in ours.items()}
    fns["transformers fp32"] = lambda: ref(ids, logits_to_keep=1)
    if llm is not None:
        fns["llama.cpp Q4_1"] = lambda: (llm.reset(), llm.eval(ids[0].tolist()))
    with torch.inference_mode():
        seconds, _ = timed_interleaved(fns)
    row = {"tokens": length, "tok_s": {k: length / v for k, v in seconds.items()},
           "llama.cpp": "not installed" if llm is None else "measured"}
    print(f"prefill 1x{length}: " + "  ".join(f"{k} {v:.0f}" for k, v in row["tok_s"].items()))
    return [row]


def run(args) -> list[dict]:
    return bench_prefill(args.checkpoint, args.threads)


def plot(rows: list[dict], ax_grid):
    fig, ax = ax_grid(figsize=(8, 4))
    named_bars(ax, rows[0]["tok_s"], "prompt tokens/s")
    ax.set_title(f"Prefill of a {rows[0]['tokens']}-token prompt (SmolLM2-135M)")
    return fig
