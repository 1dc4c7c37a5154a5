"""The 8-bit KV cache (--kv-cache-dtype int8) against the exact one, in the same run: decode speed where the cache
is small (32 chat rows) and where it is most of what a step reads (long prompts), its memory, greedy agreement,
and its cost in bits per byte on held-out text."""
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
    """Per workload, the exact cache (auto) and the 8-bit one on the checkpoint's default weights and step:
    'chat' is 32 chat prompts, 'long' 16 prompts of 1,024 tokens of Hamlet and The Tempest (each row then reads
    ~1,100 slots a step); greedy, end of text ignored. Then bits per byte of `scored_windows` 512-token
    windows of the same text, scored by the engine's own prompt pass (echo), so that every token attends over
    the cache it wrote."""
    model, tok = load_model(ckpt_path)
    tokens_dir = Path("data") / f"shakespeare-{data.tokenizer_hash(tok)}"
    meta = data.prepare("shakespeare", tok, tokens_dir, splits=("val",))
    text = np.concatenate(data.load_shards(tokens_dir, meta, "val"))
    chat = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}]))
            for t in CHAT_PROMPTS.read_text().splitlines()[:32]]
    workloads = {"chat, 32 rows": chat,
                 "long, 16 rows": [text[i * 1024:(i + 1) * 1024].tolist() for i in range(16)]}
    rows, greedy = [], {}
    for workload, prompts in workloads.items():
        for dtype in DTYPES:
            engine = Engine(model, rows=len(prompts), max_len=max(map(len, prompts)) + new_tokens, tokenizer=tok,
                            kv_cache_dtype=dtype)
            requests = [Request(p, new_tokens, ignore_eos=True) for p in prompts]
            for _ in engine.run(requests):
                pass
            greedy[workload, dtype] = [r.tokens for r in requests]
            s = engine.summary()
            same = [new_tokens if d is None else d
                    for d in row_differences(greedy[workload, dtype], greedy[workload, "auto"])]
            row = {"workload": workload, "kv_cache_dtype": dtype, "step": engine.runner.step,
                   "cache_mb": sum(k.nbytes + v.nbytes for k, v in engine.runner.kv_cache) / 2**20,
                   "prefill_tok_s": s["prefill_tokens"] / max(s["prefill_s"], 1e-9),
                   "decode_tok_s": s["new_tokens"] / s["decode_s"],
                   "greedy_agreement": sum(same) / len(same) / new_tokens}
            rows.append(row)
            print(f"kv-cache {workload:14} {dtype:4}: decode {row['decode_tok_s']:6.1f} tok/s, prefill "
                  f"{row['prefill_tok_s']:6.1f} tok/s, cache {row['cache_mb']:7.1f} MB, greedy tokens as the exact "
                  f"cache's for {row['greedy_agreement']:.0%} of {new_tokens}")
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
    for ax, key, unit in ((axes[0], "decode_tok_s", "decode tok/s"), (axes[1], "cache_mb", "KV cache MB")):
        named_bars(ax, {f"ours {r['workload']} {r['kv_cache_dtype']}": r[key] for r in timed}, unit)
        ax.set(title=unit)
    named_bars(axes[2], {f"ours {r['kv_cache_dtype']}": r["val_bpb"] for r in rows if "val_bpb" in r}, "bits/byte")
    axes[2].set(title="held-out bits per byte (engine's prompt pass)")
    return fig
