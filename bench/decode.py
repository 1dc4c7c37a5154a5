"""One user and fixed batches, greedy, 16-token prompts: ours against transformers and llama.cpp's own tools.

Three kinds of row:
  cli     what a user gets from one `inference.py` run with no flags (a second process on the machine, so the
          kernels are built), 16-token prompt + 128 new tokens: its time from the first prompt token to the last
          new token, plus the step's set-up and the kernels' loading; llama.cpp: llama-bench's pp16 + tg128 time.
          The same with --step compiled, whose first-ever compile and warm start are reported apart.
  decode  generated tokens/s at a fixed batch, in this process, each contender timed in turns: ours with the
          checkpoint's own weights (the GGUF's int4 blocks) through the fused, eager and compiled steps (and the
          fused step with int8 activations, where AVX-512 VNNI runs them), ours in fp32, bf16 (eager, and fused
          where AVX-512 BF16 runs it) and re-quantized int8 (also with int8 activations), transformers fp32;
          llama.cpp: tg128 (batch 1) or llama-batched-bench (more sequences); OpenVINO GenAI (fp16, int8, int4
          exports) and vLLM's CPU engine (bf16), where `make bench-install` put them, each in its own venv and
          process.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import llama, peers
from bench.common import (
    PROMPT,
    ROOT,
    first_difference,
    int8_activations,
    named_bars,
    timed_interleaved,
    transformers_model,
)
from checkpoint import config_and_tokenizer, load_checkpoint, load_model
from engine import generate
from layers import bf16_kernel
from machine import MACHINE


def run(args) -> list[dict]:
    _, tok = config_and_tokenizer(load_checkpoint(args.checkpoint, mmap=True))
    prompt = tok.encode(PROMPT)
    print(f"decode: the prompt is {len(prompt)} tokens")
    return [*cli_rows(args, prompt), *decode_rows(args, prompt)]


def cli_rows(args, prompt: list[int]) -> list[dict]:
    rows = []
    gguf, why = llama.gguf_of(args.checkpoint), llama.missing(args.checkpoint, "llama-bench")
    peer = llama.llama_bench(gguf, args.threads, len(prompt), args.new_tokens) if why is None else None
    llama_s = len(prompt) / peer[f"pp{len(prompt)}"] + args.new_tokens / peer[f"tg{args.new_tokens}"] if peer else None
    for step in ("auto", "compiled"):
        first = cli_run(args, step)  # builds or compiles what the later ones reuse
        runs = sorted((cli_run(args, step) for _ in range(3)), key=lambda r: r["wall_s"] + r["setup_s"])
        second = runs[1]  # the median of three, as llama-bench averages its repeats
        ours_s = second["wall_s"] + second["setup_s"]
        row = {"kind": "cli", "step": second["step"], "weights": second["weights"], "new_tokens": args.new_tokens,
               "prompt_tokens": len(prompt), "generation_s": second["wall_s"], "setup_s": second["setup_s"],
               "load_s": second["load_s"], "process_s": second["process_s"], "ours_s": ours_s,
               "first_run": {k: first.get(k) for k in ("wall_s", "setup_s", "compile_s", "process_s")},
               "second_run_compile_s": second.get("compile_s"), "llama.cpp": why or peer, "llama_cpp_s": llama_s,
               "vs_llama_cpp": llama_s / ours_s if llama_s else None}
        rows.append(row)
        print(f"cli {row['step']:8}: {ours_s:.2f} s (generation {row['generation_s']:.2f} + set-up "
              f"{row['setup_s']:.2f}), first run {first['process_s']:.1f} s in all, llama.cpp "
              + (f"{llama_s:.2f} s: x{row['vs_llama_cpp']:.2f}" if llama_s else why))
    return rows


def cli_run(args, step: str) -> dict:
    """One `inference.py` process, as a user types it (plus --step, --ignore-eos and the stats file)."""
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "stats.json"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "inference.py", "--checkpoint", args.checkpoint, "--prompt", PROMPT,
                        "--max-new-tokens", str(args.new_tokens), "--temperature", "0", "--ignore-eos", "--step", step,
                        "--stats-json", str(stats)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        return json.loads(stats.read_text()) | {"process_s": time.perf_counter() - t0}


def decode_rows(args, prompt: list[int]) -> list[dict]:
    """Each contender through `generate()` at each batch, taking turns (a drift in the machine's speed hits
    all alike); llama.cpp's own tools run after, on the same machine, alone."""
    models = {"auto": load_model(args.checkpoint)[0], "fp32": load_model(args.checkpoint, quantize="none")[0],
              "int8": load_model(args.checkpoint, quantize="int8")[0],
              "bf16": load_model(args.checkpoint, dtype="bf16", quantize="none")[0]}
    ref = transformers_model(args.checkpoint)
    gguf, why = llama.gguf_of(args.checkpoint), llama.missing(args.checkpoint, "llama-batched-bench")
    rows = []
    for batch in args.batches:
        prompts, outputs = [prompt] * batch, {}

        def ours(name, model, step):
            outputs[name] = generate(model, prompts, args.new_tokens, step=step)[0]

        def transformers():
            with torch.inference_mode():
                ref.generate(torch.tensor(prompts), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             do_sample=False, pad_token_id=0)
        fns = {f"ours {name} {step}": (lambda n=name, m=models[name], s=step: ours(f"{n} {s}", m, s))
               for name, step in (("auto", "fused"), ("auto", "eager"), ("auto", "compiled"), ("fp32", "fused"),
                                  ("int8", "fused"), ("bf16", "eager"),
                                  *([("bf16", "fused")] if bf16_kernel() != "none" else []))}
        pin = int8_activations()
        for name in ("auto", "int8") if pin else ():  # int4 and int8 weights, each with int8 activations
            def int8_fused(n=name):
                with MACHINE.pinned(pin):
                    ours(f"{n} fused int8-activations", models[n], "fused")
            fns[f"ours {name} fused int8-activations"] = int8_fused
        fns["transformers fp32"] = transformers
        seconds, first_call = timed_interleaved(fns, 2 if batch >= 32 else 3)
        tok_s = {k: batch * args.new_tokens / v for k, v in seconds.items()}
        if why is None:
            peer = llama.batched_bench(gguf, args.threads, len(prompt), args.new_tokens, [batch])[0]
            tok_s["llama.cpp Q4_1"] = batch * args.new_tokens / peer["t"]  # new tokens over prompt + generation
        for name, fmt in (("openvino", "fp16"), ("openvino", "int8"), ("openvino", "int4"), ("vllm", "bf16")):
            if peers.missing(name) is None:
                model_dir = peers.openvino_export(args.checkpoint, fmt) if name == "openvino" else \
                    peers.hf_export(args.checkpoint)
                got = peers.fixed_batch(name, model_dir, PROMPT, batch, args.new_tokens, args.threads)
                tok_s[f"{name} {fmt}"] = batch * args.new_tokens / got["seconds"]
                outputs[f"{name} {fmt}"] = [got["first_row"]]
        row = {"kind": "decode", "batch": batch, "new_tokens": args.new_tokens, "tok_s": tok_s,
               "first_call_s": first_call, "llama.cpp": why or "llama-batched-bench",
               "peers": {name: peers.missing(name) or "installed" for name in ("openvino", "vllm")},
               "same_tokens_as_fused": {k: first_difference(outputs[k], outputs["auto fused"]) for k in outputs}}
        if "llama.cpp Q4_1" in tok_s:
            row["fused_vs_llama_cpp"] = tok_s["ours auto fused"] / tok_s["llama.cpp Q4_1"]
        rows.append(row)
        print(f"decode batch {batch}: " + "  ".join(f"{k} {v:.1f}" for k, v in tok_s.items()))
    return rows


def plot(rows: list[dict], subplots):
    decode = [r for r in rows if r["kind"] == "decode"]
    cli = [r for r in rows if r["kind"] == "cli"]
    fig, axes = subplots(1, len(decode) + 1, figsize=(6 * (len(decode) + 1), 4.5), squeeze=False)
    times = {f"ours, --step {r['step']}": r["ours_s"] for r in cli}
    if cli and cli[0]["llama_cpp_s"]:
        times["llama.cpp (llama-bench pp16 + tg128)"] = cli[0]["llama_cpp_s"]
    named_bars(axes[0][0], times, "seconds (lower is better)")
    axes[0][0].set_title("One CLI run: 16-token prompt + 128 new tokens")
    for ax, row in zip(axes[0][1:], decode):
        named_bars(ax, row["tok_s"], "tokens/s")
        ax.set_title(f"batch {row['batch']}, greedy, {row['new_tokens']} new tokens")
    return fig
