"""The opt-in paths that change the numbers against the exact ones, in the same run: the 8-bit KV cache
(--kv-cache-dtype int8), int8 activations (--machine quant_kernel=avx512-int8, where AVX-512 VNNI runs them),
both, and bf16 weights (--dtype bf16 --quantize none, where the fused step runs them on AVX-512 BF16). A decode step's
time where the cache is short and where it is long, the cache's memory, greedy agreement with the exact path,
and the cost in bits per byte on held-out text."""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch

import data
from bench.common import CHAT_PROMPTS, int8_activations, named_bars, row_differences
from checkpoint import load_model
from engine import Engine, Request
from layers import bf16_kernel
from machine import MACHINE


def variants() -> dict[str, tuple[str, str, str | None]]:
    """name: (the weights, the KV cache's dtype, the machine pin of the kernels), the exact path first."""
    out = {"exact": ("default", "auto", None), "int8 KV cache": ("default", "int8", None)}
    if int8_activations():
        out |= {"int8 activations": ("default", "auto", int8_activations()),
                "both": ("default", "int8", int8_activations())}
    if bf16_kernel() != "none":
        out["bf16 weights"] = ("bf16", "auto", None)
    return out


def bench_int8(ckpt_path: str, new_tokens: int = 128, scored_windows: int = 16) -> list[dict]:
    """Each variant on the checkpoint's default weights (or bf16 ones) and step. Speed: a 16-row decode step once
    every row holds 128 or 1,024 slots (random prompt tokens, the prompts' pass not timed), and a 32-row one at 128.
    Greedy agreement: 32 chat prompts, 128 new tokens, end of text ignored. Then bits per byte of
    `scored_windows` 512-token windows of Hamlet and The Tempest, scored by the engine's own prompt pass (echo),
    so that every token attends over the cache it wrote, through the kernels of a many-token pass."""
    model, tok = load_model(ckpt_path)
    chosen = variants()
    models = {"default": model}
    if any(weights == "bf16" for weights, _, _ in chosen.values()):
        models["bf16"] = load_model(ckpt_path, dtype="bf16", quantize="none")[0]
    tokens_dir = Path("data") / f"shakespeare-{data.tokenizer_hash(tok)}"
    meta = data.prepare("shakespeare", tok, tokens_dir, splits=("val",))
    text = np.concatenate(data.load_shards(tokens_dir, meta, "val"))

    def pinned(pin: str | None):
        return MACHINE.pinned(pin) if pin else contextlib.nullcontext()

    rows = []
    for batch, slots in ((16, 128), (16, 1024), (32, 128)):
        for name, (weights, dtype, pin) in chosen.items():
            with pinned(pin):
                engine = Engine(models[weights], rows=batch, max_len=slots + 32, kv_cache_dtype=dtype,
                                prefill_tokens=batch * slots)
                g = torch.Generator().manual_seed(slots)
                for _ in range(batch):
                    engine.add(Request(torch.randint(100, tok.vocab_size, (slots,), generator=g).tolist(), 32,
                                       ignore_eos=True))
                for _ in range(3):  # the prompts' pass, then two decode steps
                    engine.step()
                t0, steps = time.perf_counter(), 16
                for _ in range(steps):
                    engine.step()
                step_s = (time.perf_counter() - t0) / steps
            rows.append({"workload": f"decode, {batch} rows of {slots} slots", "variant": name,
                         "step": engine.runner.step, "step_ms": 1e3 * step_s, "decode_tok_s": batch / step_s,
                         "cache_mb": sum(k.nbytes + v.nbytes for k, v in engine.runner.kv_cache) / 2**20})
            print(f"int8 {rows[-1]['workload']:30} {name:16}: {rows[-1]['step_ms']:5.1f} ms a step "
                  f"({rows[-1]['decode_tok_s']:6.1f} tok/s), cache {rows[-1]['cache_mb']:6.1f} MB")
    chat = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}]))
            for t in CHAT_PROMPTS.read_text().splitlines()[:32]]
    greedy = {}
    for name, (weights, dtype, pin) in chosen.items():
        with pinned(pin):
            engine = Engine(models[weights], rows=32, max_len=max(map(len, chat)) + new_tokens,
                            kv_cache_dtype=dtype)
            requests = [Request(p, new_tokens, ignore_eos=True) for p in chat]
            for _ in engine.run(requests):
                pass
        greedy[name] = [r.tokens for r in requests]
        if name != "exact":
            same = [new_tokens if d is None else d for d in row_differences(greedy[name], greedy["exact"])]
            rows.append({"workload": "greedy agreement", "variant": name,
                         "greedy_agreement": sum(same) / len(same) / new_tokens})
            print(f"int8 {name}: greedy tokens as the exact path's for {rows[-1]['greedy_agreement']:.0%} of "
                  f"{new_tokens} (32 chat prompts)")
    lengths = data.token_byte_lengths(tok)
    windows = [text[i * 512:(i + 1) * 512].tolist() for i in range(16, 16 + scored_windows)]
    for name, (weights, dtype, pin) in chosen.items():
        with pinned(pin):
            engine = Engine(models[weights], rows=8, max_len=513, tokenizer=tok, kv_cache_dtype=dtype)
            requests = [Request(w, 1, logprobs=0, echo=True) for w in windows]
            t0 = time.perf_counter()
            for _ in engine.run(requests):
                pass
        nats = -sum(lp for r in requests for lp, _ in r.token_logprobs[1:len(r.prompt)])
        size = sum(int(lengths[t]) for w in windows for t in w[1:])
        rows.append({"workload": "bits per byte", "variant": name, "val_bpb": nats / math.log(2) / size,
                     "seconds": time.perf_counter() - t0})
        print(f"int8 {name:16}: {rows[-1]['val_bpb']:.4f} bits per byte on {len(windows)} windows of 512 tokens, "
              f"scored in {rows[-1]['seconds']:.1f} s")
    return rows


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    return bench_int8(args.checkpoint, args.new_tokens)


def plot(rows: list[dict], ax_grid):
    fig, axes = ax_grid(1, 3, figsize=(16, 4.5))
    timed = [r for r in rows if "decode_tok_s" in r]
    named_bars(axes[0], {f"{r['workload'].removeprefix('decode, ')}: {r['variant']}": r["step_ms"] for r in timed},
               "ms per decode step")
    axes[0].set(title="decode step (lower is better)")
    named_bars(axes[1], {r["variant"]: r["cache_mb"] for r in timed if r["workload"].endswith("16 rows of 1024 slots")},
               "KV cache MB, 16 rows of 1,024 slots")
    axes[1].set(title="KV cache memory")
    named_bars(axes[2], {r["variant"]: r["val_bpb"] for r in rows if "val_bpb" in r}, "bits/byte")
    axes[2].set(title="held-out bits per byte (engine's prompt pass)")
    return fig
