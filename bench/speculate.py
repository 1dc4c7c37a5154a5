"""Speculation without a draft model, on an input-grounded workload (prompts/grounded.jsonl: passages that the
text goes on to repeat), one user, greedy, 128 new tokens: ours plain and with n-gram drafts, in this process
(the ids must be identical) and through serve.py, against llama-server plain and with --spec-type ngram-simple."""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from bench import llama
from bench.common import ROOT, named_bars, start_server
from checkpoint import load_model
from engine import Engine, Request

PROMPTS = ROOT / "prompts" / "grounded.jsonl"
DRAFT = 8


def run(args) -> list[dict]:
    texts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()]
    model, tok = load_model(args.checkpoint)
    prompts = [tok.encode(t) for t in texts]
    rows, tokens = [], {}
    for draft in (0, DRAFT):  # in this process: one request after another, as one user
        engine = Engine(model, rows=1, max_len=max(map(len, prompts)) + args.new_tokens, tokenizer=tok)
        requests = [Request(p, args.new_tokens, speculate=draft) for p in prompts]
        t0 = time.perf_counter()
        for _ in engine.run(requests):
            pass
        s = engine.summary()
        tokens[draft] = [r.tokens for r in requests]
        rows.append({"kind": "engine", "name": f"ours{' ngram' if draft else ''}", "draft_tokens": draft,
                     "tok_s": s["new_tokens"] / (time.perf_counter() - t0), "drafted": s["drafted"],
                     "accepted": s["accepted"], "decode_steps": s["decode_steps"]})
    rows[-1]["same_ids_as_plain"] = tokens[DRAFT] == tokens[0]
    rows[-1]["vs_plain"] = rows[-1]["tok_s"] / rows[0]["tok_s"]
    servers = {"ours (serve.py)": [sys.executable, "serve.py", "--checkpoint", args.checkpoint, "--port", "8933",
                                   "--batch-size", "1"]}
    why = llama.missing(args.checkpoint, "llama-server")
    if why is None:
        gguf = llama.gguf_of(args.checkpoint)
        servers["llama-server"] = llama.server_command(gguf, args.threads, 8934, 1, 4096)
        servers["llama-server ngram-simple"] = llama.server_command(
            gguf, args.threads, 8935, 1, 4096, "--spec-type", "ngram-simple", "--spec-draft-n-max", str(DRAFT))
    for name, command in servers.items():
        port = command[command.index("--port") + 1]
        server = start_server(command, f"http://127.0.0.1:{port}/v1/models",
                              Path(tempfile.gettempdir()) / f"bench_speculate_{port}.log", args.threads)
        try:
            for speculate in (("none", "ngram") if name.startswith("ours") else (None,)):
                rows.append(one_client(name + (" ngram" if speculate == "ngram" else ""), port, texts,
                                       args.new_tokens, speculate))
        finally:
            server.terminate()
            server.wait(timeout=60)
    for row in rows:
        print(f"speculate {row['name']:30} {row['tok_s']:7.1f} tok/s" +
              (f", {row['accepted']} of {row['drafted']} draft tokens kept" if row.get("drafted") else ""))
    return rows


def one_client(name: str, port: str, texts: list[str], new_tokens: int, speculate: str | None) -> dict:
    """The prompts one after another through /v1/completions, greedy; tokens as the server counts them."""
    import httpx

    model = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
    extra = {"speculate": speculate} if speculate else {}
    generated, t0 = 0, time.perf_counter()
    with httpx.Client(timeout=600) as http:
        for text in texts:
            body = {"model": model, "prompt": text, "max_tokens": new_tokens, "temperature": 0} | extra
            generated += http.post(f"http://127.0.0.1:{port}/v1/completions", json=body).json()["usage"][
                "completion_tokens"]
    return {"kind": "server", "name": name, "tok_s": generated / (time.perf_counter() - t0), "tokens": generated}


def plot(rows: list[dict], subplots):
    fig, ax = subplots(figsize=(10, 4))
    named_bars(ax, {r["name"]: r["tok_s"] for r in rows}, "generated tokens/s")
    ax.set_title("One user, greedy, input-grounded prompts: speculation without a draft model")
    return fig
