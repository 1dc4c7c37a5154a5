"""What structured output costs per token: llguidance's mask over the checkpoint's vocabulary, beside the engine's
own time per generated token, free and constrained (the same requests, greedy)."""
from __future__ import annotations

import time

import numpy as np
import torch

from bench.common import named_bars, percentile
from checkpoint import load_model
from engine import Engine, Request
from grammar import JsonGrammars

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["speaker", "act", "words"],
          "properties": {"speaker": {"type": "string", "maxLength": 12},
                         "act": {"type": "integer", "minimum": 1, "maximum": 5},
                         "words": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 10}}}}


def run(args) -> list[dict]:
    model, tok = load_model(args.checkpoint, "cpu")
    grammars = JsonGrammars(tok.to_str(), model.config.vocab_size, tok.eos_id)
    grammar = grammars.compile(SCHEMA)
    # the mask alone: a random walk through the grammar, restarted whenever an answer is whole
    masks, rng, constraint = [], np.random.default_rng(0), grammars.constraint(grammar)
    while len(masks) < 500:
        t0 = time.perf_counter()
        allowed = constraint.allowed()
        masks.append(time.perf_counter() - t0)
        token = int(rng.choice(np.flatnonzero(allowed.numpy())))
        if token != tok.eos_id:
            constraint.take(token)
        if token == tok.eos_id or constraint.done:
            constraint = grammars.constraint(grammar)
    # the engine: 8 chat prompts at once, free and constrained, per generated token
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": f"Quote line {i} of Hamlet as "
                                                    "JSON: who speaks, the act, a few words."}]))
               for i in range(8)]
    per_token = {}
    for name in ("free", "constrained", "free"):  # free twice: the first run warms up
        engine = Engine(model, rows=8, max_len=max(map(len, prompts)) + 64, tokenizer=tok)
        requests = [Request(p, 64, constraint=grammars.constraint(grammar) if name == "constrained" else None)
                    for p in prompts]
        t0 = time.perf_counter()
        list(engine.run(requests))
        per_token[name] = (time.perf_counter() - t0) / sum(len(r.tokens) for r in requests)
    return [{"vocab": model.config.vocab_size, "mask_us_p50": 1e6 * percentile(masks, 0.5),
             "mask_us_p90": 1e6 * percentile(masks, 0.9), "engine_ms_per_token_free": 1e3 * per_token["free"],
             "engine_ms_per_token_constrained": 1e3 * per_token["constrained"], "threads": torch.get_num_threads()}]


def plot(rows: list[dict], subplots):
    fig, ax = subplots(figsize=(6, 3))
    row = rows[0]
    named_bars(ax, {"ours, free (ms/token)": row["engine_ms_per_token_free"],
                    "ours, constrained (ms/token)": row["engine_ms_per_token_constrained"],
                    "ours, mask alone p50 (ms)": row["mask_us_p50"] / 1e3}, "ms")
    ax.set_title(f"structured output: cost per token (vocabulary {row['vocab']:,}, 8 rows)")
    return fig
