"""Prompt processing: a 16-token and a 512-token prompt through ours (the engine's own prefill, fused and eager),
transformers and llama-bench's pp test."""
from __future__ import annotations

import torch

from bench import llama
from bench.common import PROMPT, named_bars, timed_interleaved, transformers_model
from checkpoint import load_model
from engine import Engine, Request


def run(args) -> list[dict]:
    model, tok = load_model(args.checkpoint)
    ref = transformers_model(args.checkpoint)
    gguf, why = llama.gguf_of(args.checkpoint), llama.missing(args.checkpoint, "llama-bench")
    prompt, rows = tok.encode(PROMPT), []
    for length in (len(prompt), 512):
        ids = (prompt * (length // len(prompt) + 1))[:length]
        engines = {step: Engine(model, rows=1, max_len=length + 1, step=step) for step in ("fused", "eager")}
        fns = {f"ours auto {step}": (lambda e=engine: list(e.run([Request(ids, 1)])))
               for step, engine in engines.items()}
        fns["transformers fp32"] = lambda: ref(torch.tensor([ids]), logits_to_keep=1)
        with torch.inference_mode():
            seconds, _ = timed_interleaved(fns, 5)
        tok_s = {k: length / v for k, v in seconds.items()}
        if why is None:
            tok_s["llama.cpp Q4_1"] = llama.llama_bench(gguf, args.threads, length, 0)[f"pp{length}"]
        rows.append({"tokens": length, "tok_s": tok_s, "llama.cpp": why or "llama-bench"})
        print(f"prefill {length}: " + "  ".join(f"{k} {v:.0f}" for k, v in tok_s.items()))
    return rows


def plot(rows: list[dict], subplots):
    fig, axes = subplots(1, len(rows), figsize=(7 * len(rows), 4), squeeze=False)
    for ax, row in zip(axes[0], rows):
        named_bars(ax, row["tok_s"], "prompt tokens/s")
        ax.set_title(f"Prefill of a {row['tokens']}-token prompt (SmolLM2-135M)")
    return fig
