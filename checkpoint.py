"""Checkpoint format, atomic save and safe load, and load_model: the one place the scripts touch model files.

A checkpoint is a torch.save'd dict of plain data (tensors, numbers, strings, lists, dicts):
  model       state dict, never with torch.compile's "_orig_mod." prefix
  config      ModelConfig as a dict
  tokenizer   the tokenizer.json text (also copied beside the checkpoint as tokenizer.json)
  + whatever the trainer adds: optimizer, step, train_args, rng, history, ...
It loads with torch.load(weights_only=True), so a file that would run code on load is refused.

A sharded checkpoint (train.py --fsdp) is a torch.distributed.checkpoint directory, NAME.dcp: every rank's
shards of the model and optimizer state, plus meta.pt with the rest of the fields above. It loads on any
number of ranks (resharded on load), and load_checkpoint turns it into the one-file dict.
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import time
import warnings
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

from config import DTYPES, ModelConfig
from layers import QuantLinear
from model import GPT
from optim import make_optimizer, torch_optimizers
from quantize import quantize_model
from tokenizer import Tokenizer


class CheckpointError(Exception):
    """The message names the file, the problem and the fix."""


def clean_state_dict(model: torch.nn.Module) -> dict:
    model = getattr(model, "module", model)          # DDP wrapper
    model = getattr(model, "_orig_mod", model)       # torch.compile wrapper
    return model.state_dict()


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`: never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise CheckpointError(f"could not write {path}: {reason}; free disk space and retry "
                              f"(the previous {path.name}, if any, is intact)") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if "tokenizer" in payload:
        tok_path = path.with_name("tokenizer.json")
        tok_tmp = tok_path.with_name(f".tokenizer.json.{os.getpid()}.tmp")
        tok_tmp.write_text(payload["tokenizer"])
        os.replace(tok_tmp, tok_path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A .ckpt file, a sharded .dcp directory, or a run directory (its last, else its best, of either kind)."""
    path = Path(path)
    if is_sharded(path):
        return path
    if path.is_dir():
        for name in ("last.ckpt", "last.dcp", "best.ckpt", "best.dcp"):
            if (path / name).is_file() or is_sharded(path / name):
                return path / name
        raise CheckpointError(f"no last.ckpt or best.ckpt in {path}; train first with `python train.py`")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; pass a run directory or a .ckpt file")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """The checkpoint dict. mmap=True leaves the tensors on disk until they are read (for config/tokenizer)."""
    path = resolve_checkpoint(path)
    if is_sharded(path):
        meta = load_checkpoint(path / SHARDED_META, map_location, mmap)
        return meta if mmap else consolidate(path, meta)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "Unsupported global" in str(e):  # a class or function to import and call
            raise CheckpointError(f"refusing to load {path}: it holds Python objects that could run code "
                                  f"on load; only load checkpoints you trust, through a converter") from None
        raise CheckpointError(f"{path} is corrupt or truncated (not a readable checkpoint); "
                              f"delete it and use best.ckpt or retrain") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({str(e).splitlines()[0][:120]}); "
                              f"delete it and use best.ckpt or retrain") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or ("model" not in ckpt and path.name != SHARDED_META):
        raise CheckpointError(f"{path} is not a checkpoint of this repo (no model/config); "
                              f"convert it with convert.py")
    return ckpt


# --- sharded checkpoints (FSDP runs) ----------------------------------------------------------------
SHARDED_META = "meta.pt"


def is_sharded(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def save_sharded(path: Path, model: torch.nn.Module, optimizer, meta: dict) -> None:
    """Collective. Every rank writes its shards into a new directory beside `path`, rank 0 adds meta.pt, then
    points the link `path` at it in one rename: a kill at any moment leaves the previous copy whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, torch_optimizers(optimizer))
    name = [f".{path.name}.{time.time_ns()}"]
    dist.broadcast_object_list(name)  # one directory for all ranks
    target = path.with_name(name[0])
    try:
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=target)
        if dist.get_rank() == 0:
            save_checkpoint(target / SHARDED_META, meta)
            link = path.with_name(f".{path.name}.link.tmp")
            link.unlink(missing_ok=True)
            os.symlink(target.name, link)
            previous = path.resolve() if path.is_symlink() else None
            os.replace(link, path)
            if previous is not None:
                shutil.rmtree(previous, ignore_errors=True)
    except (OSError, RuntimeError) as e:  # DCP reports any rank's failed write to every rank
        if dist.get_rank() == 0:
            shutil.rmtree(target, ignore_errors=True)
        raise CheckpointError(f"could not write {path}: {str(e).splitlines()[0][:150]}; free disk space and "
                              f"retry (the previous {path.name}, if any, is intact)") from None
    dist.barrier()


def load_sharded(path: Path, model: torch.nn.Module, optimizer) -> None:
    """Load a sharded checkpoint into a model and optimizer, sharded over any number of ranks or none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizers = torch_optimizers(optimizer)
    model_state, optim_state = get_state_dict(model, optimizers)
    with warnings.catch_warnings():  # DCP warns that it loads in one process when there is no group: we mean to
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=path.resolve(),
                 no_dist=not dist.is_initialized())
    set_state_dict(model, optimizers, model_state_dict=model_state, optim_state_dict=optim_state)


def consolidate(path: Path, meta: dict) -> dict:
    """A sharded checkpoint as the one-file dict, optimizer state included (so a run can go on without FSDP)."""
    model = GPT(ModelConfig(**meta["config"]))
    optimizer = make_optimizer(model, argparse.Namespace(**meta["train_args"]))
    load_sharded(path, model, optimizer)
    return meta | {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def clean_run_dir(run_dir: Path) -> None:
    """Remove what a save killed midway left: temp files, and sharded copies no link points to."""
    kept = {(run_dir / name).resolve() for name in ("last.dcp", "best.dcp") if (run_dir / name).is_symlink()}
    for stale in run_dir.glob(".*.tmp"):
        stale.unlink()
    for copy in run_dir.glob(".*.dcp.*"):
        if copy.is_dir() and copy.resolve() not in kept:
            shutil.rmtree(copy, ignore_errors=True)


def config_and_tokenizer(ckpt: dict) -> tuple[ModelConfig, Tokenizer]:
    """The model config and tokenizer a checkpoint describes, checked to fit together."""
    try:
        config = ModelConfig(**ckpt["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint config is invalid: {e}") from None
    tok = Tokenizer.from_str(ckpt["tokenizer"], ckpt.get("eos_token"), ckpt.get("chat_template"))
    if tok.vocab_size > config.vocab_size:
        raise CheckpointError(f"tokenizer has {tok.vocab_size} tokens but the model only {config.vocab_size}; "
                              f"use the tokenizer the model was trained with")
    return config, tok


def model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """Build the model and tokenizer a checkpoint describes, checking that they fit together."""
    config, tok = config_and_tokenizer(ckpt)
    model = GPT(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit its config: {str(e).splitlines()[1][:150]}") from None
    return model.to(device).eval(), tok


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu", dtype: str = "fp32",
               quantize: str | None = "auto") -> tuple[GPT, Tokenizer]:
    """The model (in eval mode) and tokenizer of a checkpoint. quantize, a load-time choice: "auto" runs the
    GGUF blocks the checkpoint kept (convert.py), as they are, and every other weight as stored; "int8"/"int4"
    quantize every matmul weight (GGUF blocks as they are, the others re-quantized); None or "none": as stored."""
    ckpt = load_checkpoint(checkpoint)
    model, tok = model_from_checkpoint(ckpt, device)
    model = model.to(DTYPES[dtype])
    blocks = ckpt.get("gguf_blocks") or {}
    if quantize == "auto" and blocks and dtype == "fp32":
        kinds = {block["type"] for block in blocks.values()}
        quantize_model(model, "int4" if kinds & {"Q4_0", "Q4_1"} else "int8", blocks, blocks_only=True)
    elif quantize not in (None, "none", "auto"):
        quantize_model(model, quantize, blocks)
    return model, tok


def describe_weights(model: GPT) -> str:
    """What the model's matmuls hold: "fp32", or the quantized formats (q4: int4 groups, q8: int8) and the rest."""
    formats = sorted({m.fmt for m in model.modules() if isinstance(m, QuantLinear)})
    dense = {str(m.weight.dtype).removeprefix("torch.") for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return " + ".join([*formats, *sorted(dense)])
