"""What quantizing costs: validation bits per byte and greedy agreement with fp32."""
from __future__ import annotations

from pathlib import Path

import torch

import data
from bench.common import CHAT_PROMPTS, named_bars, row_differences
from checkpoint import config_and_tokenizer, load_checkpoint, model_from_checkpoint
from engine import generate
from evaluate import evaluate
from quantize import quantize_model


def bench_quality(ckpt_paths: list[str], new_tokens: int = 128) -> list[dict]:
    """Bits per byte on the Shakespeare validation split (hamlet + tempest, evaluate.py) and greedy agreement
    with fp32 over 128 tokens (8 chat prompts, raw text), for int8 and int4 quantized from the fp32 weights,
    and int4 from the GGUF's own blocks where the checkpoint kept them."""
    rows = []
    for path in ckpt_paths:
        ckpt = load_checkpoint(path)
        config, tok = config_and_tokenizer(ckpt)
        seq = min(512, config.max_seq_len)
        tokens_dir = Path("data") / f"shakespeare-{data.tokenizer_hash(tok)}"
        meta = data.prepare("shakespeare", tok, tokens_dir, splits=("val",))
        chunks = data.Chunks(data.load_shards(tokens_dir, meta, "val"), seq)
        lengths = data.token_byte_lengths(tok)
        prompts = [tok.encode(t) for t in CHAT_PROMPTS.read_text().splitlines()[:8]]
        variants = {"fp32": {}, "int8": {"mode": "int8"}, "int4": {"mode": "int4"}}
        if ckpt.get("gguf_blocks"):
            variants["int4, GGUF blocks"] = {"mode": "int4", "gguf_blocks": ckpt["gguf_blocks"]}
        greedy, fp32_bpb = {}, None
        for name, how in variants.items():
            model, _ = model_from_checkpoint(ckpt)
            if how:
                quantize_model(model, how["mode"], how.get("gguf_blocks"))
            with torch.inference_mode():
                loss, bpb = evaluate(model, chunks, lengths, 8)
            greedy[name] = generate(model, prompts, new_tokens, batch_size=8)[0]
            same = [new_tokens if d is None else d for d in row_differences(greedy[name], greedy["fp32"])]
            row = {"checkpoint": str(path), "variant": name, "val_loss": loss, "val_bpb": bpb,
                   "greedy_agreement": sum(same) / len(same) / new_tokens}
            fp32_bpb = fp32_bpb or bpb  # the first variant is fp32
            row["bpb_vs_fp32"] = bpb / fp32_bpb
            rows.append(row)
            print(f"quality {Path(path).name} {name:18}: val bits/byte {bpb:.4f} (x{row['bpb_vs_fp32']:.4f} fp32), "
                  f"greedy tokens the same as fp32 for {row['greedy_agreement']:.0%} of {new_tokens}")
    return rows


def run(args) -> list[dict]:
    return bench_quality([args.checkpoint] + [c for c in args.also_checkpoint if Path(c).exists()])


def plot(rows: list[dict], ax_grid):
    fig, ax = ax_grid(figsize=(8, 4))
    named_bars(ax, {f"{Path(r['checkpoint']).name}\n{r['variant']}": r["val_bpb"] for r in rows}, "val bits/byte")
    ax.set_title("Validation bits per byte (Shakespeare: hamlet + tempest)")
    return fig
