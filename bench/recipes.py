"""Training recipes side by side: each trains the same preset for the same wall-clock budget on this machine."""
from __future__ import annotations

import subprocess
import sys

from checkpoint import load_checkpoint, model_from_checkpoint
from engine import generate
from optim import RECIPES as PRESET_RECIPES

# The recipe before issue 17, pinned, and one rung per change, each keeping the rungs above it; the last is
# `make train` now (tiny's defaults). 3-minute screening runs chose each value (README). The older rungs keep
# tiny's old shape (a 256-token context, the head tied to the embedding); other presets keep their own.
BEFORE = {"optimizer": "adamw", "schedule": "cosine", "lr": 1e-3, "tokens_per_step": 8192}
RECIPES = {"before": BEFORE, "muon+wsd": BEFORE | {"optimizer": "muon", "schedule": "wsd", "lr": 4e-3},
           "now": PRESET_RECIPES["tiny"]}
TINY_BEFORE = ["--max-seq-len", "256", "--tie-embeddings"]
EVAL_TOKENS = 409_600  # every recipe evaluates after the same number of tokens, so evaluation costs each alike


def bench_recipes(preset: str, minutes: float, names: list[str], extra: list[str], repeats: int = 1) -> list[dict]:
    """Each recipe trains `preset` from scratch for the same wall-clock budget on this machine, taking turns
    (before, ..., now, before, ...), with the same evaluation code (evaluate.py: bits per byte over the whole
    validation split, tested against an independent count). `extra` flags go last, so they win. A sample
    (temperature 0.8, seed 0, as inference.py gives) of each is kept."""
    out = []
    for repeat in range(repeats):
        for name in names:
            run = f"{preset}-{name}-{repeat}"
            flags = [f for key, value in RECIPES[name].items() for f in (f"--{key.replace('_', '-')}", str(value))]
            flags += (TINY_BEFORE if preset == "tiny" and name != "now" else []) + extra
            # the last --tokens-per-step wins, as in train.py's parser
            tokens_per_step = int([b for a, b in zip(flags, flags[1:]) if a == "--tokens-per-step"][-1])
            command = [sys.executable, "train.py", "--preset", preset, "--time-budget", str(minutes), "--run-name",
                       run, "--out-dir", "checkpoints/recipes", "--eval-every",
                       str(max(1, EVAL_TOKENS // tokens_per_step)), *flags]
            print(f"recipes: {' '.join(command[1:])}", flush=True)
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            ckpt = load_checkpoint(f"checkpoints/recipes/{run}/last.ckpt")
            model, tok = model_from_checkpoint(ckpt)
            prompt = tok.encode("ROMEO.")
            sample = tok.decode(prompt + generate(model, [prompt], 100, temperature=0.8, seed=0)[0][0])
            h, args = ckpt["history"], ckpt["train_args"]
            row = {"recipe": name, "preset": preset, "repeat": repeat, "minutes": minutes, "flags": flags,
                   "optimizer": args["optimizer"], "schedule": args["schedule"], "lr": args["lr"],
                   "muon_lr": args.get("muon_lr"), "tokens_per_step": args["tokens_per_step"],
                   "config": ckpt["config"], "params": model.num_params(), "steps": ckpt["step"],
                   "elapsed_s": ckpt["elapsed_s"], "tokens": ckpt["step"] * args["tokens_per_step"],
                   "val_bpb": h["val_bpb"][-1][1],
                   "curve": [(t, b) for (_, t), (_, b) in zip(h["val_elapsed_s"], h["val_bpb"])],
                   "sample": sample}
            out.append(row)
            print(f"recipes: {name}: val bits/byte {row['val_bpb']:.4f} after {row['steps']} steps, "
                  f"{row['tokens']:,} tokens in {row['elapsed_s'] / 60:.1f} min", flush=True)
    for name in names:
        mine = [r["val_bpb"] for r in out if r["recipe"] == name]
        print(f"recipes: {name}: median val bits/byte {sorted(mine)[len(mine) // 2]:.4f} over {len(mine)} runs")
    return out


def run(args) -> list[dict]:
    return bench_recipes(args.recipe_preset, args.recipe_minutes, args.recipes, args.recipe_flags.split(),
                         args.recipe_repeats)


def plot(rows: list[dict], ax_grid):
    fig, ax = ax_grid(figsize=(8, 4.5))
    for row in rows:
        before = row["recipe"] == "before"
        ax.plot([t / 60 for t, _ in row["curve"]], [b for _, b in row["curve"]], "s--" if before else "o-",
                alpha=0.8, label=f"{row['recipe']} ({row['optimizer']}, {row['schedule']}, lr {row['lr']:g}, "
                f"{row['tokens_per_step']} tok/step): {row['val_bpb']:.3f}")
    ax.set(xlim=(0, rows[0]["minutes"] * 1.05), xlabel="wall-clock minutes", ylabel="validation bits per byte",
           title=f"{rows[0]['preset']}: the training recipes side by side, {rows[0]['minutes']:g} min each on "
                 "this machine")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
