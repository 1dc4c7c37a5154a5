"""Train a GPT preset: `python train.py` on one process, `torchrun --nproc_per_node N train.py` for DDP
(gloo on CPU, nccl on CUDA). Defaults train `tiny` on the embedded Shakespeare corpus.

  python train.py --preset tiny --time-budget 10
  torchrun --nproc_per_node 2 train.py --preset tiny --max-steps 200
  python train.py --run-name tiny --resume --more-steps 50     # 50 more steps of a finished run
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from checkpoint import CheckpointError, clean_state_dict, load_checkpoint, save_checkpoint
from config import ArgumentParser, ModelConfig, add_model_args, config_from_args, exit_with_error, positive
from engine import generate
from kernels import muon_in_fp32_where_bf16_is_slow
from model import GPT
from tokenizer import Tokenizer

SAMPLE_PROMPT = "ROMEO.\n"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    add_model_args(p)
    p.add_argument("--run-name", default=None, help="checkpoints go in checkpoints/RUN_NAME (default: preset)")
    p.add_argument("--data", default="shakespeare", help="'shakespeare', local .txt/.jsonl/.parquet, or a hub name")
    p.add_argument("--data-mode", choices=["prepare", "stream"], default="prepare")
    p.add_argument("--data-dir", default="data", help="cache for corpora, tokenizers and token shards")
    p.add_argument("--text-field", default="text")
    p.add_argument("--val-docs", type=positive(int), default=500, help="validation documents (non-Shakespeare corpora)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: train one on the train split)")
    p.add_argument("--max-steps", type=positive(int), default=None,
                   help="optimizer steps (default 2000, or as many as fit --time-budget)")
    p.add_argument("--time-budget", type=positive(float), default=None,
                   help="minutes of wall-clock training; the schedule follows the elapsed fraction of it")
    p.add_argument("--more-steps", type=positive(int), default=0,
                   help="with --resume: train N more steps (at the final learning rate past the schedule's end)")
    p.add_argument("--stop-at", type=positive(int), default=None,
                   help="save and exit after this step, schedule unchanged (for fixed-length job slots)")
    p.add_argument("--tokens-per-step", type=positive(int), default=None,
                   help="tokens per optimizer step (default 100k; 4096 for tiny)")
    p.add_argument("--micro-batch", type=positive(int), default=16)
    p.add_argument("--seq-len", type=positive(int), default=None, help="default: the model's max_seq_len")
    p.add_argument("--lr", type=positive(float), default=None, help="peak learning rate (default 5e-4; 4e-3 for tiny)")
    p.add_argument("--min-lr", type=float, default=None, help="default: lr / 10")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default=None,
                   help="muon: Muon for the hidden matrices, AdamW for embedding, head and norms "
                        "(default: muon for tiny, adamw otherwise)")
    p.add_argument("--muon-lr", type=positive(float), default=None,
                   help="Muon's peak learning rate (default: --lr; its update is scaled to AdamW's RMS)")
    p.add_argument("--schedule", choices=["cosine", "wsd"], default=None,
                   help="cosine decay, or warmup-stable-decay: flat, then linear to min_lr over --decay-frac "
                        "(default: wsd for tiny, cosine otherwise)")
    p.add_argument("--decay-frac", type=positive(float), default=0.3, help="wsd: the final fraction that decays")
    p.add_argument("--warmup-frac", type=positive(float), default=0.05, help="warmup, as a fraction of the run")
    p.add_argument("--warmup-steps", type=positive(int), default=None,
                   help="warmup in steps instead of --warmup-frac (runs without --time-budget)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast dtype; auto = bf16 on CUDA (fp16 without bf16 support), fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue from checkpoints/RUN_NAME/last.ckpt")
    p.add_argument("--auto-resume", action="store_true",
                   help="resume if last.ckpt exists, else start (for restarts by torchrun or a scheduler)")
    p.add_argument("--eval-every", type=positive(int), default=100)
    p.add_argument("--save-every", type=positive(int), default=100)
    p.add_argument("--log-every", type=positive(int), default=10)
    p.add_argument("--peak-flops", type=positive(float), default=None,
                   help="device peak FLOP/s for MFU (default: timed)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out-dir", default="checkpoints")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


# Training defaults per preset; flags override them. tiny's won 3-minute CPU screening runs and a 10-minute
# side-by-side run (README, bench.py --only recipes).
TRAIN_DEFAULTS = {"tiny": {"tokens_per_step": 4096, "lr": 4e-3, "optimizer": "muon", "schedule": "wsd"}}
BASE_DEFAULTS = {"tokens_per_step": 100_000, "lr": 5e-4, "optimizer": "adamw", "schedule": "cosine"}
BEFORE_RECIPES = {"optimizer": "adamw", "schedule": "cosine"}  # what checkpoints without these fields used


def resolve_defaults(args: argparse.Namespace, device: torch.device) -> None:
    for key, value in (BASE_DEFAULTS | TRAIN_DEFAULTS.get(args.preset, {})).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dtype == "auto":
        if device.type == "cuda":
            args.dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            args.dtype = "fp32"  # bf16 autocast is no faster on the CPUs we measured (README)


def explicit_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """The options the user actually typed (so --resume can keep the checkpoint's values for the rest)."""
    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return vars(bare.parse_args(argv))


def setup_distributed() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    kwargs = {"device_id": device} if cuda else {}
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun keeps one store across restarts: a restarted group would read the dead group's
        # addresses, so each attempt gets its own key prefix.
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
        kwargs |= {"store": dist.PrefixStore(f"slm/attempt_{restart}", store), "rank": rank, "world_size": world}
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", **kwargs)
    return dist.get_rank(), dist.get_world_size(), device


def lr_at(progress: float, args: argparse.Namespace) -> float:
    """The learning rate of a step that ends at `progress`, the fraction of the run done (of its steps, or of
    --time-budget's wall clock): linear warmup over warmup_frac, then cosine decay to min_lr at 1 (or, wsd,
    flat until the last decay_frac and linear to min_lr at 1), then min_lr (for --more-steps)."""
    if progress < args.warmup_frac:
        return args.lr * progress / args.warmup_frac
    if progress >= 1:
        return args.min_lr
    if args.schedule == "wsd":
        decay = max(0.0, (progress - (1 - args.decay_frac)) / args.decay_frac)
        return args.lr + decay * (args.min_lr - args.lr)
    decay = (progress - args.warmup_frac) / (1 - args.warmup_frac)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * decay)) * (args.lr - args.min_lr)


class MuonAdamW:
    """Muon for the hidden matrices, AdamW for everything else: stepped together, saved as one state."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.parts = {"muon": muon, "adamw": adamw}

    @property
    def param_groups(self) -> list[dict]:  # read anew: load_state_dict replaces the groups
        return [group for opt in self.parts.values() for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.parts.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, opt in self.parts.items():
            opt.load_state_dict(state[name])


def make_optimizer(model: GPT, args: argparse.Namespace) -> torch.optim.AdamW | MuonAdamW:
    """AdamW: weight matrices and the (tied) embedding decay, RMSNorm gains do not. Muon: the attention and MLP
    matrices of every layer go to Muon (orthogonalised momentum, its update scaled to AdamW's RMS so that the
    two share a schedule); the embedding, an untied head and the norms stay with AdamW. The schedule scales
    both peak rates (--lr, --muon-lr) alike. Under DDP every rank orthogonalises the same
    all-reduced gradient, so the ranks stay in step."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if p.dim() == 2 and n.startswith("layers.")] if args.optimizer == "muon" else []
    rest = [p for _, p in named if all(p is not h for h in hidden)]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=True)
    if not hidden:
        return adamw
    if next(model.parameters()).device.type == "cpu":
        muon_in_fp32_where_bf16_is_slow()
    muon = torch.optim.Muon(hidden, lr=args.muon_lr or args.lr, weight_decay=args.weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(muon, adamw)


def measure_peak_flops(device: torch.device, dtype: torch.dtype, reps: int = 10) -> float:
    """FLOP/s of a large matmul in the run's dtype: the denominator of MFU on this very machine. The best of
    several timings after a warm-up, so that a moment when the machine is busy does not lower it."""
    n = 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(reps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def flops_per_token(cfg: ModelConfig, seq_len: int, n_params: int) -> float:
    matmul_params = n_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)  # lookup is free
    return 6 * matmul_params + 12 * cfg.n_layer * cfg.d_model * seq_len  # PaLM appendix B


def get_tokenizer(args, vocab_size: int, rank: int) -> Tokenizer:
    if args.tokenizer:
        return Tokenizer.load(args.tokenizer)
    name = Path(args.data).name  # "shakespeare", a local path or a hub name
    path = Path(args.data_dir) / f"{name}-bpe{vocab_size}.json"
    if rank == 0 and not path.exists():
        print(f"training a {vocab_size}-token BPE tokenizer on the train split -> {path}")
        docs = data.corpus_documents(args.data, args.text_field, args.val_docs, "train", args.data_dir)
        Tokenizer.train(texts=docs, vocab_size=vocab_size).save(path)
    if dist.is_initialized():
        dist.barrier()
    return Tokenizer.load(path)


@torch.no_grad()
def evaluate(model, chunks: data.Chunks, byte_lengths: np.ndarray, micro_batch: int, autocast, rank: int,
             world: int, device: torch.device) -> tuple[float, float]:
    """Loss (nats/token) and bits per byte over every validation chunk, summed across ranks."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
    ids = list(range(rank, len(chunks), world))
    for i in range(0, len(ids), micro_batch):
        x, y = data.to_batch([chunks[c] for c in ids[i:i + micro_batch]])
        x, y = x.to(device), y.to(device)
        with autocast:
            logits, _ = model(x)
        nats = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        sums += torch.stack([nats.double(), torch.tensor(y.numel(), device=device, dtype=torch.float64),
                             torch.tensor(float(byte_lengths[y.cpu().numpy()].sum()), device=device,
                                          dtype=torch.float64)])
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train()
    return (sums[0] / sums[1]).item(), (sums[0] / math.log(2) / sums[2]).item()


def plot_losses(history: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        ax.plot(*zip(*history["train"]), label="train", alpha=0.8)
    if history["val"]:
        ax.plot(*zip(*history["val"]), "o-", label="val")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)  # a full disk leaves the old plot, never a torn one
    except OSError:
        tmp.unlink(missing_ok=True)
    finally:
        plt.close(fig)


class UsageError(Exception):
    """A flag that does not fit the run: exit code 2, like argparse's own errors."""


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        train(args, explicit_args(parser, argv))
    except UsageError as e:
        if args.debug:
            raise
        parser.error(str(e))
    except (data.DataError, CheckpointError, ValueError, OSError) as e:
        exit_with_error(e, args.debug)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args: argparse.Namespace, explicit: dict) -> None:
    rank, world, device = setup_distributed()
    master = rank == 0
    run_dir = Path(args.out_dir) / (args.run_name or args.preset)
    if master:
        for stale in run_dir.glob(".*.tmp"):  # left by a save that was killed midway
            stale.unlink()
    ckpt = None
    if args.auto_resume and (run_dir / "last.ckpt").exists():
        args.resume = True
    if args.resume:
        ckpt = load_checkpoint(run_dir / "last.ckpt")
        # The model and the optimizer (its state is in the checkpoint) stay; the rest may change on resume.
        saved = BEFORE_RECIPES | ckpt["train_args"]
        changed = sorted(k for k in explicit if k in {*ckpt["config"], "preset", "optimizer"}
                         if explicit[k] != (saved | ckpt["config"]).get(k))
        if changed:
            raise UsageError(f"{run_dir} was trained with another model config or optimizer ({', '.join(changed)} "
                             f"differ); drop those flags to resume, or pick a new --run-name")
        args = argparse.Namespace(**{**vars(args), **saved, **explicit, "resume": True})
        if args.more_steps:  # N steps from the checkpoint; past the schedule's end they run at min_lr
            args.max_steps = ckpt["step"] + args.more_steps
            args.decay_steps = args.decay_steps or ckpt["step"]  # a budget run's schedule ended at its last step
            args.time_budget = None
        cfg = ModelConfig(**ckpt["config"])
        tok = Tokenizer.from_str(ckpt["tokenizer"])
    else:
        resolve_defaults(args, device)
        try:
            cfg = config_from_args(args)
        except ValueError as e:
            raise UsageError(str(e)) from None
        tok = get_tokenizer(args, cfg.vocab_size, rank)
    if tok.vocab_size > cfg.vocab_size:
        raise UsageError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}; "
                         f"pass --vocab-size {tok.vocab_size} or a smaller tokenizer")
    seq_len = args.seq_len = args.seq_len or cfg.max_seq_len
    if seq_len > cfg.max_seq_len:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}; "
                         f"also pass --max-seq-len {seq_len}")
    if args.dtype == "fp16" and device.type != "cuda":
        raise UsageError("--dtype fp16 needs a CUDA GPU (it uses a GradScaler); use --dtype bf16 on CPU")
    accum = max(1, round(args.tokens_per_step / (args.micro_batch * seq_len * world)))
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    # Data: prepared shards (deterministic in step) or a stream; validation is always prepared.
    name = Path(args.data).name
    tokens_dir = Path(args.data_dir) / f"{name}-{data.tokenizer_hash(tok)}"
    splits = ("train", "val") if args.data_mode == "prepare" else ("val",)
    if master:
        data.prepare(args.data, tok, tokens_dir, args.text_field, args.val_docs, splits=splits,
                     data_dir=args.data_dir)
    if dist.is_initialized():
        dist.barrier()
    meta = data.read_meta(tokens_dir)
    if args.data_mode == "prepare":
        loader = data.TokenLoader(data.Chunks(data.load_shards(tokens_dir, meta, "train"), seq_len),
                                  args.micro_batch, accum, rank, world, args.seed)
    else:
        stream = data.open_dataset(args.data, args.text_field).skip(args.val_docs)
        loader = data.StreamLoader(stream, tok, args.text_field, seq_len, args.micro_batch, rank, world)
        if ckpt:
            loader.load_state_dict(ckpt["data_state"][rank])
    val_chunks = data.Chunks(data.load_shards(tokens_dir, meta, "val"), seq_len)
    if len(val_chunks) == 0:
        raise data.DataError(f"validation split has fewer than {seq_len + 1} tokens; use more --val-docs")
    byte_lengths = data.token_byte_lengths(tok)

    raw_model = GPT(cfg).to(device)
    opt = make_optimizer(raw_model, args)
    if ckpt:
        raw_model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    model = torch.compile(raw_model) if args.compile else raw_model
    if dist.is_initialized():
        # broadcast_buffers=False: the only buffers are the constant RoPE tables.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    torch.set_float32_matmul_precision("high")

    # The schedule runs on progress, the fraction of the run done: of --time-budget's wall clock (however
    # fast or slow the machine is meanwhile), or of the steps to decay_steps.
    if args.decay_frac > 1:
        raise UsageError(f"--decay-frac must be in (0, 1], the share of the run that decays (got {args.decay_frac})")
    if args.time_budget and args.warmup_steps:
        raise UsageError("--warmup-steps counts steps, which a --time-budget run cannot know ahead; "
                         "use --warmup-frac")
    if not args.time_budget:
        args.max_steps = args.max_steps or 2000
        args.decay_steps = getattr(args, "decay_steps", None) or args.max_steps
        if args.warmup_steps:
            args.warmup_frac = args.warmup_steps / args.decay_steps
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    start_step = ckpt["step"] if ckpt else 0
    history = {"train": [], "val": [], "val_bpb": [], "val_elapsed_s": [], "lr": []} | (ckpt["history"] if ckpt else {})
    best_val = ckpt["best_val"] if ckpt else float("inf")
    if ckpt:
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
    n_params = raw_model.num_params()
    peak = args.peak_flops or measure_peak_flops(device, dtype)
    fpt = flops_per_token(cfg, seq_len, n_params)
    tokens_per_step = args.micro_batch * seq_len * accum * world
    budget_s = args.time_budget * 60 if args.time_budget else None
    if master:
        print(f"model: {n_params:,} parameters  config: {cfg.to_dict()}")
        until = f"{args.time_budget:g} min of training" if budget_s else f"step {args.max_steps}"
        print(f"train: world {world} x micro-batch {args.micro_batch} x seq {seq_len} x accum {accum} = "
              f"{tokens_per_step:,} tokens/step, from step {start_step} to {until}, device {device}, {args.dtype}")
        print("args: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))

    def payload(step: int, elapsed: float) -> dict:
        data_state = None
        if args.data_mode == "stream":
            data_state = [None] * world
            if dist.is_initialized():
                dist.all_gather_object(data_state, loader.state_dict())
            else:
                data_state = [loader.state_dict()]
        return {"model": clean_state_dict(raw_model), "optimizer": opt.state_dict(), "config": cfg.to_dict(),
                "tokenizer": tok.to_str(), "step": step, "elapsed_s": elapsed, "train_args": vars(args),
                "data_state": data_state, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                "history": history, "best_val": best_val}

    stop = {"signal": None}

    def request_stop(signum, _frame):
        stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    # A budget run's bar counts seconds of the budget; a step run's counts steps.
    elapsed = ckpt.get("elapsed_s", 0.0) if ckpt else 0.0  # a resumed run continues its clock
    bar = tqdm(total=round(budget_s) if budget_s else args.max_steps, initial=round(elapsed) if budget_s
               else start_step, disable=not master, unit="s" if budget_s else "step", dynamic_ncols=True)
    t_begin = time.perf_counter() - elapsed
    t_log = time.perf_counter()
    step, step_times = start_step, []  # seconds of each step (the slowest rank's), to foresee the last one
    try:  # the bar is closed on every way out, so that an error message starts on its own line
        while args.max_steps is None or step < args.max_steps:
            # Every rank has the same clock (reduced below), so all take the same learning rate. A budget run's
            # last step is the first expected to end past the budget; it runs at min_lr.
            if budget_s:
                expected_s = sorted(step_times[-5:])[len(step_times[-5:]) // 2] if step_times else 0.0
                progress = 1.0 if elapsed + expected_s >= budget_s else elapsed / budget_s
            else:
                progress = (step + 1) / args.decay_steps
            lr = lr_at(progress, args)
            for group in opt.param_groups:  # Muon's groups are those with Newton-Schulz steps
                group["lr"] = lr * ((args.muon_lr or args.lr) / args.lr if "ns_steps" in group else 1)
            t_step = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                x, y = (t.to(device) for t in loader.batch(step, micro))
                # DDP: no gradient all-reduce until the last micro-step; the forward must be inside no_sync too.
                skip_sync = dist.is_initialized() and micro < accum - 1
                with model.no_sync() if skip_sync else nullcontext():
                    with autocast:
                        _, loss = model(x, y)
                    scaler.scale(loss / accum).backward()
                loss_sum += loss.detach()
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
            if dist.is_initialized():
                dist.all_reduce(loss_sum)  # gloo has no AVG
            train_loss = loss_sum.item() / accum / world
            # Stop before a non-finite update reaches the weights (fp16's GradScaler skips such steps itself).
            if not math.isfinite(train_loss) or (not scaler.is_enabled() and not math.isfinite(grad_norm.item())):
                bar.close()
                raise ValueError(f"loss {train_loss:.4g}, gradient norm {grad_norm.item():.4g} at step {step + 1}; "
                                 f"stopped without saving, so {run_dir}/last.ckpt keeps the last good state; "
                                 f"lower --lr, then --resume")
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            t_step_end = time.perf_counter()
            step += 1
            history["train"].append((step, train_loss))
            history["lr"].append((step, lr))
            # One collective a step: a signal on any rank, and the slowest rank's clock and step time.
            clock = torch.tensor([float(stop["signal"] is not None), t_step_end - t_begin, t_step_end - t_step],
                                 dtype=torch.float64, device=device)
            if dist.is_initialized():
                dist.all_reduce(clock, op=dist.ReduceOp.MAX)
            interrupted, elapsed = bool(clock[0]), clock[1].item()
            step_times.append(clock[2].item())
            bar.update(round(elapsed) - bar.n if budget_s else 1)
            bar.set_postfix(step=step, loss=f"{train_loss:.3f}", lr=f"{lr:.2e}")
            if step % args.log_every == 0 and master:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = time.perf_counter()
                tps = tokens_per_step * args.log_every / (now - t_log)
                t_log = now
                if fpt * tps / world > peak:  # the start-up timing was too low (a busy moment): time it again
                    peak = max(measure_peak_flops(device, dtype), fpt * tps / world)
                    bar.write(f"note: this step beat the measured peak, so it was re-measured: "
                              f"{peak / 1e9:,.0f} GFLOP/s")
                bar.write(f"step {step}: loss {train_loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s "
                          f"MFU {100 * fpt * tps / world / peak:.1f}% | {step * tokens_per_step:,} tokens in "
                          f"{elapsed / 60:.1f} min")
            last = (budget_s and progress >= 1) or step == args.max_steps or step == args.stop_at
            evaluating = (step % args.eval_every == 0 or last) and not interrupted
            saving = step % args.save_every == 0 or last or interrupted
            improved = False
            if evaluating:  # every rank gets the same (all-reduced) figures
                val_loss, bpb = evaluate(model, val_chunks, byte_lengths, args.micro_batch, autocast, rank, world,
                                         device)
                history["val"].append((step, val_loss))
                history["val_bpb"].append((step, bpb))
                history["val_elapsed_s"].append((step, elapsed))
                improved, best_val = val_loss < best_val, min(best_val, val_loss)
            # payload() is collective in stream mode (each rank's stream position): every rank builds it once.
            state = payload(step, elapsed) if saving or improved else None
            if master and evaluating:
                bar.write(f"step {step}: val loss {val_loss:.4f}  val bits/byte {bpb:.4f}  "
                          f"| {sample(raw_model, tok)!r}")
                plot_losses(history, run_dir / "loss.png")
                if improved:
                    save_checkpoint(run_dir / "best.ckpt", state | {"val_bpb": bpb})
            if master and saving:
                save_checkpoint(run_dir / "last.ckpt", state)
            if interrupted:
                if master:
                    print(f"interrupted at step {step}; saved {run_dir}/last.ckpt; continue with --resume",
                          file=sys.stderr)
                sys.exit(130 if stop["signal"] == signal.SIGINT else 143)
            if last:
                if step == args.stop_at and step != args.max_steps and master:
                    bar.write(f"stopping at step {step} (--stop-at); continue with --resume")
                break
            t_log += time.perf_counter() - t_step_end  # evals and saves do not count against tokens/s
    finally:
        bar.close()
    if master:
        plot_losses(history, run_dir / "loss.png")
        val = f"val loss {history['val'][-1][1]:.4f}, val bits/byte {history['val_bpb'][-1][1]:.4f}, " \
            if history["val_bpb"] else ""
        print(f"done: {step} steps, {step * tokens_per_step:,} tokens in {elapsed / 60:.1f} min of training, "
              f"{val}checkpoints in {run_dir}/")
    if dist.is_initialized():
        dist.barrier()


def sample(model: GPT, tok: Tokenizer, max_new_tokens: int = 48) -> str:
    prompt = tok.encode(SAMPLE_PROMPT)
    was_training = model.training
    model.eval()
    rows, _ = generate(model, [prompt], min(max_new_tokens, model.config.max_seq_len - len(prompt)),
                       temperature=0.8, top_k=50, eos_id=tok.eos_id, seed=0)
    model.free_kv_cache()
    model.train(was_training)
    return SAMPLE_PROMPT + tok.decode(rows[0])


if __name__ == "__main__":
    main()
