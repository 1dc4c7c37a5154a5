"""Where a training step's time goes: `make train`'s step (tiny, micro-batch 16 x 128, its recipe's micro-steps,
Muon + AdamW) split into forward, backward, Muon's update and AdamW's, for each precision and compilation that
train.py's --dtype/--compile auto picks between, against its matmuls' time at this machine's measured peak."""
from __future__ import annotations

import argparse
import time

import torch

from layers import bf16_gemms_run_in_fp32
from machine import peak_matmul_flops
from model import GPT
from optim import BASE_RECIPE, RECIPES, make_optimizer, recipe_config
from training import flops_per_token

CANDIDATES = ("fp32", "fp32+compile", "bf16", "bf16+compile")
PARTS = ("forward", "backward", "muon", "adamw")


def bench_train_budget(preset: str = "tiny", micro_batch: int = 16, steps: int = 8) -> list[dict]:
    cfg = recipe_config(preset)
    s = argparse.Namespace(**BASE_RECIPE | RECIPES.get(preset, {}), muon_lr=None, weight_decay=0.1)
    accum = max(1, s.tokens_per_step // (micro_batch * cfg.max_seq_len))
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, cfg.vocab_size, (micro_batch, cfg.max_seq_len), generator=gen) for _ in "xy")
    tokens = micro_batch * cfg.max_seq_len * accum
    # Each dtype's peak timed once, before the steps. Muon's Newton-Schulz runs in bf16 unless this CPU's bf16
    # GEMMs are the slower kind (optim.py).
    peaks = {name: peak_matmul_flops(torch.device("cpu"), dtype) for name, dtype in
             (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    muon_peak = peaks["fp32" if bf16_gemms_run_in_fp32() else "bf16"]
    rows = []
    for name in CANDIDATES:
        dtype, _, compiled = name.partition("+")
        torch.manual_seed(0)
        model = GPT(cfg)
        opt = make_optimizer(model, s)
        forward = torch.compile(model) if compiled else model
        times = {part: [] for part in PARTS}
        for part, optimizer in zip(("muon", "adamw"), opt.parts.values()):  # the optimizers' own step hooks
            started = {}
            optimizer.register_step_pre_hook(lambda *_, started=started: started.update(t=time.perf_counter()))
            optimizer.register_step_post_hook(
                lambda *_, part=part, started=started: times[part].append(time.perf_counter() - started["t"]))
        for _ in range(steps):
            passes = {"forward": 0.0, "backward": 0.0}  # summed over the step's micro-steps
            for _ in range(accum):
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    _, loss = forward(x, y)
                t1 = time.perf_counter()
                loss.backward()
                passes["forward"] += t1 - t0
                passes["backward"] += time.perf_counter() - t1
            opt.step()
            opt.zero_grad(set_to_none=True)
            for part, seconds in passes.items():
                times[part].append(seconds)
        # Each part's median over the steps after the first two (the first compiles).
        per_step = {part: sorted(v[2:])[len(v[2:]) // 2] * 1e3 for part, v in times.items()}
        total = sum(per_step.values())
        peak = peaks[dtype]
        gemm_ms = flops_per_token(cfg, cfg.max_seq_len, model.num_params()) * tokens / peak * 1e3
        row = {"preset": preset, "step": name, "accum": accum, "tokens": tokens, "total_ms": total,
               "tok_s": tokens / total * 1e3, "gemms_at_peak_ms": gemm_ms, "peak_gflops": peak / 1e9,
               "muon_gemms_at_peak_ms": newton_schulz_flops(opt) / muon_peak * 1e3,
               **{f"{part}_ms": ms for part, ms in per_step.items()}}
        rows.append(row)
        print(f"train budget {name:13s}: " + "  ".join(f"{p} {per_step[p]:6.1f}" for p in PARTS) +
              f"  = {total:6.1f} ms/step ({row['tok_s']:,.0f} tok/s); at the {peak / 1e9:,.0f} GFLOP/s peak its "
              f"model matmuls take {gemm_ms:.1f} ms, Muon's {row['muon_gemms_at_peak_ms']:.1f}", flush=True)
    return rows


def newton_schulz_flops(opt) -> float:
    """Muon's matmul FLOPs in one step: per m x n matrix (m <= n) and iteration, X X^T (2 m^2 n), the Gram
    matrix squared (2 m^3) and its product with X (2 m^2 n)."""
    total = 0.0
    for group in opt.parts["muon"].param_groups:
        for p in group["params"]:
            m, n = sorted(p.shape)
            total += group["ns_steps"] * (4 * m * m * n + 2 * m ** 3)
    return total


def run(args) -> list[dict]:
    return bench_train_budget(args.recipe_preset)


def plot(rows: list[dict], ax_grid):
    fig, ax = ax_grid(figsize=(8, 4))
    bottom = [0.0] * len(rows)
    for part in PARTS:
        values = [r[f"{part}_ms"] for r in rows]
        ax.bar(range(len(rows)), values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.scatter(range(len(rows)), [r["gemms_at_peak_ms"] for r in rows], color="black", marker="_", s=600,
               label="its matmuls at the measured peak", zorder=3)
    ax.set_xticks(range(len(rows)), [f"{r['step']}\n{r['tok_s']:,.0f} tok/s" for r in rows])
    ax.set(ylabel="ms per optimizer step", title=f"{rows[0]['preset']}: where a training step's time goes "
           f"({rows[0]['tokens']:,} tokens, {rows[0]['accum']} micro-steps)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return fig
