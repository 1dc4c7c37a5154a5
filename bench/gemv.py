"""The matmuls of one batch-1 decode token, kernel by kernel: fp32, ours (every instruction set), aten's."""
from __future__ import annotations

import torch

from bench.common import named_bars, timed_interleaved
from checkpoint import load_checkpoint
from config import ModelConfig
from layers import kernel_isas, quantize_q4, quantize_q8


def bench_gemv(ckpt_path: str) -> list[dict]:
    """The matmuls of one decode token at batch 1 (all layers and the head, SmolLM2's shapes), one kernel
    after another: fp32, our int4/int8 kernels (each instruction set this CPU has) and aten's weight-only kernels
    (int8: _weight_int8pack_mm; int4 group 32: _weight_int4pack_mm_for_cpu), with bf16 or fp32 activations."""
    cfg = ModelConfig(**load_checkpoint(ckpt_path, mmap=True)["config"])
    d, h = cfg.d_model, cfg.n_kv_head * cfg.head_dim
    shapes = [(d, d), (h, d), (h, d), (d, d), (cfg.ffn_hidden, d), (cfg.ffn_hidden, d), (d, cfg.ffn_hidden)]
    shapes, head = shapes * cfg.n_layer, (cfg.vocab_size, d)
    g = torch.Generator().manual_seed(0)
    weights = {s: torch.randn(*s, generator=g) / s[1] ** 0.5 for s in set(shapes) | {head}}
    x = {k: torch.randn(1, k, generator=g) for k in (d, cfg.ffn_hidden)}
    q4, q8 = ({s: make(w) for s, w in weights.items()} for make in (quantize_q4, quantize_q8))

    def int4pack(w):  # aten's int4 layout: scales and zero points per group of 32 (w = (q - 8) * s + z)
        groups = w.view(w.size(0), -1, 32)
        low, step = groups.amin(-1), (groups.amax(-1) - groups.amin(-1)) / 15
        q = ((groups - low[..., None]) / step[..., None]).round().clamp(0, 15).to(torch.int32).view_as(w)
        scales_and_zeros = torch.stack([step.t(), (low + 8 * step).t()], -1)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_and_zeros
    packed4 = {s: int4pack(w) for s, w in weights.items() if s != head}
    every = shapes + [head]
    fns = {"fp32": [lambda s=s: torch.nn.functional.linear(x[s[1]], weights[s]) for s in every]}
    for isa in kernel_isas():
        fns[f"ours int4 {isa}"] = [lambda s=s, isa=isa: torch.ops.slm.q4_linear(
            x[s[1]], q4[s].qs, q4[s].d, q4[s].m, isa) for s in shapes] + \
            [lambda isa=isa: torch.ops.slm.q8_linear(x[d], q8[head].q, q8[head].s, isa)]
        fns[f"ours int8 {isa}"] = [lambda s=s, isa=isa: torch.ops.slm.q8_linear(
            x[s[1]], q8[s].q, q8[s].s, isa) for s in every]
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        fns[f"aten int8pack, {name} x"] = [lambda s=s, t=dtype: torch.ops.aten._weight_int8pack_mm(
            x[s[1]].to(t), q8[s].q, q8[s].s.view(-1).to(t)) for s in every]
        fns[f"aten int4pack, {name} x (head int8)"] = [lambda s=s, t=dtype: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x[s[1]].to(t), packed4[s][0], 32, packed4[s][1].to(t)) for s in shapes] + \
            [lambda t=dtype: torch.ops.aten._weight_int8pack_mm(x[d].to(t), q8[head].q, q8[head].s.view(-1).to(t))]
    seconds, _ = timed_interleaved({k: (lambda calls=calls: [c() for c in calls]) for k, calls in fns.items()})
    row = {"ms_per_token": {k: 1000 * v for k, v in seconds.items()}, "matmuls": len(every)}
    print("gemv ms per token: " + "  ".join(f"{k} {v:.1f}" for k, v in row["ms_per_token"].items()))
    return [row]


def run(args) -> list[dict]:
    return bench_gemv(args.checkpoint)


def plot(rows: list[dict], ax_grid):
    fig, ax = ax_grid(figsize=(10, 4))
    named_bars(ax, rows[0]["ms_per_token"], "ms per token")
    ax.set_title(f"The {rows[0]['matmuls']} matmuls of one SmolLM2 token at batch 1, by kernel (lower is better)")
    return fig
