"""Training recipes side by side: each trains the same preset for the same wall-clock budget on this machine."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import data
from checkpoint import load_checkpoint, model_from_checkpoint
from config import ModelConfig
from engine import generate
from evaluate import evaluate

# Each rung pins every setting it names, so it stays what it was whatever tiny's defaults become; flags left
# out are the preset's (`now` names none: it is `make train`). 3-minute screening runs chose each value (README).
# The model fields are tiny's; other presets keep their own shape.
PLAIN = {"qk_norm": False, "zero_init": False, "value_residual": False, "logit_softcap": 0, "mlp": "swiglu",
         "unet_skips": False, "ffn_hidden": 704, "vocab_size": 4096, "max_seq_len": 128, "tie_embeddings": False,
         "batch_ramp": 0, "doc_chunks": False}  # tiny's model and data before issue 28
# The recipe before issue 17: AdamW + cosine, a 256-token context, the head tied to the embedding.
BEFORE = PLAIN | {"optimizer": "adamw", "schedule": "cosine", "lr": 1e-3, "tokens_per_step": 8192,
                  "max_seq_len": 256, "tie_embeddings": True, "dtype": "fp32", "compile": "off"}
ISSUE_17 = PLAIN | {"optimizer": "muon", "schedule": "wsd", "lr": 4e-3, "tokens_per_step": 4096, "dtype": "fp32",
                    "compile": "off"}  # make train after issue 17 (fp32 on every CPU, uncompiled)
PRECISION = ISSUE_17 | {"dtype": "auto", "compile": "auto"}  # timed per machine (training.py)
# `now` adds QK-norm, value residuals and U-net skips (the levers that paid in screening) to PRECISION.
RECIPES = {"before": BEFORE, "muon+wsd": BEFORE | {"optimizer": "muon", "schedule": "wsd", "lr": 4e-3},
           "issue-17": ISSUE_17, "+precision": PRECISION, "now": {}}
LADDER = ["issue-17", "+precision", "now"]  # this issue's rungs, the default
EVAL_TOKENS = 409_600  # every recipe evaluates after the same number of tokens, so evaluation costs each alike


def flags_of(settings: dict) -> list[str]:
    """train.py flags for a rung's settings: --name value, or --name / --no-name for a switch."""
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        out += ([flag] if value else [f"--no-{flag[2:]}"]) if isinstance(value, bool) else [flag, str(value)]
    return out


def bench_recipes(preset: str, minutes: float, names: list[str], extra: list[str], repeats: int = 1) -> list[dict]:
    """Each recipe trains `preset` from scratch for the same wall-clock budget on this machine, taking turns
    (the first, ..., the last, the first, ...). Each is scored by the same evaluation, in fp32 whatever it
    trained in (evaluate.py: bits per byte over the whole validation split, tested against an independent
    count), on its last checkpoint; its curve is the run's own evaluations. `extra` flags go last, so they win.
    A sample (temperature 0.8, seed 0, as inference.py gives) of each is kept."""
    out = []
    for repeat in range(repeats):
        for name in names:
            run = f"{preset}-{name}-{repeat}"
            shape = {f.name for f in fields(ModelConfig)} if preset != "tiny" else set()
            flags = flags_of({k: v for k, v in RECIPES[name].items() if k not in shape}) + extra
            tokens_per_step = int(next((b for a, b in zip(flags[::-1][1:], flags[::-1]) if a == "--tokens-per-step"),
                                       4096 if preset == "tiny" else 100_000))  # the last one wins, as in argparse
            command = [sys.executable, "train.py", "--preset", preset, "--time-budget", str(minutes), "--run-name",
                       run, "--out-dir", "checkpoints/recipes", "--eval-every",
                       str(max(1, EVAL_TOKENS // tokens_per_step)), *flags]
            print(f"recipes: {' '.join(command[1:])}", flush=True)
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            ckpt = load_checkpoint(f"checkpoints/recipes/{run}/last.ckpt")
            model, tok = model_from_checkpoint(ckpt)
            h, args = ckpt["history"], ckpt["train_args"]
            tokens_dir = Path(args["data_dir"]) / f"{Path(args['data']).name}-{data.tokenizer_hash(tok)}"
            val = data.Chunks(data.load_shards(tokens_dir, data.read_meta(tokens_dir), "val"), args["seq_len"])
            _, bpb = evaluate(model, val, data.token_byte_lengths(tok), 16)
            prompt = tok.encode("ROMEO.")
            sample = tok.decode(prompt + generate(model, [prompt], 100, temperature=0.8, seed=0)[0][0])
            row = {"recipe": name, "preset": preset, "repeat": repeat, "minutes": minutes, "flags": flags,
                   "optimizer": args["optimizer"], "schedule": args["schedule"], "lr": args["lr"],
                   "dtype": args["dtype"], "compile": args["compile"], "muon_lr": args.get("muon_lr"),
                   "tokens_per_step": args["tokens_per_step"], "config": ckpt["config"],
                   "levers": model.config.levers, "params": model.num_params(), "steps": ckpt["step"],
                   "elapsed_s": ckpt["elapsed_s"], "val_bpb": bpb, "val_bpb_in_training": h["val_bpb"][-1][1],
                   "curve": [(t, b) for (_, t), (_, b) in zip(h["val_elapsed_s"], h["val_bpb"])],
                   "sample": sample}
            out.append(row)
            print(f"recipes: {name}: val bits/byte {bpb:.4f} (fp32) after {row['steps']} steps "
                  f"({args['dtype']}, compile {args['compile']}) in {row['elapsed_s'] / 60:.1f} min", flush=True)
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
        old = row["recipe"] in ("before", "issue-17")
        ax.plot([t / 60 for t, _ in row["curve"]], [b for _, b in row["curve"]], "s--" if old else "o-",
                alpha=0.8, label=f"{row['recipe']} ({row['optimizer']}, {row['dtype']}, compile {row['compile']}, "
                f"{', '.join(row['levers']) or 'no levers'}): {row['val_bpb']:.3f}")
    ax.set(xlim=(0, rows[0]["minutes"] * 1.05), xlabel="wall-clock minutes", ylabel="validation bits per byte",
           title=f"{rows[0]['preset']}: the training recipes side by side, {rows[0]['minutes']:g} min each on "
                 "this machine")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
