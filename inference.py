"""Batched, KV-cached generation over one or more processes, with a tokens/sec report and plots.

  python inference.py --checkpoint checkpoints/tiny --prompt "ROMEO." --max-new-tokens 100
  python inference.py --checkpoint checkpoints/tiny --prompts-file prompts.txt --batch-size 32 --num-procs 2
  python inference.py --checkpoint checkpoints/tiny --benchmark      # plots in generated_texts/

A prompt longer than the context window minus --max-new-tokens is an error; --truncate keeps its end instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from config import ArgumentParser, exit_with_error, positive
from model import GPT, generate
from tokenizer import StreamDecoder, Tokenizer

SEED_PROMPTS = ["One day, Lily met a Shoggoth", "There was a girl called Rosy", "Once upon a time",
                "The future of artificial intelligence", "In the distant galaxy"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run directory or .ckpt file")
    p.add_argument("--prompt", action="append", help="repeatable; default: the seeds' five prompts")
    p.add_argument("--prompts-file", help="one prompt per line, or JSONL with a 'prompt' field")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--truncate", action="store_true", help="keep the end of a prompt that is too long")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive(int), default=16)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-procs", type=positive(int), default=1,
                   help="worker processes (one GPU each, or a CPU thread share)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens (benchmarks)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (frozen, prepacked weights on CPU; CUDA graphs on GPU); "
                        "each new batch shape pays a compile of ~30-60 s")
    p.add_argument("--output", help="write results: .jsonl (prompt, completion, token ids) or .md")
    p.add_argument("--stats-json", help="write the speed report as JSON")
    p.add_argument("--benchmark", action="store_true", help="sweep batch sizes and process counts, plot")
    p.add_argument("--bench-dir", default="generated_texts")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors exit 2 with one line naming the flag and the allowed values."""
    if args.max_new_tokens <= 0:
        p.error(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0 (got {args.temperature}); 0 means greedy")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k must be at least 1 (got {args.top_k})")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1] (got {args.top_p})")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"unknown --device {args.device!r}; use cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        p.error(f"unsupported --device {args.device!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is visible; use --device cpu")


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file not found: {path}")
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                prompts.append(json.loads(line)["prompt"] if path.suffix == ".jsonl" else line)
    return prompts or list(SEED_PROMPTS)


def encode_prompts(tok: Tokenizer, prompts: list[str], max_new_tokens: int, context: int,
                   chat: bool = False, truncate: bool = False) -> list[list[int]]:
    """Token ids per prompt (wrapped in the chat template with chat=True). An empty prompt is an error;
    an over-long one is an error too, unless truncate=True keeps its last tokens."""
    for i, text in enumerate(prompts):
        if not text:
            raise ValueError(f"prompt {i + 1} is empty; give at least one character of text")
    if chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": text}]) for text in prompts]
    if max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the "
                         f"{context}-token context window; use at most {context - 1}")
    room = context - max_new_tokens
    encoded = []
    for i, ids in enumerate(tok.encode_batch(prompts)):
        if len(ids) > room:
            if not truncate:
                raise ValueError(f"prompt {i + 1} has {len(ids)} tokens but only {room} fit before "
                                 f"{max_new_tokens} new tokens in the {context}-token context; shorten it, "
                                 f"lower --max-new-tokens, or pass --truncate to keep its end")
            print(f"warning: prompt {i + 1} has {len(ids)} tokens; keeping the last {room} so that "
                  f"{max_new_tokens} new tokens fit the {context}-token context", file=sys.stderr)
            ids = ids[-room:]
        encoded.append(ids)
    return encoded


def load_model(checkpoint: str, device: str, dtype: str) -> tuple[GPT, Tokenizer]:
    model, tok = model_from_checkpoint(load_checkpoint(checkpoint), device)
    return model.to(DTYPES[dtype]), tok


def generate_all(model: GPT, tok: Tokenizer, prompts: list[list[int]], args: argparse.Namespace,
                 generator: torch.Generator | None = None, stream=None) -> tuple[list[list[int]], dict]:
    """Generate for any number of prompts in batches of --batch-size; results in input order.

    Prompts are sorted by length first so that a batch wastes little on padding. stream(text) gets the
    completion of a lone prompt piece by piece.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int] | None] = [None] * len(prompts)
    totals = {"prefill_tokens": 0, "prefill_s": 0.0, "new_tokens": 0, "decode_s": 0.0}
    on_token = None
    if stream is not None and len(prompts) == 1:
        decoder = StreamDecoder(tok)

        def on_token(step, next_ids):
            token = int(next_ids[0])
            if token != tok.eos_id or args.ignore_eos:
                stream(decoder.push(token))
    t0 = time.perf_counter()
    for start in range(0, len(order), args.batch_size):
        batch = order[start:start + args.batch_size]
        rows, stats = generate(model, [prompts[i] for i in batch], args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               eos_id=None if args.ignore_eos else tok.eos_id, pad_id=tok.pad_id,
                               generator=generator, use_cache=not args.no_kv_cache,
                               compile=args.compile, on_token=on_token)
        for i, row in zip(batch, rows):
            results[i] = row
        for key in totals:
            totals[key] += stats[key]
    if on_token is not None:
        stream(decoder.flush())  # a held-back partial character
    wall = time.perf_counter() - t0
    model.free_kv_cache()
    report = {"prefill_tokens_per_s": totals["prefill_tokens"] / max(totals["prefill_s"], 1e-9),
              "decode_tokens_per_s": totals["new_tokens"] / max(totals["decode_s"], 1e-9),
              "generated_tokens_per_s": totals["new_tokens"] / wall, "wall_s": wall,
              "batch_size": args.batch_size, "new_tokens": totals["new_tokens"],
              "prefill_tokens": totals["prefill_tokens"], "prompts": len(prompts)}
    return results, report


# --- worker processes -----------------------------------------------------------------------------
def _worker(rank: int, args: argparse.Namespace, shards: list[list[int]], prompts: list[list[int]], queue) -> None:
    """One process: its own GPU (cuda:rank) or an equal share of the CPU threads; loads the model once."""
    if torch.device(args.device).type == "cuda":
        device = f"cuda:{rank % torch.cuda.device_count()}"
    else:
        device = "cpu"
        torch.set_num_threads(args.threads_per_proc)
    model, tok = load_model(args.checkpoint, device, args.dtype)
    generator = torch.Generator(device=device).manual_seed(args.seed + rank)
    indices = shards[rank]
    rows, report = generate_all(model, tok, [prompts[i] for i in indices], args, generator)
    queue.put((rank, indices, rows, report))


def run_workers(args: argparse.Namespace, prompts: list[list[int]]) -> tuple[list[list[int]], dict]:
    """Shard prompts over --num-procs spawned workers; gather completions back in input order."""
    n = min(args.num_procs, len(prompts))
    args.threads_per_proc = max(1, torch.get_num_threads() // n)
    shards = [list(range(len(prompts)))[r::n] for r in range(n)]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    t0 = time.perf_counter()
    procs = mp.spawn(_worker, args=(args, shards, prompts, queue), nprocs=n, join=False)
    results: list[list[int] | None] = [None] * len(prompts)
    workers = [None] * n
    for _ in range(n):  # read before join: a worker blocks until its result leaves the pipe
        rank, indices, rows, report = queue.get()
        workers[rank] = report
        for i, row in zip(indices, rows):
            results[i] = row
    procs.join()
    new_tokens = sum(w["new_tokens"] for w in workers)
    wall = max(w["wall_s"] for w in workers)
    report = {"prefill_tokens_per_s": sum(w["prefill_tokens_per_s"] for w in workers),
              "decode_tokens_per_s": sum(w["decode_tokens_per_s"] for w in workers),
              "generated_tokens_per_s": new_tokens / wall, "wall_s": wall,
              "wall_with_startup_s": time.perf_counter() - t0, "batch_size": args.batch_size,
              "new_tokens": new_tokens, "prefill_tokens": sum(w["prefill_tokens"] for w in workers),
              "prompts": len(prompts), "num_procs": n, "workers": workers}
    return results, report


def run(args: argparse.Namespace, prompts: list[list[int]], model: GPT | None = None,
        tok: Tokenizer | None = None, stream=None) -> tuple[list[list[int]], dict]:
    """Generate with --num-procs workers, or in this process (reusing `model` when given)."""
    if args.num_procs > 1:
        return run_workers(args, prompts)
    if model is None:
        model, tok = load_model(args.checkpoint, args.device, args.dtype)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    rows, report = generate_all(model, tok, prompts, args, generator, stream)
    return rows, report | {"num_procs": 1}


def write_output(path: Path, texts: list[str], prompts: list[list[int]], rows: list[list[int]],
                 tok: Tokenizer) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for text, ids, row in zip(texts, prompts, rows):
            completion = tok.decode(row)
            if path.suffix == ".md":
                f.write(f"### {text}\n\n```\n{text}{completion}\n```\n\n")
            else:
                f.write(json.dumps({"prompt": text, "completion": completion, "prompt_ids": ids,
                                    "completion_ids": row}, ensure_ascii=False) + "\n")


def speed_line(report: dict) -> str:
    return (f"prefill {report['prefill_tokens_per_s']:,.0f} tok/s | decode {report['decode_tokens_per_s']:,.0f} tok/s"
            f" | generated {report['new_tokens']} tokens in {report['wall_s']:.2f}s = "
            f"{report['generated_tokens_per_s']:,.1f} tok/s (batch {report['batch_size']}, "
            f"{report['num_procs']} proc)")


# --- --benchmark: batch-size and process-count sweeps ----------------------------------------------
BENCH_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def benchmark(args: argparse.Namespace) -> None:
    """tokens/s against batch size (with and without the KV cache) and against the number of processes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, tok = load_model(args.checkpoint, args.device, args.dtype)
    args.ignore_eos = True  # fixed-length rows: every configuration generates the same work
    base = encode_prompts(tok, SEED_PROMPTS, args.max_new_tokens, model.config.max_seq_len)
    results = {"device": args.device, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
               "checkpoint": str(args.checkpoint), "batch_sweep": [], "proc_sweep": []}
    for cache in (True, False):
        for batch in BENCH_BATCHES:
            run_args = argparse.Namespace(**{**vars(args), "batch_size": batch, "no_kv_cache": not cache,
                                             "num_procs": 1})
            _, report = run(run_args, [base[i % len(base)] for i in range(batch)], model, tok)
            results["batch_sweep"].append(report | {"kv_cache": cache})
            print(f"kv_cache={cache!s:5} {speed_line(report)}")
    n_gpus = torch.cuda.device_count() if torch.device(args.device).type == "cuda" else 0
    max_procs = n_gpus or os.cpu_count() or 1
    workload = [base[i % len(base)] for i in range(64)]
    for n in sorted({1, 2, 4, 8, max_procs} & set(range(1, max_procs + 1))):
        run_args = argparse.Namespace(**{**vars(args), "num_procs": n, "no_kv_cache": False})
        _, report = run(run_args, workload, model if n == 1 else None, tok)
        results["proc_sweep"].append(report)
        print(f"procs={n} {speed_line(report)}")

    out = Path(args.bench_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference_speed.json").write_text(json.dumps(results, indent=1))
    where = f"{args.device}, {args.dtype}, {args.max_new_tokens} new tokens"
    fig, ax = plt.subplots(figsize=(7, 4))
    for cache in (True, False):
        rows = [r for r in results["batch_sweep"] if r["kv_cache"] == cache]
        ax.plot([r["batch_size"] for r in rows], [r["generated_tokens_per_s"] for r in rows], "o-",
                label="KV cache" if cache else "no KV cache")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="generated tokens/s",
           title=f"Batched generation, one process ({where})")
    ax.set_xticks(BENCH_BATCHES, [str(b) for b in BENCH_BATCHES])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "inference_speed_1gpu.png", dpi=100)
    fig, ax = plt.subplots(figsize=(7, 4))
    procs = results["proc_sweep"]
    ax.plot([r["num_procs"] for r in procs], [r["generated_tokens_per_s"] for r in procs], "o-", label="total")
    ax.set(xlabel="processes", ylabel="generated tokens/s",
           title=f"64 prompts, batch {args.batch_size} per process ({where})")
    ax.set_xticks([r["num_procs"] for r in procs])
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "inference_speed_distributed.png", dpi=100)
    plt.close("all")
    print(f"wrote {out}/inference_speed.json, inference_speed_1gpu.png, inference_speed_distributed.png")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        if args.benchmark:
            benchmark(args)
            return
        model, tok = load_model(args.checkpoint, args.device, args.dtype)
        texts = read_prompts(args)
        prompts = encode_prompts(tok, texts, args.max_new_tokens, model.config.max_seq_len, args.chat,
                                 args.truncate)
        single = len(prompts) == 1 and args.num_procs == 1
        if single:
            print(texts[0], end="", flush=True)
        stream = (lambda piece: print(piece, end="", flush=True)) if single else None
        rows, report = run(args, prompts, model, tok, stream)
        if single:
            print()
        else:
            for text, row in zip(texts, rows):
                print(f"--- {text}{tok.decode(row)}")
        for worker in report.get("workers", []):
            print(f"worker: {speed_line(worker | {'num_procs': 1})}")
        print(speed_line(report))
        if args.output:
            write_output(Path(args.output), texts, prompts, rows, tok)
        if args.stats_json:
            Path(args.stats_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.stats_json).write_text(json.dumps(report, indent=1))
    except (CheckpointError, ValueError, FileNotFoundError, json.JSONDecodeError, KeyError) as e:
        exit_with_error(e, args.debug)


if __name__ == "__main__":
    main()
