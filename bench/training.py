"""Whole training steps (forward, backward, AdamW) per second: ours, compiled, and transformers' Llama."""
from __future__ import annotations

import torch

from bench.common import timed_interleaved
from config import get_config
from model import GPT

LLAMA_TRAIN = dict(vocab_size=4096, n_layer=8, n_head=8, n_kv_head=4, d_model=512, ffn_hidden=1376,
                   max_seq_len=256, tie_embeddings=False)


def train_step(model: torch.nn.Module, vocab: int, batch: int, seq: int, hf: bool, dtype: str,
               compile: bool = False):
    """A whole AdamW step (forward, backward, update) at batch x seq, as a function to time."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, vocab, (batch, seq))
    forward = torch.compile(model) if compile else model

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = forward(input_ids=x, labels=x).loss if hf else forward(x, x)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # a second warm-up: the first step of a compiled model compiles forward, the second backward
    return step


def train_rates(steps: dict, tokens: int) -> dict:
    seconds, _ = timed_interleaved(steps)
    return {f"{name}_tok_s": tokens / s for name, s in seconds.items()}


def bench_train(batch: int = 8, seq: int = 256) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    rows = []
    for name in ("tiny", "slm-40m"):
        cfg = get_config(name, max_seq_len=max(seq, get_config(name).max_seq_len))
        row = {"config": name, "dtype": "bf16", **train_rates(
            {"ours": train_step(GPT(cfg), cfg.vocab_size, batch, seq, False, "bf16"),
             "ours_compiled": train_step(GPT(cfg), cfg.vocab_size, batch, seq, False, "bf16", True)}, batch * seq)}
        rows.append(row)
        print(f"train {name} bf16: ours {row['ours_tok_s']:6.0f}  compiled {row['ours_compiled_tok_s']:6.0f} tok/s")
    cfg = get_config("tiny", **LLAMA_TRAIN)
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
                         num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                         num_key_value_heads=cfg.n_kv_head, max_position_embeddings=seq, tie_word_embeddings=False)
    # bf16 autocast is the workload; fp32 is what train.py picks on a CPU (--dtype auto).
    for dname in ("bf16", "fp32"):
        row = {"config": "llama-512x8", "dtype": dname, **train_rates(
            {"ours": train_step(GPT(cfg), cfg.vocab_size, batch, seq, False, dname),
             "ours_compiled": train_step(GPT(cfg), cfg.vocab_size, batch, seq, False, dname, True),
             "ref": train_step(LlamaForCausalLM(hf_cfg), cfg.vocab_size, batch, seq, True, dname)}, batch * seq)}
        row["ratio"] = row["ours_compiled_tok_s"] / row["ref_tok_s"]
        rows.append(row)
        print(f"train llama-512x8 {dname}: ours {row['ours_tok_s']:6.0f}  compiled {row['ours_compiled_tok_s']:6.0f}"
              f" tok/s  transformers {row['ref_tok_s']:6.0f}  x{row['ratio']:.2f}")
    return rows


def run(args) -> list[dict]:
    return bench_train()


SERIES = (("ours_tok_s", "ours"), ("ours_compiled_tok_s", "ours compiled"), ("ref_tok_s", "transformers"))


def bars(ax, rows: list[dict], labels: list[str]) -> None:
    """Grouped bars: ours, ours compiled and transformers for each row (a missing figure: no bar)."""
    width = 0.27
    for i, (key, name) in enumerate(SERIES):
        xs = [x + (i - 1) * width for x, r in enumerate(rows) if key in r]
        ax.bar(xs, [r[key] for r in rows if key in r], width, label=name)
    ax.set_xticks(list(range(len(rows))), labels)
    ax.grid(alpha=0.3, axis="y")


def plot(rows: list[dict], ax_grid):
    fig, ax = ax_grid(figsize=(9, 4))
    bars(ax, rows, [f"train {r['config']}\n{r['dtype']}" for r in rows])
    ax.set(ylabel="tokens/s", yscale="log", title="Training steps (batch 8 x 256)")
    ax.legend()
    return fig
