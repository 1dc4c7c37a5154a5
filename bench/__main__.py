"""Side by side, in one run on one machine: ours against transformers' LlamaForCausalLM (the same weights, from
our to-hf export) and llama.cpp (on the checkpoint's own GGUF, same threads, greedy), where it is installed
(make bench-install; otherwise its cells say "not installed"). Each section (one file of this package) writes
generated_texts/bench_<section>.json and .png, with the machine's own matmul and memory rates, which bound
every figure. Compile time is left out of the rates (a warm-up call first) and reported apart.

  python -m bench                                  # decode prefill gemv quality engine serve train
  python -m bench --only decode --batches 1 32     # batch-1 and batch-32 decode: fp32/int8/int4, plain/compiled
  python -m bench --only budget --batches 1 32     # a decode step's time: its matmuls alone, and the rest
  python -m bench --only engine                    # continuous vs static batching on the chat workload
  python -m bench --only speculate                 # n-gram speculation vs llama-server's ngram-simple
  python -m bench --only serve                     # serve.py vs llama.cpp's server at 1/8/32/64 clients
  python -m bench --only prefix                    # a shared system prompt: prefix cache on/off, llama-server
  python -m bench --only grammar                   # structured output: the mask's cost per token, free vs JSON
  python -m bench --only int8                      # the int8 KV cache and int8 activations against the exact path
  python -m bench --only sweep --checkpoint checkpoints/tiny    # batch sizes x KV cache, worker processes
  python -m bench --only train-budget              # where make train's step goes: fp32/bf16, eager/compiled
  python -m bench --only recipes                   # the recipe ladder side by side, 10 min each rung (tiny)
  python -m bench --only recipes --recipes now --recipe-minutes 40   # the ceiling: 4x the tokens (tiny)
  python -m bench --only recipes --recipe-preset slm-40m --recipe-minutes 5 --recipes before muon+wsd \
      "--recipe-flags=--tokens-per-step 4096 --seq-len 256"   # the same for slm-40m, CPU-sized steps
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from bench.common import machine_facts
from bench.recipes import LADDER, RECIPES
from config import ArgumentParser
from machine import MACHINE, prepare_process

# name: module
SECTIONS = {"decode": "decode", "budget": "budget", "prefill": "prefill", "speculate": "speculate", "gemv": "gemv",
            "quality": "quality", "engine": "batching", "serve": "server", "prefix": "prefix", "train": "training",
            "train-budget": "train_budget", "sweep": "sweep", "recipes": "recipes", "grammar": "grammar",
            "int8": "int8"}
DEFAULT = ["decode", "budget", "prefill", "speculate", "gemv", "quality", "engine", "serve", "prefix", "train"]


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--checkpoint", default="checkpoints/smollm2-135m-instruct",
                   help="real SmolLM2 weights (python convert.py smollm2)")
    p.add_argument("--only", choices=list(SECTIONS), nargs="+", default=DEFAULT)
    p.add_argument("--also-checkpoint", nargs="*", default=["checkpoints/tiny"],
                   help="more checkpoints for --only quality (fp32 weights of our own, where they exist)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64], help="concurrency levels (serve)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--recipe-preset", default="tiny", help="recipes: the model to train")
    p.add_argument("--recipe-minutes", type=float, default=10, help="recipes: wall-clock budget of each run")
    p.add_argument("--recipe-repeats", type=int, default=1, help="recipes: turns of each recipe")
    p.add_argument("--recipes", choices=list(RECIPES), nargs="+", default=LADDER,
                   help="recipes: which (default: this issue's ladder, from issue 17's make train to today's)")
    p.add_argument("--recipe-flags", default="", help="recipes: train.py flags added to every recipe")
    p.add_argument("--out", default="generated_texts")
    p.add_argument("--machine", default="", help="pin per-machine choices (see machine.py)")
    args = p.parse_args(argv)
    prepare_process(args.machine)
    torch.set_num_threads(args.threads)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    facts = machine_facts()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only:  # each section writes its own JSON and plot, so one can be run again alone
        section = importlib.import_module(f"bench.{SECTIONS[name]}")
        rows = section.run(args)
        if name == "recipes":  # a longer or shorter budget does not overwrite the 10-minute ladder
            name += f"_{args.recipe_preset}" + (f"_{args.recipe_minutes:g}min" if args.recipe_minutes != 10 else "")
        (out / f"bench_{name}.json").write_text(json.dumps({"torch": torch.__version__, "machine": facts,
                                                            "choices": MACHINE.summary(), "rows": rows}, indent=1))
        section.plot(rows, plt.subplots).savefig(out / f"bench_{name}.png", dpi=100, bbox_inches="tight")
        plt.close("all")
        print(f"wrote {out}/bench_{name}.json and .png")


if __name__ == "__main__":
    main()
