"""The 8-bit KV cache (--kv-cache-dtype int8) against the exact one, in the same run: a decode step's time where
the cache is short and where it is long, its memory, greedy agreement, and its cost in bits per byte on held-out
text."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

import data
from bench.common import CHAT_PROMPTS, named_bars, row_differences
from checkpoint import load_model
from engine import Engine, Request

DTYPES = ("auto", "int8")


def bench_kv_cache(ckpt_path: str, new_tokens: int = 128, scored_windows: int = 16) -> list[dict]:
    """The exact cache (auto) and the 8-bit one on the checkpoint's default weights and step. Speed: a 16-row
    decode step once every row holds 128 or 1,024 slots (random prompt tokens, the prompts' pass not timed).
    Greedy agreement: 32 chat prompts, 128 new tokens, end of text ignored. Then bits per byte of
    `scored_windows` 512-token windows of Hamlet and The Tempest, scored by the engine's own prompt pass (echo),
    so that every token attends over the cache it wrote."""
    model, tok = load_model(ckpt_path)
    tokens_dir = Path("data") / f"shakespeare-{data.tokenizer_hash(tok)}"
    meta = data.prepare("shakespeare", tok, tokens_dir, splits=("val",))
    text = np.concatenate(data.load_shards(tokens_dir, meta, "val"))
    rows = []
    for slots in (128, 1024):
        for dtype in DTYPES:
            engine = Engine(model, rows=16, max_len=slots + 32, kv_cache_dtype=dtype, prefill_tokens=16 * slots)
            g = torch.Generator().manual_seed(slots)
            for _ in range(16):
                engine.add(Request(torch.randint(100, tok.vocab_size, (slots,), generator=g).tolist(), 32,
                                   ignore_eos=True))
            for _ in range(3):  # the prompts' pass, then two decode steps
                engine.step()
            t0, steps = time.perf_counter(), 16
            for _ in range(steps):
                engine.step()
            step_s = (time.perf_counter() - t0) / steps
            rows.append({"workload": f"decode, 16 rows of {slots} slots", "kv_cache_dtype": dtype,
                         "step": engine.runner.step, "step_ms": 1e3 * step_s, "decode_tok_s": 16 / step_s,
                         "cache_mb": sum(k.nbytes + v.nbytes for k, v in engine.runner.kv_cache) / 2**20})
            print(f"kv-cache {rows[-1]['workload']:30} {dtype:4}: {rows[-1]['step_ms']:5.1f} ms a step "
                  f"({rows[-1]['decode_tok_s']:5.1f} tok/s), cache {rows[-1]['cache_mb']:6.1f} MB")
    chat = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}]))
            for t in CHAT_PROMPTS.read_text().splitlines()[:32]]
    greedy = {}
    for dtype in DTYPES:
        engine = Engine(model, rows=32, max_len=max(map(len, chat)) + new_tokens, kv_cache_dtype=dtype)
        requests = [Request(p, new_tokens, ignore_eos=True) for p in chat]
        for _ in engine.run(requests):
            pass
        greedy[dtype] = [r.tokens for r in requests]
    same = [new_tokens if d is None else d for d in row_differences(greedy["int8"], greedy["auto"])]
    rows.append({"workload": "greedy agreement", "kv_cache_dtype": "int8",
                 "greedy_agreement": sum(same) / len(same) / new_tokens})
    print(f"kv-cache int8: greedy tokens as the exact cache's for {rows[-1]['greedy_agreement']:.0%} of "
          f"{new_tokens} (32 chat prompts)")
    lengths = data.token_byte_lengths(tok)
    windows = [text[i * 512:(i + 1) * 512].tolist() for i in range(16, 16 + scored_windows)]
    for dtype in DTYPES:
        engine = Engine(model, rows=8, max_len=513, tokenizer=tok, kv_cache_dtype=dtype)
        requests = [Request(w, 1, logprobs=0, echo=True) for w in windows]
        t0 = time.perf_counter()
        for _ in engine.run(requests):
            pass
        nats = -sum(lp for r in requests for lp, _ in r.token_logprobs[1:len(r.prompt)])
        size = sum(int(lengths[t]) for w in windows for t in w[1:])
        rows.append({"workload": "bits per byte", "kv_cache_dtype": dtype, "val_bpb": nats / math.log(2) / size,
                     "seconds": time.perf_counter() - t0})
        print(f"kv-cache {dtype:4}: {rows[-1]['val_bpb']:.4f} bits per byte on {len(windows)} windows of 512 tokens")
    return rows


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    return bench_kv_cache(args.checkpoint, args.new_tokens)


def plot(rows: list[dict], ax_grid):
    fig, axes = ax_grid(1, 3, figsize=(15, 4))
    timed = [r for r in rows if "decode_tok_s" in r]
    for ax, key, unit in ((axes[0], "step_ms", "ms per 16-row decode step"), (axes[1], "cache_mb", "KV cache MB")):
        named_bars(ax, {f"ours {r['workload'].split(', ')[1]} {r['kv_cache_dtype']}": r[key] for r in timed}, unit)
        ax.set(title=unit)
    named_bars(axes[2], {f"ours {r['kv_cache_dtype']}": r["val_bpb"] for r in rows if "val_bpb" in r}, "bits/byte")
    axes[2].set(title="held-out bits per byte (engine's prompt pass)")
    return fig
