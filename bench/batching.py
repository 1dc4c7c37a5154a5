"""Continuous against static batching on the chat workload, through the engine."""
from __future__ import annotations

import time

from bench.common import CHAT_PROMPTS, percentile
from checkpoint import load_model
from engine import Engine, Request


def bench_engine(ckpt_path: str, rows: int = 32, new_tokens: int = 256) -> list[dict]:
    """The chat workload (prompts/chat.txt: 256 questions, lists and stories, whose answers stop at very
    different lengths), greedy, through 32 rows: continuous against static batching, one after the other.
    Latency counts from the start of the run, when every request is waiting."""
    model, tok = load_model(ckpt_path)  # as the server runs it: the GGUF's int4 blocks, the fused step
    texts = CHAT_PROMPTS.read_text().splitlines()
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}])) for t in texts]
    tokens, out = {}, []
    for mode in ("static", "continuous"):
        engine = Engine(model, rows=rows, max_len=max(map(len, prompts)) + new_tokens, tokenizer=tok,
                        batching=mode)
        requests = [Request(p, new_tokens) for p in prompts]
        t0 = time.perf_counter()
        for _ in engine.run(requests):
            pass
        wall = time.perf_counter() - t0
        latency = [r.finished_at - t0 for r in requests]
        s = engine.summary()
        tokens[mode] = [r.tokens for r in requests]
        row = {"batching": mode, "rows": rows, "requests": len(requests), "new_tokens": s["new_tokens"],
               "wall_s": wall, "tok_s": s["new_tokens"] / wall, "slot_utilisation": s["slot_utilisation"],
               "decode_steps": s["decode_steps"], "latency_p50_s": percentile(latency, 0.5),
               "latency_p99_s": percentile(latency, 0.99), "latencies_s": sorted(latency)}
        out.append(row)
        print(f"engine {mode:10}: {row['tok_s']:6.1f} tok/s, slot utilisation {row['slot_utilisation']:.0%}, "
              f"latency p50 {row['latency_p50_s']:.1f} s p99 {row['latency_p99_s']:.1f} s, "
              f"{s['new_tokens']} tokens in {wall:.0f} s")
    static, continuous = out
    continuous["speedup"] = continuous["tok_s"] / static["tok_s"]
    continuous["same_tokens"] = tokens["static"] == tokens["continuous"]
    print(f"continuous / static: x{continuous['speedup']:.2f}, same tokens: {continuous['same_tokens']}")
    return out


def run(args) -> list[dict]:
    return bench_engine(args.checkpoint)


def plot(rows: list[dict], ax_grid):
    fig, (left, right) = ax_grid(1, 2, figsize=(11, 4))
    for row in rows:
        lat = row["latencies_s"]
        right.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))],
                   label=f"{row['batching']}: {row['tok_s']:.0f} tok/s")
    left.bar([r["batching"] for r in rows], [r["slot_utilisation"] for r in rows])
    left.set(ylabel="slot utilisation (tokens / (steps x rows))", ylim=(0, 1),
             title="256 chat prompts, greedy, 32 rows")
    right.set(xlabel="seconds from the start until the request is done", ylabel="share of requests done",
              title="Per-request latency")
    right.grid(alpha=0.3)
    right.legend()
    return fig
