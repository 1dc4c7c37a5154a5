"""Any checkpoint's generation speed against the batch size (with and without the KV cache), and against the
number of worker processes of inference.py on one shared queue."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT
from checkpoint import load_model
from engine import Engine, Request, encode_prompts

SEED_PROMPTS = ["One day, Lily met a Shoggoth", "There was a girl called Rosy", "Once upon a time",
                "The future of artificial intelligence", "In the distant galaxy"]
BATCHES = (1, 2, 4, 8, 16, 32, 64)


def run(args) -> list[dict]:
    """Fixed-length rows (end-of-text ignored), so that every configuration generates the same work."""
    model, tok = load_model(args.checkpoint)
    new_tokens = min(args.new_tokens, model.config.max_seq_len // 2)
    base = encode_prompts(tok, SEED_PROMPTS, new_tokens, model.config.max_seq_len)
    rows = []
    for cache in (True, False):
        for batch in BATCHES:
            prompts = [base[i % len(base)] for i in range(batch)]
            engine = Engine(model, rows=batch, max_len=max(map(len, prompts)) + new_tokens, use_cache=cache)
            t0 = time.perf_counter()
            for _ in engine.run(Request(p, new_tokens, ignore_eos=True) for p in prompts):
                pass
            tok_s = batch * new_tokens / (time.perf_counter() - t0)
            rows.append({"kind": "batch", "kv_cache": cache, "batch_size": batch, "tok_s": tok_s})
            print(f"sweep: batch {batch:3} kv_cache={cache!s:5} {tok_s:8.1f} tok/s")
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = Path(tmp) / "prompts.txt"
        prompts_file.write_text("\n".join(SEED_PROMPTS[i % len(SEED_PROMPTS)] for i in range(64)))
        for procs in sorted({1, 2, os.cpu_count() or 1}):
            stats = Path(tmp) / f"stats{procs}.json"
            subprocess.run([sys.executable, "inference.py", "--checkpoint", args.checkpoint, "--prompts-file",
                            str(prompts_file), "--num-procs", str(procs), "--batch-size", "16", "--ignore-eos",
                            "--max-new-tokens", str(new_tokens), "--output", str(Path(tmp) / "out.jsonl"),
                            "--stats-json", str(stats)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            report = json.loads(stats.read_text())
            rows.append({"kind": "procs", "num_procs": procs, "tok_s": report["generated_tokens_per_s"]})
            print(f"sweep: {procs} processes {report['generated_tokens_per_s']:8.1f} tok/s")
    return rows


def plot(rows: list[dict], subplots):
    fig, (left, right) = subplots(1, 2, figsize=(12, 4))
    for cache in (True, False):
        mine = [r for r in rows if r["kind"] == "batch" and r["kv_cache"] == cache]
        left.plot([r["batch_size"] for r in mine], [r["tok_s"] for r in mine], "o-",
                  label="KV cache" if cache else "no KV cache")
    left.set(xscale="log", yscale="log", xlabel="batch size", ylabel="generated tokens/s",
             title="Batched generation, one process")
    left.set_xticks(BATCHES, [str(b) for b in BATCHES])
    left.legend()
    procs = [r for r in rows if r["kind"] == "procs"]
    right.plot([r["num_procs"] for r in procs], [r["tok_s"] for r in procs], "o-")
    right.set(xlabel="worker processes", ylabel="generated tokens/s", title="64 prompts, batch 16 per process")
    right.set_xticks([r["num_procs"] for r in procs])
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return fig
