"""Load on OpenAI-compatible servers over loopback: ours (serve.py) against llama.cpp's and vLLM's CPU engine's,
streamed chat."""
from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench import llama, peers
from bench.common import CHAT_PROMPTS, int8_activations, percentile, start_server
from checkpoint import config_and_tokenizer, load_checkpoint
from layers import bf16_kernel


async def load_test(url: str, bodies: list[dict], clients: int) -> dict:
    """`clients` concurrent streaming clients work through the requests in order, each taking the next as soon as
    its last one is done. Per request: start, the arrival time of each text chunk, the text and any error."""
    import asyncio

    import httpx

    todo, done = list(enumerate(bodies))[::-1], []

    async def client(http: httpx.AsyncClient) -> None:
        while todo:
            i, body = todo.pop()
            start, stamps, text = time.perf_counter(), [], []
            for _ in range(3):  # a kept-alive connection that the server had closed: again, on a new one
                error = None
                try:
                    async with http.stream("POST", url, json=body) as r:
                        if r.status_code != 200:
                            error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                piece = json.loads(line[6:])["choices"][0].get("delta", {}).get("content")
                                if piece:
                                    stamps.append(time.perf_counter())
                                    text.append(piece)
                    break
                except httpx.RemoteProtocolError as e:
                    error = f"{type(e).__name__}: {e}"
                    if stamps:  # it broke off mid-answer: that counts
                        break
                except httpx.HTTPError as e:
                    error = f"{type(e).__name__}: {e}"
                    break
            done.append({"i": i, "start": start, "stamps": stamps, "text": "".join(text), "error": error})

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=clients)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return {"wall_s": time.perf_counter() - t0, "requests": sorted(done, key=lambda d: d["i"])}


def peer_servers(section: str, ckpt_path: str, threads: int, rows: int, port: int,
                 context: int) -> dict[str, list[str]]:
    """The commands of llama-server (`rows` slots, `context` tokens in all, on `port`) and vLLM's CPU engine (bf16,
    `rows` sequences, on port + 1), each where `make bench-install` put it; a line says which is missing."""
    servers = {}
    why = llama.missing(ckpt_path, "llama-server")
    if why is None:
        servers[f"llama-server -np {rows}"] = llama.server_command(llama.gguf_of(ckpt_path), threads, port, rows,
                                                                     context)
    else:
        print(f"{section}: llama-server {why}")
    why = peers.missing("vllm")
    if why is None:
        servers[f"vLLM CPU bf16 --max-num-seqs {rows}"] = peers.vllm_server_command(ckpt_path, port + 1, rows)
    else:
        print(f"{section}: vLLM's CPU engine {why}")
    return servers


@contextlib.contextmanager
def serving(section: str, command: list[str], threads: int) -> Iterator[tuple[str, str]]:
    """A server started from its command and stopped when the block ends: its base URL and its model's name."""
    import httpx

    port = command[command.index("--port") + 1]
    base = f"http://127.0.0.1:{port}"
    server = start_server(command, f"{base}/v1/models", Path(tempfile.gettempdir()) / f"bench_{section}_{port}.log",
                          threads)
    try:
        yield base, httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
    finally:
        server.terminate()
        server.wait(timeout=60)


def bench_serve(ckpt_path: str, threads: int, levels: list[int], requests: int = 64, max_tokens: int = 128,
                rows: int = 32) -> list[dict]:
    """Load on an OpenAI-compatible server over loopback: `requests` chat prompts (every 4th of prompts/chat.txt:
    questions, lists and stories), greedy, streamed, at 1/8/32/64 concurrent clients. Ours (serve.py with no
    flags, 32 rows; with int8 activations where AVX-512 VNNI runs them; with bf16 weights where the fused step
    runs them on AVX-512 BF16), llama-server (-np 32, the same GGUF
    and threads) and vLLM's CPU engine (bf16, 32 sequences, where `make bench-install` put it), in the same run:
    all started at once, then each level of clients run on each server in turns. Tokens are counted by
    re-encoding each answer with the model's tokenizer, the same for all."""
    import asyncio

    ckpt = load_checkpoint(ckpt_path, mmap=True)
    _, tok = config_and_tokenizer(ckpt)  # the tokenizer alone: the servers load the model
    texts = CHAT_PROMPTS.read_text().splitlines()[::4][:requests]
    bodies = [{"messages": [{"role": "user", "content": t}], "max_tokens": max_tokens,
               "temperature": 0, "stream": True} for t in texts]
    ours = [sys.executable, "serve.py", "--checkpoint", ckpt_path, "--batch-size", str(rows), "--port"]
    servers = {"ours (serve.py)": [*ours, "8931"]}
    if int8_activations():
        servers["ours, int8 activations"] = [*ours, "8934", "--machine", int8_activations()]
    if bf16_kernel() != "none":
        servers["ours, bf16"] = [*ours, "8935", "--dtype", "bf16", "--quantize", "none"]
    servers |= peer_servers("serve", ckpt_path, threads, rows, 8932, rows * 512)
    out = []
    with contextlib.ExitStack() as stack:  # every server up at once, each level in turns: drift hits all alike
        started = {name: stack.enter_context(serving("serve", command, threads))
                   for name, command in servers.items()}
        for base, model in started.values():
            asyncio.run(load_test(f"{base}/v1/chat/completions", [b | {"model": model} for b in bodies[:2]], 1))
        for clients in levels:
            for name, (base, model) in started.items():
                out.append(load_level(name, base, [b | {"model": model} for b in bodies], clients, tok))
        if 1 in levels:
            base, model = started["ours (serve.py)"]
            cost = cost_in_turns(ckpt_path, base, [b | {"model": model} for b in bodies[:8]], tok)
            next(r for r in out if r["server"] == "ours (serve.py)" and r["clients"] == 1).update(cost)
    return out


def load_level(name: str, base: str, bodies: list[dict], clients: int, tok) -> dict:
    """One server at one level of clients: throughput, TTFT and inter-token latency; at one client, for ours,
    what serving costs on top of the engine."""
    import asyncio

    before = engine_time(base) if name.startswith("ours") else None
    run = asyncio.run(load_test(f"{base}/v1/chat/completions", bodies, clients))
    done = run["requests"]
    ttft = [d["stamps"][0] - d["start"] for d in done if d["stamps"]] or [float("nan")]
    itl = [b - a for d in done for a, b in zip(d["stamps"], d["stamps"][1:])] or [float("nan")]
    tokens = sum(len(tok.encode(d["text"])) for d in done)
    errors = [d["error"] or "no text" for d in done if d["error"] or not d["text"]]
    row = {"server": name, "clients": clients, "requests": len(done), "errors": len(errors),
           "error_examples": errors[:3], "wall_s": run["wall_s"], "req_s": len(done) / run["wall_s"],
           "tok_s": tokens / run["wall_s"], "completion_tokens": tokens,
           "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
           "itl_p50_ms": 1e3 * percentile(itl, 0.5), "itl_p99_ms": 1e3 * percentile(itl, 0.99)}
    if before is not None and clients == 1:
        row |= http_cost(before, engine_time(base), done)
    print(f"serve {name:30} {clients:3} clients: {row['req_s']:5.2f} req/s {row['tok_s']:6.1f} tok/s, "
          f"TTFT p50 {row['ttft_p50_s']:.2f} p99 {row['ttft_p99_s']:.2f} s, ITL p50 "
          f"{row['itl_p50_ms']:.0f} p99 {row['itl_p99_ms']:.0f} ms, {row['errors']} errors")
    return row


def engine_time(base: str) -> dict:
    """Our server's own count of its engine's decode passes and the seconds they took (GET /health)."""
    import httpx

    health = httpx.get(f"{base}/health").json()
    return {"steps": health["decode_steps"], "seconds": health["decode_s"]}


def http_cost(before: dict, after: dict, done: list[dict]) -> dict:
    """At one client, each answer's first piece to its last spans the engine's steps that made its tokens (each
    whole: schedule, pass, sampling, detokenizing) and whatever else the server does between them (HTTP, the
    event loop, the client on the same cores): the share of that span not spent in the engine's steps is what
    serving costs on top of the engine."""
    engine_s = after["seconds"] - before["seconds"]
    span_s = sum(d["stamps"][-1] - d["stamps"][0] for d in done if len(d["stamps"]) > 1)
    steps = after["steps"] - before["steps"]
    cost = {"engine_step_ms": 1e3 * engine_s / max(1, steps), "http_share": 1 - engine_s / span_s}
    print(f"serve: one client: the engine's step {cost['engine_step_ms']:.2f} ms; serving costs "
          f"{100 * cost['http_share']:.1f}% of the time between tokens")
    return cost


def cost_in_turns(ckpt_path: str, base: str, bodies: list[dict], tok, rounds: int = 4) -> dict:
    """At one client, all that serving costs, inside the engine's steps too (the GIL and the cores shared with
    the event loop and the client): the same chat answers from an engine in this process, set up as serve.py's
    (32 rows, its prefix cache), and from the server, one request at a time in turns (each idle while the other
    runs), as the mean time between streamed pieces."""
    import argparse
    import asyncio

    from checkpoint import load_model
    from config import add_inference_args
    from engine import Engine
    from scheduler import Request

    model, _ = load_model(ckpt_path)
    serve_args = argparse.ArgumentParser()
    add_inference_args(serve_args)
    gaps: dict[str, list[float]] = {"here": [], "server": []}
    for _ in range(rounds):
        for body in bodies:
            ids = tok.encode(tok.apply_chat_template(body["messages"]))
            stamps: list[float] = []
            request = Request(ids, body["max_tokens"], on_text=lambda _, s=stamps: s.append(time.perf_counter()))
            engine = Engine(model, rows=32, max_len=len(ids) + body["max_tokens"], tokenizer=tok,
                            prefix_cache_mb=serve_args.get_default("prefix_cache_mb"))
            for _ in engine.run([request]):
                pass
            done = asyncio.run(load_test(f"{base}/v1/chat/completions", [body], 1))["requests"][0]
            for key, times in (("here", stamps), ("server", done["stamps"])):
                if len(times) > 1:  # the mean gap between its pieces
                    gaps[key].append((times[-1] - times[0]) / (len(times) - 1))
    here, there = (1e3 * sum(g) / len(g) for g in gaps.values())
    print(f"serve: one client, in turns: {there:.2f} ms between pieces from the server, {here:.2f} from an engine "
          f"in this process: serving costs {100 * (there / here - 1):.1f}%")
    return {"in_turns_server_ms": there, "in_turns_engine_ms": here, "in_turns_cost": there / here - 1}


def run(args) -> list[dict]:
    return bench_serve(args.checkpoint, args.threads, args.clients)


def plot(rows: list[dict], ax_grid):
    fig, (left, mid, right) = ax_grid(1, 3, figsize=(16, 4))
    for name in dict.fromkeys(r["server"] for r in rows):
        mine = [r for r in rows if r["server"] == name]
        clients = [r["clients"] for r in mine]
        left.plot(clients, [r["tok_s"] for r in mine], "o-", label=name)
        for ax, key, unit in ((mid, "ttft", "_s"), (right, "itl", "_ms")):
            ax.plot(clients, [r[f"{key}_p50{unit}"] for r in mine], "o-", label=f"{name} p50")
            ax.plot(clients, [r[f"{key}_p99{unit}"] for r in mine], "o--", label=f"{name} p99")
    left.set(ylabel="generated tokens/s", title="Throughput (SmolLM2-135M chat, greedy, streamed)")
    mid.set(ylabel="seconds", yscale="log", title="Time to first token")
    right.set(ylabel="ms", yscale="log", title="Inter-token latency")
    for ax in (left, mid, right):
        ax.set(xlabel="concurrent clients", xscale="log")
        ax.set_xticks([r["clients"] for r in rows], [str(r["clients"]) for r in rows])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig
