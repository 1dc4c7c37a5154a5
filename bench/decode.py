"""Greedy decode of 16-token prompts: ours in fp32/int8/int4, plain and compiled, against transformers and llama.cpp."""
from __future__ import annotations

import torch

from bench.common import PROMPT_TEXT, contenders, first_difference, llama_greedy, named_bars, timed_interleaved
from engine import generate


def bench_decode(ckpt_path: str, batches: list[int], new_tokens: int, threads: int) -> list[dict]:
    """Greedy decode of 16-token prompts: ours in fp32/int8/int4, plain and compiled, transformers and llama.cpp
    (batch 1: llama-cpp-python decodes one sequence), timed in turns. Tokens per second count prefill too."""
    ours, tok, ref, llm = contenders(ckpt_path, threads)
    prompt = tok.encode(PROMPT_TEXT)[:16]
    rows = []
    for batch in batches:
        prompts, ids, outputs = [prompt] * batch, torch.tensor([prompt] * batch), {}

        def run_ours(model, compile, name):
            outputs[name] = generate(model, prompts, new_tokens, compile=compile)[0]

        def run_ref():
            with torch.inference_mode():
                ref.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_id)
        fns = {f"ours {fmt}{' compiled' * c}": (lambda m=m, c=c, n=f"{fmt}{c}": run_ours(m, c, n))
               for fmt, m in ours.items() for c in (False, True)}
        fns["transformers fp32"] = run_ref
        if llm is not None and batch == 1:
            fns["llama.cpp Q4_1"] = lambda: outputs.__setitem__("llama.cpp", [llama_greedy(llm, prompt, new_tokens)])
        seconds, warmups = timed_interleaved(fns, 2 if batch >= 32 else 3)
        row = {"batch": batch, "new_tokens": new_tokens, "first_call_s": warmups,
               "tok_s": {k: batch * new_tokens / v for k, v in seconds.items()},
               "llama.cpp": "not installed" if llm is None else
               "measured" if batch == 1 else "no batched decode in llama-cpp-python",
               "compiled_first_difference": {fmt: first_difference(outputs[f"{fmt}True"], outputs[f"{fmt}False"])
                                             for fmt in ours}}
        if "llama.cpp" in outputs:
            row["int4_vs_llama_cpp_first_difference"] = first_difference(outputs["int4True"], outputs["llama.cpp"])
        best = max((k for k in row["tok_s"] if k.startswith("ours")), key=row["tok_s"].get)
        row["best_ours"] = best
        row["best_vs_transformers"] = row["tok_s"][best] / row["tok_s"]["transformers fp32"]
        if "llama.cpp Q4_1" in row["tok_s"]:
            row["best_vs_llama_cpp"] = row["tok_s"][best] / row["tok_s"]["llama.cpp Q4_1"]
        rows.append(row)
        print(f"decode batch {batch}: " + "  ".join(f"{k} {v:.1f}" for k, v in row["tok_s"].items()) +
              f"  | best {best}: x{row['best_vs_transformers']:.2f} transformers" +
              (f", x{row['best_vs_llama_cpp']:.2f} llama.cpp" if "best_vs_llama_cpp" in row else ""))
    return rows


def run(args) -> list[dict]:
    return bench_decode(args.checkpoint, args.batches, args.new_tokens, args.threads)


def plot(rows: list[dict], ax_grid):
    fig, axes = ax_grid(1, len(rows), figsize=(6 * len(rows), 4.5), squeeze=False)
    for ax, row in zip(axes[0], rows):
        named_bars(ax, row["tok_s"], "generated tokens/s")
        ax.set_title(f"SmolLM2-135M, greedy, batch {row['batch']}, {row['new_tokens']} new tokens")
    return fig
