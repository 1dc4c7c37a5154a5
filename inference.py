"""Generation from the command line, through the engine (engine.py), in one process or several.

  python inference.py --checkpoint checkpoints/tiny --prompt "ROMEO." --max-new-tokens 100
  python inference.py --checkpoint checkpoints/tiny --prompts-file prompts.txt --batch-size 32 --num-procs 2
  torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29500 inference.py ...

Results come out in input order as soon as they are done (a killed run keeps what it wrote). With --num-procs
N, N worker processes pull prompts from one shared queue; the parent never loads the model. Under torchrun,
every rank on every node claims prompts from one counter in torchrun's store, and rank 0 writes the results.
A prompt longer than the context window minus --max-new-tokens is an error; --truncate keeps its end instead.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from checkpoint import CheckpointError, config_and_tokenizer, describe_weights, load_checkpoint, load_model
from config import ArgumentParser, add_inference_args, exit_with_error, positive
from distributed import setup_distributed, shared_store
from engine import Engine, LengthError, Request, encode_prompts
from machine import MACHINE, prepare_process
from model import GPT
from runner import compile_cache_hits
from tokenizer import Tokenizer

SEED_PROMPTS = ["One day, Lily met a Shoggoth", "There was a girl called Rosy", "Once upon a time",
                "The future of artificial intelligence", "In the distant galaxy"]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run directory or .ckpt file")
    p.add_argument("--prompt", action="append", help="repeatable; default: the seeds' five prompts")
    p.add_argument("--prompts-file", help="one prompt per line, or JSONL with a 'prompt' field")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: 128, or half the context where that is shorter (tiny's is 128 tokens)")
    p.add_argument("--truncate", action="store_true", help="keep the end of a prompt that is too long")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i, whatever runs it")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not part of the output")
    p.add_argument("--batch-size", type=positive(int), default=16, help="rows the engine generates at once")
    p.add_argument("--batching", choices=["continuous", "static"], default="continuous",
                   help="continuous: a finished row takes the next prompt at once; static: batch after batch")
    p.add_argument("--num-procs", type=positive(int), default=1,
                   help="worker processes (one GPU each, or a CPU thread share) on one shared queue")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens (benchmarks)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--output", help="write results as they finish, in input order: .jsonl or .md")
    p.add_argument("--stats-json", help="write the speed report as JSON")
    add_inference_args(p)
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors exit 2 with one line naming the flag and the allowed values."""
    if args.max_new_tokens is not None and args.max_new_tokens <= 0:
        p.error(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0 (got {args.temperature}); 0 means greedy")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k must be at least 1 (got {args.top_k})")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1] (got {args.top_p})")
    if args.num_procs > 1 and "RANK" in os.environ:
        p.error("--num-procs splits one machine; under torchrun each rank is a process already, so drop it")


def resolve_new_tokens(args: argparse.Namespace, context: int) -> None:
    if args.max_new_tokens is None:
        args.max_new_tokens = min(128, context // 2)


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


def make_engine(model: GPT, tok: Tokenizer, args: argparse.Namespace, max_len: int, prompts: int) -> Engine:
    """An engine of --batch-size rows, or fewer when there are fewer prompts (every row costs a step)."""
    return Engine(model, rows=min(args.batch_size, prompts), max_len=max_len, tokenizer=tok, step=args.step,
                  batching=args.batching, use_cache=not args.no_kv_cache, prefix_cache_mb=args.prefix_cache_mb,
                  kv_cache_dtype=args.kv_cache_dtype)


def make_request(i: int, ids: list[int], args: argparse.Namespace, on_text=None) -> Request:
    return Request(ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, seed=args.seed + i,
                   stop=tuple(args.stop), ignore_eos=args.ignore_eos, on_text=on_text, id=i,
                   speculate=args.draft_tokens if args.speculate == "ngram" else 0)


class InOrder:
    """Passes results on in input order: each as soon as it and every one before it have finished."""

    def __init__(self, emit: Callable[[int, Request], None]):
        self.emit, self.next, self.held = emit, 0, {}

    def __call__(self, request: Request) -> None:
        self.held[request.id] = request
        while self.next in self.held:
            self.emit(self.next, self.held.pop(self.next))
            self.next += 1


def speed_report(engine: Engine, requests: int, wall: float) -> dict:
    s = engine.summary()
    compiled = {"compile_s": s["compile_s"], "compile_cache": compile_cache_hits()} if engine.runner.compiled else {}
    return compiled | {
        "prefill_tokens_per_s": s["prefill_tokens"] / max(s["prefill_s"], 1e-9),
        "decode_tokens_per_s": s["new_tokens"] / max(s["decode_s"], 1e-9),
        "generated_tokens_per_s": s["new_tokens"] / wall, "wall_s": wall, "batch_size": engine.rows,
        "batching": engine.batching, "new_tokens": s["new_tokens"], "prefill_tokens": s["prefill_tokens"],
        "prompts": requests, "decode_steps": s["decode_steps"], "slot_utilisation": s["slot_utilisation"],
        "drafted": s["drafted"], "accepted": s["accepted"], "step": engine.runner.step,
        "prefix_cache": s["prefix_cache"],
        "weights": describe_weights(engine.model), "machine": MACHINE.summary()}


def generate_all(model: GPT, tok: Tokenizer, prompts: list[list[int]], args: argparse.Namespace,
                 emit: Callable[[int, Request], None] | None = None,
                 stream: Callable[[str], None] | None = None) -> tuple[list[list[int]] | None, dict]:
    """Generate for any number of prompts on one engine of --batch-size rows. emit(i, request) gets each
    result in input order as soon as it can; without emit the new token ids are returned, in input order.
    stream(text) gets the completion of a lone prompt piece by piece."""
    rows: list[list[int]] = []
    in_order = InOrder(emit or (lambda i, request: rows.append(request.tokens)))
    t_setup = time.perf_counter()
    engine = make_engine(model, tok, args, max(len(p) for p in prompts) + args.max_new_tokens, len(prompts))
    on_text = stream if len(prompts) == 1 else None
    t0 = time.perf_counter()
    for request in engine.run(make_request(i, ids, args, on_text) for i, ids in enumerate(prompts)):
        in_order(request)
    report = speed_report(engine, len(prompts), time.perf_counter() - t0)
    return (None if emit else rows), report | {"setup_s": t0 - t_setup}


# --- worker processes on one shared queue -----------------------------------------------------------
def _worker(rank: int, args: argparse.Namespace, max_len: int, prompts: int, tasks, results, start) -> None:
    """One process: its own GPU (cuda:rank) or an equal share of the CPU threads. It takes the next prompt
    from the shared queue whenever one of its rows is free, so no worker idles while others have work."""
    prepare_process(args.machine)
    if torch.device(args.device).type == "cuda":
        device = f"cuda:{rank % torch.cuda.device_count()}"
    else:
        device = "cpu"
        torch.set_num_threads(args.threads_per_proc)
    model, tok = load_model(args.checkpoint, device, args.dtype, args.quantize)
    engine = make_engine(model, tok, args, max_len, prompts)
    start.wait()  # every worker has loaded: none takes all the prompts while another is still loading

    def requests():
        while (task := tasks.get()) is not None:
            yield make_request(*task, args)
    t0, done = time.perf_counter(), 0
    for request in engine.run(requests()):
        results.put((rank, request))
        done += 1
    results.put((rank, speed_report(engine, done, time.perf_counter() - t0) | {"num_procs": 1}))


def run_workers(args: argparse.Namespace, prompts: list[list[int]],
                emit: Callable[[int, Request], None]) -> dict:
    """--num-procs spawned workers pull from one queue; emit(i, request) gets results in input order."""
    n = min(args.num_procs, len(prompts))
    args.threads_per_proc = max(1, torch.get_num_threads() // n)
    ctx = mp.get_context("spawn")
    tasks, results, start = ctx.Queue(), ctx.Queue(), ctx.Barrier(n)
    for task in enumerate(prompts):
        tasks.put(task)
    for _ in range(n):
        tasks.put(None)  # one end marker per worker
    t0 = time.perf_counter()
    max_len = max(len(p) for p in prompts) + args.max_new_tokens
    share = -(-len(prompts) // n)  # no worker needs more rows than its share of the prompts
    procs = [ctx.Process(target=_worker, args=(rank, args, max_len, share, tasks, results, start),
                         daemon=True)
             for rank in range(n)]
    for proc in procs:
        proc.start()
    in_order, workers = InOrder(emit), [None] * n
    while None in workers:
        try:
            rank, item = results.get(timeout=1)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a worker process died (exit code {dead[0]}); run with --num-procs 1 to "
                                   f"see its error") from None
            continue
        if isinstance(item, Request):
            in_order(item)
        else:
            workers[rank] = item
    for proc in procs:
        proc.join()
    return merged_report(workers, args, len(prompts)) | {"wall_with_startup_s": time.perf_counter() - t0}


def merged_report(workers: list[dict], args: argparse.Namespace, prompts: int) -> dict:
    """The speed of several engines that ran side by side: rates add up, the wall is the slowest one's."""
    new_tokens = sum(w["new_tokens"] for w in workers)
    wall = max(w["wall_s"] for w in workers)
    return {"prefill_tokens_per_s": sum(w["prefill_tokens_per_s"] for w in workers),
            "decode_tokens_per_s": sum(w["decode_tokens_per_s"] for w in workers),
            "generated_tokens_per_s": new_tokens / wall, "wall_s": wall, "batch_size": args.batch_size,
            "batching": args.batching, "new_tokens": new_tokens,
            "prefill_tokens": sum(w["prefill_tokens"] for w in workers), "prompts": prompts,
            "num_procs": len(workers), "prompts_per_rank": [w["prompts"] for w in workers], "workers": workers}


# --- torchrun's ranks, on any number of nodes, on one queue in torchrun's store -----------------------------
def run_ranks(args: argparse.Namespace, prompts: list[list[int]], emit: Callable[[int, Request], None]) -> dict:
    """Every rank loads the model and, whenever one of its rows is free, claims the next prompt with the store's
    atomic add: the store is the queue, with no coordinator of ours. The other ranks put each result in the
    store; rank 0 passes them all to emit in input order and returns the merged speed report (others: {})."""
    rank, _, device = setup_distributed(args.device)
    store = shared_store()
    model, tok = load_model(args.checkpoint, device, args.dtype, args.quantize)
    engine = make_engine(model, tok, args, max(len(p) for p in prompts) + args.max_new_tokens, len(prompts))
    dist.barrier()  # every rank has loaded: none takes all the prompts while another is still loading

    def requests():
        while (i := store.add("slm/generate/next", 1) - 1) < len(prompts):
            yield make_request(i, prompts[i], args)

    in_order = InOrder(emit)

    def collect(wait: bool) -> None:  # rank 0: the other ranks' results that are next in input order
        while in_order.next < len(prompts) and in_order.next not in in_order.held:
            key = f"slm/generate/{in_order.next}"
            if not wait and not store.check([key]):
                return
            result = json.loads(store.get(key))
            store.delete_key(key)  # the store holds only results not yet written
            in_order(SimpleNamespace(id=in_order.next, **result))

    t0, done = time.perf_counter(), 0
    for request in engine.run(requests()):
        done += 1
        if rank == 0:
            in_order(request)
            collect(wait=False)
        else:
            store.set(f"slm/generate/{request.id}", json.dumps(
                {"tokens": request.tokens, "text": request.text, "finish_reason": request.finish_reason}))
    report = speed_report(engine, done, time.perf_counter() - t0) | {"num_procs": 1}
    if rank == 0:
        collect(wait=True)
    workers = [None] * dist.get_world_size()
    dist.all_gather_object(workers, report)
    dist.destroy_process_group()
    return merged_report(workers, args, len(prompts)) if rank == 0 else {}


def run(args: argparse.Namespace, prompts: list[list[int]], emit: Callable[[int, Request], None],
        model: GPT | None = None, tok: Tokenizer | None = None, stream=None) -> dict:
    """Generate with torchrun's ranks, --num-procs workers, or in this process (reusing `model` when given)."""
    if "RANK" in os.environ:
        return run_ranks(args, prompts, emit)
    if args.num_procs > 1:
        return run_workers(args, prompts, emit)
    if model is None:
        model, tok = load_model(args.checkpoint, args.device, args.dtype, args.quantize)
    return generate_all(model, tok, prompts, args, emit, stream)[1] | {"num_procs": 1}


class Output:
    """Where results go, in input order, as they come: stdout, and --output (.jsonl or .md), flushed each time."""

    def __init__(self, path: str | None, texts: list[str], prompts: list[list[int]], show: bool, chat: bool = False):
        self.texts, self.prompts, self.show = texts, prompts, show
        self.sep = "\n" if chat else ""  # a chat answer starts a line of its own; a continuation goes on
        self.file = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.md = Path(path).suffix == ".md"
            self.file = open(path, "w", encoding="utf-8")

    def __call__(self, i: int, request: Request) -> None:
        text = self.texts[i]
        if self.show:
            print(f"--- {text}{self.sep}{request.text}", flush=True)
        if self.file is not None:
            if self.md:
                self.file.write(f"### {text}\n\n```\n{text}{self.sep}{request.text}\n```\n\n")
            else:
                self.file.write(json.dumps({"prompt": text, "completion": request.text, "prompt_ids": self.prompts[i],
                                            "completion_ids": request.tokens,
                                            "finish_reason": request.finish_reason}, ensure_ascii=False) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def speed_line(report: dict) -> str:
    return (f"prefill {report['prefill_tokens_per_s']:,.0f} tok/s | decode {report['decode_tokens_per_s']:,.0f} tok/s"
            f" | generated {report['new_tokens']} tokens in {report['wall_s']:.2f}s = "
            f"{report['generated_tokens_per_s']:,.1f} tok/s (batch {report['batch_size']}, "
            f"{report['num_procs']} proc)" + (f" | {report['accepted']} of {report['drafted']} draft tokens kept"
                                              if report.get("drafted") else ""))


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        prepare_process(args.machine)
        model, load_s = None, None
        ranks = "RANK" in os.environ  # under torchrun: rank 0 writes the results
        leader = int(os.environ.get("RANK", 0)) == 0
        if args.num_procs > 1 or ranks:  # the workers load the model; here only its config and tokenizer
            config, tok = config_and_tokenizer(load_checkpoint(args.checkpoint, mmap=True))
        else:
            t0 = time.perf_counter()
            model, tok = load_model(args.checkpoint, args.device, args.dtype, args.quantize)
            config, load_s = model.config, time.perf_counter() - t0
        texts = read_prompts(args)
        resolve_new_tokens(args, config.max_seq_len)
        try:
            prompts = encode_prompts(tok, texts, args.max_new_tokens, config.max_seq_len, args.chat, args.truncate)
        except LengthError as e:
            fix = "shorten it, lower --max-new-tokens, or pass --truncate to keep its end" if e.prompt_too_long \
                else f"use --max-new-tokens of at most {config.max_seq_len - 1}"
            raise ValueError(f"{e}; {fix}") from None
        single = len(prompts) == 1 and args.num_procs == 1 and not ranks
        if single:  # a continuation goes on from the prompt; a chat answer starts a line of its own
            print(texts[0], end="\n" if args.chat else "", flush=True)
        output = Output(args.output if leader else None, texts, prompts,
                        show=leader and not single and not args.output, chat=args.chat)
        try:
            report = run(args, prompts, output, model, tok, (lambda piece: print(piece, end="", flush=True))
                         if single else None)
        finally:
            output.close()
        if single:
            print()
        if not leader:
            return
        for worker in report.get("workers", []):
            print(f"worker: {speed_line(worker)}")
        print(speed_line(report))
        if args.stats_json:
            Path(args.stats_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.stats_json).write_text(json.dumps(report | {"load_s": load_s}, indent=1))
    except (CheckpointError, ValueError, FileNotFoundError, json.JSONDecodeError, KeyError, RuntimeError) as e:
        exit_with_error(e, args.debug)


if __name__ == "__main__":
    main()
