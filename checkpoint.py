"""Checkpoint format, atomic save and safe load, and load_model: the one place the scripts touch model files.

A checkpoint is a torch.save'd dict of plain data (tensors, numbers, strings, lists, dicts):
  model       state dict, never with torch.compile's "_orig_mod." prefix
  config      ModelConfig as a dict
  tokenizer   the tokenizer.json text (also copied beside the checkpoint as tokenizer.json)
  + whatever the trainer adds: optimizer, step, train_args, rng, history, ...
It loads with torch.load(weights_only=True), so a file that would run code on load is refused.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from config import DTYPES, ModelConfig
from layers import QuantLinear
from model import GPT
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
    """A .ckpt file, or a run directory (its last.ckpt, else best.ckpt)."""
    path = Path(path)
    if path.is_dir():
        for name in ("last.ckpt", "best.ckpt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"no last.ckpt or best.ckpt in {path}; train first with `python train.py`")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; pass a run directory or a .ckpt file")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """The checkpoint dict. mmap=True leaves the tensors on disk until they are read (for config/tokenizer)."""
    path = resolve_checkpoint(path)
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
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this repo (no model/config); "
                              f"convert it with convert.py")
    return ckpt


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
