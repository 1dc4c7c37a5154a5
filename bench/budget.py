"""Where a decode step's time goes, at each batch: the whole fused step (through generate()), its matmuls alone
(the same kernel calls on the same weights and shapes), and the rest by difference (attention, norms, RoPE, KV
writes, the barriers between phases, sampling and the engine's Python)."""
from __future__ import annotations

import time

import torch

from bench.common import PROMPT, timed
from checkpoint import load_model
from engine import generate
from layers import QuantLinear, int16_kernel, int16_rows, quant_kernel


def run(args) -> list[dict]:
    model, tok = load_model(args.checkpoint)
    prompt = tok.encode(PROMPT)
    # The matmuls a fused step runs: q/k/v and gate/up fused, o and down, and the head.
    layers = [m for name, m in model.named_modules() if isinstance(m, QuantLinear) and
              (name.endswith(("fused.fused", "o_proj", "down_proj")) or name == "embed_tokens.head")]
    if not layers:
        print("budget: this checkpoint has no int4/int8 layers (the fused step's kernels); nothing to split")
        return []
    rows = []
    for batch in args.batches:  # the kernels the runner takes for a pass of `batch` tokens
        isa = int16_kernel() if int16_kernel() != "none" and batch <= int16_rows() else quant_kernel()
        generate(model, [prompt] * batch, 16)  # warm-up
        _, stats = generate(model, [prompt] * batch, args.new_tokens)
        step_s = stats["decode_s"] / stats["decode_steps"]
        x = [torch.randn(batch, m.in_features) for m in layers]

        def matmuls():
            for m, xm in zip(layers, x):
                if m.fmt == "q4":
                    torch.ops.slm.q4_linear(xm, m.qs, m.d, m.m, isa)
                else:
                    torch.ops.slm.q8_linear(xm, m.q, m.s, isa)
        weights_s = timed(matmuls, 5)
        flops = sum(2 * batch * m.in_features * m.out_features for m in layers)
        row = {"batch": batch, "step_ms": 1e3 * step_s, "matmuls_ms": 1e3 * weights_s,
               "rest_ms": 1e3 * (step_s - weights_s), "matmul_gflop": flops / 1e9,
               "matmul_gflops": flops / weights_s / 1e9, "tok_s": batch / step_s, "kernel": isa,
               "matmul_calls": len(layers), "measured_at": time.strftime("%H:%M:%S")}
        rows.append(row)
        print(f"budget batch {batch}: step {row['step_ms']:.1f} ms = matmuls {row['matmuls_ms']:.1f} "
              f"({row['matmul_gflops']:.0f} GFLOP/s) + the rest {row['rest_ms']:.1f}")
    return rows


def plot(rows: list[dict], subplots):
    fig, ax = subplots(1, 1, figsize=(6, 4))
    labels = [f"batch {r['batch']}" for r in rows]
    matmuls, rest = [r["matmuls_ms"] for r in rows], [r["rest_ms"] for r in rows]
    ax.bar(labels, matmuls, label="matmuls (kernels alone)")
    ax.bar(labels, rest, bottom=matmuls, label="the rest (attention, norms, sampling, Python)")
    ax.set(ylabel="ms per decode step", title="The fused step's time budget (SmolLM2-135M, int4)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return fig
