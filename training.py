"""The parts of a training run, each built once for train.py: its settings (the preset's recipe, a resumed run's
saved arguments, the schedule), its model config and tokenizer, the per-machine choices every rank shares, its
data, and its model and optimizer (plain, DDP or FSDP2), restored from the last save on resume."""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

import data
from checkpoint import CheckpointError, config_and_tokenizer, is_sharded, load_checkpoint, load_sharded
from config import DTYPES, ModelConfig, config_from_args
from distributed import shard_model
from layers import bf16_gemms_run_in_fp32
from machine import MACHINE, best_time
from model import GPT
from optim import BASE_RECIPE, BEFORE_RECIPES, RECIPES, make_optimizer
from tokenizer import Tokenizer

PER_PROCESS = {"device", "machine", "debug", "resume", "auto_resume"}  # never taken from a resumed run's saved args


class UsageError(Exception):
    """A flag that does not fit the run: exit code 2, like argparse's own errors."""


class Settings(argparse.Namespace):
    """The run's settings, resolved once (recipe defaults, resume merge, schedule); read-only from then on."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def __setattr__(self, name, value):
        raise AttributeError(f"the run's settings are resolved once; {name} cannot change now")


def explicit_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """The options the user actually typed (so --resume can keep the checkpoint's values for the rest)."""
    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return vars(bare.parse_args(argv))


def resolve_settings(args: argparse.Namespace, explicit: dict, run_dir: Path,
                     device: torch.device) -> tuple[Settings, dict | None]:
    """Every setting of the run, once: a new run takes its preset's recipe where no flag says otherwise; a
    resumed run takes its saved arguments where no flag was typed now (its model and optimizer must stay); then
    the dtype, the schedule's step counts and the minimum rate."""
    values, ckpt = vars(args).copy(), None
    last = latest_save(run_dir)
    if values["resume"] or (values["auto_resume"] and last):
        if last is None:
            raise CheckpointError(f"no last.ckpt or last.dcp in {run_dir}; train first, or drop --resume")
        meta, sharded = load_checkpoint(last, mmap=True), is_sharded(last)  # a sharded one's meta.pt alone
        if sharded != bool(values["fsdp"] or meta["train_args"].get("fsdp")):
            raise UsageError(f"{last} is {'sharded' if sharded else 'one file'}: resume it "
                             f"{'with' if sharded else 'without'} --fsdp, or convert it with convert.py")
        # A sharded run's weights load into the sharded model later, on however many ranks it now has.
        ckpt = meta | {"sharded": str(last)} if sharded else load_checkpoint(last)
        saved = {k: v for k, v in (BEFORE_RECIPES | ckpt["train_args"]).items() if k not in PER_PROCESS}
        changed = sorted(k for k in explicit if k in {*ckpt["config"], "preset", "optimizer"}
                         if explicit[k] != (saved | ckpt["config"]).get(k))
        if changed:
            raise UsageError(f"{run_dir} was trained with another model config or optimizer ({', '.join(changed)} "
                             f"differ); drop those flags to resume, or pick a new --run-name")
        values = {**values, **saved, **explicit, "resume": True}
        if values["more_steps"]:  # N steps from the checkpoint; past the schedule's end they run at min_lr
            values["max_steps"] = ckpt["step"] + values["more_steps"]
            values["decay_steps"] = values.get("decay_steps") or ckpt["step"]  # a budget run ended its schedule
            values["time_budget"] = None
    else:
        values |= {k: v for k, v in (BASE_RECIPE | RECIPES.get(args.preset, {})).items() if values[k] is None}
    values["compile"] = {True: "on", False: "off"}.get(values["compile"], values["compile"])  # older saves: bools
    if device.type == "cuda":  # bf16 (fp16 where it lacks) is the faster on every GPU; compile is opt-in there
        values["dtype"] = values["dtype"].replace("auto", "bf16" if torch.cuda.is_bf16_supported() else "fp16")
        values["compile"] = values["compile"].replace("auto", "off")
    if values["dtype"] == "fp16" and device.type != "cuda":
        raise UsageError("--dtype fp16 needs a CUDA GPU (it uses a GradScaler); use --dtype bf16 on CPU")
    if (values["batch_ramp"] or values["doc_chunks"]) and values["data_mode"] == "stream":
        raise UsageError("--batch-ramp and --doc-chunks work on prepared data; drop them or use --data-mode prepare")
    if values["decay_frac"] > 1:
        raise UsageError(f"--decay-frac must be in (0, 1], the share of the run that decays "
                         f"(got {values['decay_frac']})")
    if values["time_budget"] and values["warmup_steps"]:
        raise UsageError("--warmup-steps counts steps, which a --time-budget run cannot know ahead; "
                         "use --warmup-frac")
    if not values["time_budget"]:
        values["max_steps"] = values["max_steps"] or 2000
        values["decay_steps"] = values.get("decay_steps") or values["max_steps"]
        if values["warmup_steps"]:
            values["warmup_frac"] = values["warmup_steps"] / values["decay_steps"]
    values["min_lr"] = values["lr"] / 10 if values["min_lr"] is None else values["min_lr"]
    try:
        cfg = ModelConfig(**ckpt["config"]) if ckpt else config_from_args(argparse.Namespace(**values))
    except ValueError as e:
        raise UsageError(str(e)) from None
    values["seq_len"] = values["seq_len"] or cfg.max_seq_len
    if values["seq_len"] > cfg.max_seq_len:
        raise UsageError(f"--seq-len {values['seq_len']} exceeds the model's max_seq_len {cfg.max_seq_len}; "
                         f"also pass --max-seq-len {values['seq_len']}")
    return Settings(**values), ckpt


def latest_save(run_dir: Path) -> Path | None:
    """last.ckpt or last.dcp (a sharded run's), whichever was written last; None before the first save."""
    saves = [path for path in (run_dir / "last.ckpt", run_dir / "last.dcp") if path.exists()]
    return max(saves, key=lambda path: path.stat().st_mtime, default=None)


def model_and_tokenizer(s: Settings, ckpt: dict | None, rank: int) -> tuple[ModelConfig, Tokenizer]:
    """A resumed run's own config and tokenizer; a new run's from its flags, with the tokenizer given or trained
    on the corpus (by rank 0, while the others wait)."""
    if ckpt:
        return config_and_tokenizer(ckpt)
    cfg = config_from_args(s)
    path = s.tokenizer
    if not path:
        path = data.corpus_tokenizer(s.data, cfg.vocab_size, s.data_dir, s.text_field, s.val_docs, train=rank == 0)
        if dist.is_initialized():
            dist.barrier()
    tok = Tokenizer.load(path)
    if tok.vocab_size > cfg.vocab_size:
        raise UsageError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}; "
                         f"pass --vocab-size {tok.vocab_size} or a smaller tokenizer")
    return cfg, tok


def agree_on_machine(s: Settings, cfg: ModelConfig, device: torch.device, accum: int) -> Settings:
    """Rank 0 decides the per-machine choices this run needs (the bf16 GEMM route, for bf16 autocast or Muon's
    Newton-Schulz on a CPU; the training step's precision and compilation, where --dtype or --compile is auto),
    and every rank takes them, so no rank goes down another path. Returns the settings with both made concrete
    (what a resumed run keeps)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        if device.type == "cpu" and (s.dtype in ("bf16", "auto") or s.optimizer == "muon"):
            bf16_gemms_run_in_fp32()
        choice = training_step_choice(s, cfg, device, accum)
    if dist.is_initialized():
        MACHINE.share()
        choice = training_step_choice(s, cfg, device, accum)  # rank 0's, now shared
    dtype, _, compiled = choice.partition("+")
    return Settings(**vars(s) | {"dtype": dtype, "compile": "on" if compiled else "off"})


def training_step_choice(s: Settings, cfg: ModelConfig, device: torch.device, accum: int) -> str:
    """The run's precision and compilation as "fp32", "bf16", "fp32+compile" or "bf16+compile": what --dtype and
    --compile say, and for those left auto, the fastest of the candidates (machine.py's train_step, measured on a
    real optimizer step of this run's shape, or pinned; a pin decides only what the flags leave auto)."""
    dtypes = ["fp32", "bf16"] if s.dtype == "auto" else [s.dtype]
    compiles = [False, True] if s.compile == "auto" else [s.compile == "on"]
    candidates = [dtype + ("+compile" if c else "") for dtype in dtypes for c in compiles]
    if len(candidates) == 1:
        return candidates[0]
    shape = json.dumps([cfg.to_dict(), s.micro_batch, s.seq_len, accum, s.optimizer, candidates])
    decided = MACHINE.decide("train_step", lambda: fastest_training_step(s, cfg, device, accum, candidates),
                             key=hashlib.sha256(shape.encode()).hexdigest()[:12])
    if decided not in ("fp32", "bf16", "fp32+compile", "bf16+compile"):
        raise UsageError(f"train_step={decided} is not fp32, bf16, fp32+compile or bf16+compile; fix the pin")
    dtype, _, compiled = decided.partition("+")
    return (dtype if s.dtype == "auto" else s.dtype) + ("+compile" if (
        compiled if s.compile == "auto" else s.compile == "on") else "")


def fastest_training_step(s: Settings, cfg: ModelConfig, device: torch.device, accum: int,
                          candidates: list[str]) -> str:
    """Times each candidate on a fresh model of the run's shape and its optimizer: accum micro-batches forward
    and backward, then the update; the best of two steps after one warm-up step (which compiles). Prints the
    timings, so the log says why. The global RNG is left as it was (the run seeds it after)."""
    rng = torch.get_rng_state()
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, cfg.vocab_size, (s.micro_batch, s.seq_len), generator=gen).to(device) for _ in "xy")
    seconds = {}
    for name in candidates:
        dtype, _, compiled = name.partition("+")
        model = GPT(cfg).to(device)
        opt = make_optimizer(model, s)
        forward = torch.compile(model) if compiled else model

        def step():
            for _ in range(accum):
                with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32"):
                    _, loss = forward(x, y)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        seconds[name] = best_time(step, repeats=2)
    torch.set_rng_state(rng)
    best = min(seconds, key=seconds.get)
    tokens = s.micro_batch * s.seq_len * accum
    print("machine: train_step measured on this run's shape: " + ", ".join(
        f"{name} {tokens / t:,.0f} tok/s" for name, t in seconds.items()) + f"; taking {best}", flush=True)
    return best


def build_data(s: Settings, tok: Tokenizer, rank: int, world: int, accum: int, ckpt: dict | None):
    """The training batches (prepared shards, deterministic in the step; or a stream, resumed where the
    checkpoint left it), the validation chunks (always prepared) and each token's byte count."""
    tokens_dir = Path(s.data_dir) / f"{Path(s.data).name}-{data.tokenizer_hash(tok)}"
    if rank == 0:
        data.prepare(s.data, tok, tokens_dir, s.text_field, s.val_docs, data_dir=s.data_dir,
                     splits=("train", "val") if s.data_mode == "prepare" else ("val",))
    if dist.is_initialized():
        dist.barrier()
    meta = data.read_meta(tokens_dir)
    if s.data_mode == "prepare":
        if s.batch_ramp and accum < 2:
            raise UsageError("--batch-ramp halves a step's micro-steps, and this run has one; lower --micro-batch")
        chunks = data.Chunks(data.load_shards(tokens_dir, meta, "train"), s.seq_len,
                             doc_start=tok.eos_id if s.doc_chunks else None)  # each document begins with eos
        loader = data.TokenLoader(chunks, s.micro_batch, accum, rank, world, s.seed, ckpt["step"] if ckpt else 0,
                                  s.batch_ramp)
    else:
        stream = data.open_dataset(s.data, s.text_field).skip(s.val_docs)
        loader = data.StreamLoader(stream, tok, s.text_field, s.seq_len, s.micro_batch, rank, world)
        if ckpt:
            if len(ckpt["data_state"]) != world:  # each rank's stream position is its own
                raise data.DataError(f"this streamed run was saved by {len(ckpt['data_state'])} ranks; resume it "
                                     f"on as many (prepared data, --data-mode prepare, resumes on any number)")
            loader.load_state_dict(ckpt["data_state"][rank])
    val_chunks = data.Chunks(data.load_shards(tokens_dir, meta, "val"), s.seq_len)
    if len(val_chunks) == 0:
        raise data.DataError(f"validation split has fewer than {s.seq_len + 1} tokens; use more --val-docs")
    return loader, val_chunks, data.token_byte_lengths(tok)


def build_model_and_optimizer(s: Settings, cfg: ModelConfig, device: torch.device, ckpt: dict | None):
    """The model (the raw one, and the one to call: compiled, DDP-wrapped or sharded as asked) and its optimizer,
    both restored from the checkpoint on resume."""
    raw_model = GPT(cfg).to(device)
    if s.fsdp:
        raw_model = shard_model(raw_model, raw_model.layers)
    opt = make_optimizer(raw_model, s)
    if ckpt and s.fsdp:
        load_sharded(Path(ckpt["sharded"]), raw_model, opt)
    elif ckpt:
        raw_model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    model = torch.compile(raw_model) if s.compile == "on" else raw_model
    if dist.is_initialized() and not s.fsdp:
        # broadcast_buffers=False: the only buffers are the constant RoPE tables.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)
    return raw_model, model, opt


def flops_per_token(cfg: ModelConfig, seq_len: int, n_params: int) -> float:
    matmul_params = n_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)  # lookup is free
    return 6 * matmul_params + 12 * cfg.n_layer * cfg.d_model * seq_len  # PaLM appendix B
