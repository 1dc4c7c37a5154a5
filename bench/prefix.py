"""A shared 400-token system prompt: serve.py with its prefix cache and without, llama-server (which keeps each
slot's last prompt and reuses its common start) and vLLM's CPU engine (its prefix caching is on by default), time
to first token on streamed chat."""
from __future__ import annotations

import asyncio
import sys

from bench.common import CHAT_PROMPTS, percentile
from bench.server import load_test, peer_servers, serving
from checkpoint import config_and_tokenizer, load_checkpoint


def system_prompt(tok, tokens: int = 400) -> str:
    """About `tokens` tokens of instructions, from the first lines of prompts/chat.txt (the same every run)."""
    text = "You are a helpful assistant. Answer briefly. Users ask questions like these:\n"
    for line in CHAT_PROMPTS.read_text().splitlines():
        if len(tok.encode(text)) >= tokens:
            break
        text += f"- {line}\n"
    return text


def bench_prefix(ckpt_path: str, threads: int, levels: list[int], requests: int = 32, max_tokens: int = 32,
                 rows: int = 8) -> list[dict]:
    """`requests` chat questions (from the end of prompts/chat.txt, none of them in the system prompt), each
    behind the same system prompt, greedy, at each level of concurrent clients. Two warm-up requests first, so
    the cached system prompt is that of a server already running."""
    import httpx

    _, tok = config_and_tokenizer(load_checkpoint(ckpt_path, mmap=True))
    system = system_prompt(tok)
    questions = CHAT_PROMPTS.read_text().splitlines()[::-1][:requests]
    bodies = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
               "max_tokens": max_tokens, "temperature": 0, "stream": True} for q in questions]
    ours = [sys.executable, "serve.py", "--checkpoint", ckpt_path, "--batch-size", str(rows)]
    servers = {"ours, prefix cache": [*ours, "--port", "8941"],
               "ours, no prefix cache": [*ours, "--port", "8942", "--prefix-cache-mb", "0"]}
    servers |= peer_servers("prefix", ckpt_path, threads, rows, 8943, rows * 1024)
    out, texts = [], {}
    for name, command in servers.items():
        with serving("prefix", command, threads) as (base, model):
            url = f"{base}/v1/chat/completions"
            asyncio.run(load_test(url, [b | {"model": model} for b in bodies[:2]], 1))  # warm-up
            for clients in levels:
                done = asyncio.run(load_test(url, [b | {"model": model} for b in bodies], clients))
                ttft = [d["stamps"][0] - d["start"] for d in done["requests"] if d["stamps"]] or [float("nan")]
                texts[name, clients] = [d["text"] for d in done["requests"]]
                row = {"server": name, "clients": clients, "requests": len(bodies),
                       "prompt_tokens": len(tok.encode(system)), "ttft_p50_s": percentile(ttft, 0.5),
                       "ttft_p99_s": percentile(ttft, 0.99),
                       "tok_s": sum(len(tok.encode(t)) for t in texts[name, clients]) / done["wall_s"],
                       "errors": sum(1 for d in done["requests"] if d["error"])}
                if name.startswith("ours"):
                    row["prefix_cache"] = httpx.get(f"{base}/health").json()["prefix_cache"]
                out.append(row)
                print(f"prefix {name:24} {clients:2} clients: TTFT p50 {row['ttft_p50_s']:.3f} p99 "
                      f"{row['ttft_p99_s']:.3f} s, {row['tok_s']:.1f} tok/s, {row['errors']} errors")
    for clients in levels:  # the cache must change no answer
        same = texts["ours, prefix cache", clients] == texts["ours, no prefix cache", clients]
        for row in out:
            if row["clients"] == clients and row["server"] == "ours, prefix cache":
                row["same_text_as_no_cache"] = same
        print(f"prefix: {clients} clients, the same text with and without the cache: {same}")
    return out


def run(args) -> list[dict]:
    return bench_prefix(args.checkpoint, args.threads, [c for c in args.clients if c <= 8] or [1])


def plot(rows: list[dict], ax_grid):
    fig, ax = ax_grid(1, 1, figsize=(8, 4))
    levels = sorted({r["clients"] for r in rows})
    names = list(dict.fromkeys(r["server"] for r in rows))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [next((r["ttft_p50_s"] for r in rows if r["server"] == name and r["clients"] == c), 0)
                  for c in levels]
        ax.bar([j + i * width for j in range(len(levels))], values, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(levels))], [f"{c} clients" for c in levels])
    ax.set(ylabel="TTFT p50, seconds", title="A shared 400-token system prompt (SmolLM2-135M chat, greedy)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return fig
