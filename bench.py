"""Side by side with the reference: our model vs transformers' LlamaForCausalLM on the same weights and inputs,
in the same run. Writes generated_texts/bench.json and bench_*.png.

  python bench.py                                   # everything (needs checkpoints/smollm2-135m-instruct)
  python bench.py --only generate --batches 1 8     # a part
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from config import ArgumentParser, get_config
from convert import write_hf
from model import GPT, generate

PROMPT_TEXT = ("The quick brown fox jumps over the lazy dog while the sun sets behind the hills and the "
               "children walk home from school, talking about")
LLAMA_TRAIN = dict(vocab_size=4096, n_layer=8, n_head=8, n_kv_head=4, d_model=512, ffn_hidden=1376,
                   max_seq_len=256, tie_embeddings=False)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def load_pair(ckpt_path: str, dtype: torch.dtype):
    """Our model and transformers' model loaded from our to-hf export of the same checkpoint."""
    from transformers import AutoModelForCausalLM

    ckpt = load_checkpoint(ckpt_path)
    ours, tok = model_from_checkpoint(ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        write_hf(ckpt, Path(tmp))
        ref = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
    return ours.to(dtype), ref, tok


def bench_generate(ckpt_path: str, batches: list[int], new_tokens: int, results: dict) -> None:
    for dname, dtype in DTYPES.items():
        ours, ref, tok = load_pair(ckpt_path, dtype)
        prompt = tok.encode(PROMPT_TEXT)[:16]
        for batch in batches:
            prompts = [prompt] * batch
            ids = torch.tensor(prompts)

            def run_ours():
                generate(ours, prompts, new_tokens)

            def run_ref():
                with torch.inference_mode():
                    ref.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_id)

            repeats = 1 if batch >= 32 else 3
            row = {"batch": batch, "dtype": dname,
                   "ours_tok_s": batch * new_tokens / timed(run_ours, repeats),
                   "ref_tok_s": batch * new_tokens / timed(run_ref, repeats)}
            row["ratio"] = row["ours_tok_s"] / row["ref_tok_s"]
            results["generate"].append(row)
            print(f"generate {dname} batch {batch:2}: ours {row['ours_tok_s']:8.1f} tok/s   "
                  f"transformers {row['ref_tok_s']:8.1f} tok/s   x{row['ratio']:.2f}")


def bench_prefill(ckpt_path: str, results: dict, batch: int = 8, length: int = 512) -> None:
    for dname, dtype in DTYPES.items():
        ours, ref, _ = load_pair(ckpt_path, dtype)
        idx = torch.randint(0, ours.config.vocab_size, (batch, length))
        with torch.inference_mode():
            t_ours = timed(lambda: ours(idx, last_only=True))
            t_ref = timed(lambda: ref(idx, logits_to_keep=1))
        row = {"dtype": dname, "tokens": batch * length, "ours_tok_s": batch * length / t_ours,
               "ref_tok_s": batch * length / t_ref}
        row["ratio"] = row["ours_tok_s"] / row["ref_tok_s"]
        results["prefill"].append(row)
        print(f"prefill {dname} {batch}x{length}: ours {row['ours_tok_s']:8.0f} tok/s   "
              f"transformers {row['ref_tok_s']:8.0f} tok/s   x{row['ratio']:.2f}")


def train_step_rate(model: torch.nn.Module, vocab: int, batch: int, seq: int, hf: bool) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, vocab, (batch, seq))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss if hf else model(x, x)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return batch * seq / timed(step)


def bench_train(results: dict, batch: int = 8, seq: int = 256) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    for name in ("tiny", "slm-40m"):
        cfg = get_config(name, max_seq_len=max(seq, get_config(name).max_seq_len))
        rate = train_step_rate(GPT(cfg), cfg.vocab_size, batch, seq, hf=False)
        results["train"].append({"config": name, "ours_tok_s": rate})
        print(f"train {name}: ours {rate:8.0f} tok/s")
    cfg = get_config("tiny", **LLAMA_TRAIN)
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
                         num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                         num_key_value_heads=cfg.n_kv_head, max_position_embeddings=seq, tie_word_embeddings=False)
    ours = train_step_rate(GPT(cfg), cfg.vocab_size, batch, seq, hf=False)
    ref = train_step_rate(LlamaForCausalLM(hf_cfg), cfg.vocab_size, batch, seq, hf=True)
    results["train"].append({"config": "llama-512x8", "ours_tok_s": ours, "ref_tok_s": ref, "ratio": ours / ref})
    print(f"train llama-512x8: ours {ours:8.0f} tok/s   transformers {ref:8.0f} tok/s   x{ours / ref:.2f}")


def plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if results["generate"]:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, dname in zip(axes, DTYPES):
            rows = [r for r in results["generate"] if r["dtype"] == dname]
            xs = range(len(rows))
            ax.bar([x - 0.2 for x in xs], [r["ours_tok_s"] for r in rows], 0.4, label="ours")
            ax.bar([x + 0.2 for x in xs], [r["ref_tok_s"] for r in rows], 0.4, label="transformers")
            ax.set_xticks(list(xs), [str(r["batch"]) for r in rows])
            ax.set(title=f"SmolLM2-135M greedy decode, {dname}", xlabel="batch size", yscale="log")
            ax.grid(alpha=0.3, axis="y")
        axes[0].set_ylabel("generated tokens/s")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out / "bench_generation.png", dpi=100)
    rows = [("prefill " + r["dtype"], r) for r in results["prefill"]] + \
           [("train " + r["config"], r) for r in results["train"] if "ref_tok_s" in r]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["ours_tok_s"] for _, r in rows], 0.4, label="ours")
        ax.bar([x + 0.2 for x in xs], [r["ref_tok_s"] for _, r in rows], 0.4, label="transformers")
        ax.set_xticks(list(xs), [name for name, _ in rows])
        ax.set(ylabel="tokens/s", title="Prefill (8x512) and training step (bf16 autocast)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "bench_prefill_train.png", dpi=100)
    plt.close("all")


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", default="checkpoints/smollm2-135m-instruct",
                   help="real SmolLM2 weights (python convert.py smollm2)")
    p.add_argument("--only", choices=["generate", "prefill", "train"], nargs="+",
                   default=["generate", "prefill", "train"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="generated_texts")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"threads": args.threads, "torch": torch.__version__, "generate": [], "prefill": [], "train": []}
    if "generate" in args.only:
        bench_generate(args.checkpoint, args.batches, args.new_tokens, results)
    if "prefill" in args.only:
        bench_prefill(args.checkpoint, results)
    if "train" in args.only:
        bench_train(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    plot(results, out)
    print(f"wrote {out}/bench.json and plots")


if __name__ == "__main__":
    main()
