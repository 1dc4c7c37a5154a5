"""Side by side with the reference: our model vs transformers' LlamaForCausalLM on the same weights and inputs,
in the same run. Writes generated_texts/bench.json and bench_*.png.

"ours" is the plain path; "ours compiled" is the fast path (generate(compile=True): the frozen, prepacked
torch.compile decode step; for training, torch.compile of the model). Compile time is left out of the rates
(one warm-up call first) and reported apart. The machine's own matmul and memory rates are measured too,
since they bound every figure here.

  python bench.py                                   # everything (needs checkpoints/smollm2-135m-instruct)
  python bench.py --only generate --batches 1 8     # a part
  python bench.py --only engine                     # continuous vs static batching on the chat workload
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
from engine import Engine, Request, generate
from kernels import bf16_gemms_run_in_fp32
from model import GPT

PROMPT_TEXT = ("The quick brown fox jumps over the lazy dog while the sun sets behind the hills and the "
               "children walk home from school, talking about")
LLAMA_TRAIN = dict(vocab_size=4096, n_layer=8, n_head=8, n_kv_head=4, d_model=512, ffn_hidden=1376,
                   max_seq_len=256, tie_embeddings=False)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed_interleaved(fns: dict, repeats: int = 3) -> tuple[dict, dict]:
    """Median seconds per call of each fn, and the seconds of its warm-up call (which includes any compile).
    The timed calls take turns (a, b, c, a, b, c, ...), so that a drift in the machine's speed (it is
    shared) hits every contender alike instead of the one that happens to run last."""
    warmups, times = {}, {name: [] for name in fns}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        warmups[name] = time.perf_counter() - t0
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}, warmups


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of fn() after one warm-up call."""
    return timed_interleaved({"fn": fn}, repeats)[0]["fn"]


def machine_facts() -> dict:
    """What bounds the figures: GEMM rate per dtype and the rate of reading memory (256 MB, past any cache)."""
    facts = {"cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                          if line.startswith("model name")), "unknown"), "threads": torch.get_num_threads()}
    for name, dtype in DTYPES.items():
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        facts[f"matmul_gflops_{name}"] = 2 * 2048 ** 3 / timed(lambda: a @ b, 5) / 1e9
    big = torch.ones(64 * 2 ** 20)
    facts["memory_read_gb_s"] = big.numel() * 4 / timed(big.sum, 5) / 1e9
    facts["bf16_gemms_in_fp32"] = bf16_gemms_run_in_fp32()  # model.Linear's choice for this process
    print(", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in facts.items()))
    return facts


def load_pair(ckpt_path: str, dtype: torch.dtype):
    """Our model and transformers' model loaded from our to-hf export of the same checkpoint."""
    from transformers import AutoModelForCausalLM

    ckpt = load_checkpoint(ckpt_path)
    ours, tok = model_from_checkpoint(ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        write_hf(ckpt, Path(tmp))
        ref = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
    return ours.to(dtype), ref, tok


def first_difference(a: list[list[int]], b: list[list[int]]) -> int | None:
    """Index of the first generated token where two runs differ, in any row; None when they agree."""
    diffs = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), None) for ra, rb in zip(a, b)]
    return min((d for d in diffs if d is not None), default=None)


def bench_generate(ckpt_path: str, batches: list[int], new_tokens: int) -> list[dict]:
    rows = []
    for dname, dtype in DTYPES.items():
        ours, ref, tok = load_pair(ckpt_path, dtype)
        prompt = tok.encode(PROMPT_TEXT)[:16]
        for batch in batches:
            prompts = [prompt] * batch
            ids = torch.tensor(prompts)
            outputs = {}

            def run_ours(compile: bool):
                outputs[compile] = generate(ours, prompts, new_tokens, compile=compile)[0]

            def run_ref():
                with torch.inference_mode():
                    ref.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_id)

            seconds, warmups = timed_interleaved({"ours": lambda: run_ours(False), "ours_compiled":
                                                  lambda: run_ours(True), "ref": run_ref}, 2 if batch >= 32 else 3)
            row = {"batch": batch, "dtype": dname, **{f"{k}_tok_s": batch * new_tokens / v for k, v in seconds.items()},
                   "compile_warmup_s": warmups["ours_compiled"],
                   "compiled_first_difference": first_difference(outputs[True], outputs[False])}
            row["ratio"] = row["ours_compiled_tok_s"] / row["ref_tok_s"]
            rows.append(row)
            same = row["compiled_first_difference"]
            print(f"generate {dname} batch {batch:2}: ours {row['ours_tok_s']:7.1f}  compiled "
                  f"{row['ours_compiled_tok_s']:7.1f} tok/s  transformers {row['ref_tok_s']:7.1f}  "
                  f"x{row['ratio']:.2f}  compiled tokens: {'same' if same is None else f'differ from {same}'}")
    return rows


def bench_prefill(ckpt_path: str, batch: int = 8, length: int = 512) -> list[dict]:
    rows = []
    for dname, dtype in DTYPES.items():
        ours, ref, _ = load_pair(ckpt_path, dtype)
        idx = torch.randint(0, ours.config.vocab_size, (batch, length))
        with torch.inference_mode():
            seconds, _ = timed_interleaved({"ours": lambda: ours(idx, last_only=True),
                                            "ref": lambda: ref(idx, logits_to_keep=1)})
        row = {"dtype": dname, "tokens": batch * length, **{f"{k}_tok_s": batch * length / v
                                                            for k, v in seconds.items()}}
        row["ratio"] = row["ours_tok_s"] / row["ref_tok_s"]
        rows.append(row)
        print(f"prefill {dname} {batch}x{length}: ours {row['ours_tok_s']:8.0f} tok/s   "
              f"transformers {row['ref_tok_s']:8.0f} tok/s   x{row['ratio']:.2f}")
    return rows


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


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def bench_engine(ckpt_path: str, rows: int = 32, new_tokens: int = 256) -> list[dict]:
    """The chat workload (prompts/chat.txt: 256 questions, lists and stories, whose answers stop at very
    different lengths), greedy, through 32 rows: continuous against static batching, one after the other.
    Latency counts from the start of the run, when every request is waiting."""
    model, tok = model_from_checkpoint(load_checkpoint(ckpt_path))
    texts = (Path(__file__).parent / "prompts" / "chat.txt").read_text().splitlines()
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


SERIES = (("ours_tok_s", "ours"), ("ours_compiled_tok_s", "ours compiled"), ("ref_tok_s", "transformers"))


def bars(ax, rows: list[dict], labels: list[str]) -> None:
    """Grouped bars: ours, ours compiled and transformers for each row (a missing figure: no bar)."""
    width = 0.27
    for i, (key, name) in enumerate(SERIES):
        xs = [x + (i - 1) * width for x, r in enumerate(rows) if key in r]
        ax.bar(xs, [r[key] for r in rows if key in r], width, label=name)
    ax.set_xticks(list(range(len(rows))), labels)
    ax.grid(alpha=0.3, axis="y")


def plot_generate(rows: list[dict], ax_grid):
    fig, axes = ax_grid(1, 2, figsize=(11, 4), sharey=True)
    for ax, dname in zip(axes, DTYPES):
        mine = [r for r in rows if r["dtype"] == dname]
        bars(ax, mine, [str(r["batch"]) for r in mine])
        ax.set(title=f"SmolLM2-135M greedy, 128 new tokens, {dname}", xlabel="batch size", yscale="log")
    axes[0].set_ylabel("generated tokens/s")
    axes[0].legend()
    return fig


def plot_prefill_or_train(rows: list[dict], ax_grid):
    fig, ax = ax_grid(figsize=(9, 4))
    bars(ax, rows, [f"prefill {r['dtype']}" if "tokens" in r else f"train {r['config']}\n{r['dtype']}" for r in rows])
    ax.set(ylabel="tokens/s", yscale="log",
           title="Prefill 8x512 (last-position logits)" if "tokens" in rows[0] else "Training steps (batch 8 x 256)")
    ax.legend()
    return fig


def plot_engine(rows: list[dict], ax_grid):
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


SECTIONS = {  # name: (run it, plot it)
    "generate": (lambda a: bench_generate(a.checkpoint, a.batches, a.new_tokens), plot_generate),
    "prefill": (lambda a: bench_prefill(a.checkpoint), plot_prefill_or_train),
    "train": (lambda a: bench_train(), plot_prefill_or_train),
    "engine": (lambda a: bench_engine(a.checkpoint), plot_engine),
}


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", default="checkpoints/smollm2-135m-instruct",
                   help="real SmolLM2 weights (python convert.py smollm2)")
    p.add_argument("--only", choices=list(SECTIONS), nargs="+", default=list(SECTIONS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="generated_texts")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    facts = machine_facts()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only:  # each section writes its own JSON and plot, so one can be run again alone
        run, draw = SECTIONS[name]
        rows = run(args)
        (out / f"bench_{name}.json").write_text(json.dumps({"torch": torch.__version__, "machine": facts,
                                                            "rows": rows}, indent=1))
        draw(rows, plt.subplots).savefig(out / f"bench_{name}.png", dpi=100, bbox_inches="tight")
        plt.close("all")
        print(f"wrote {out}/bench_{name}.json and .png")


if __name__ == "__main__":
    main()
