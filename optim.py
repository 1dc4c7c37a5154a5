"""Optimizers and learning-rate schedules for train.py: AdamW, Muon + AdamW, cosine and WSD, per-preset recipes.

Muon orthogonalises each hidden matrix's momentum with a Newton-Schulz iteration that torch runs in bf16; on a
CPU whose bf16 GEMMs are the slower kind (machine.py's bf16_gemms_in_fp32) the same iteration runs in fp32,
for the optimizer step only.
"""
from __future__ import annotations

import argparse
import math
from contextlib import contextmanager, nullcontext

import torch

from config import ModelConfig, get_config
from layers import bf16_gemms_run_in_fp32
from model import GPT

# Training defaults per preset, model levers included; flags override them. tiny's won 3-minute CPU screening runs
# and a 10-minute side-by-side run (README, python -m bench --only recipes).
RECIPES = {"tiny": {"tokens_per_step": 4096, "lr": 4e-3, "optimizer": "muon", "schedule": "wsd", "qk_norm": True,
                    "value_residual": True, "unet_skips": True}}
BASE_RECIPE = {"tokens_per_step": 100_000, "lr": 5e-4, "optimizer": "adamw", "schedule": "cosine", "batch_ramp": 0,
               "doc_chunks": False}
# What checkpoints without these fields used.
BEFORE_RECIPES = {"optimizer": "adamw", "schedule": "cosine", "batch_ramp": 0, "doc_chunks": False}


def recipe_config(preset: str) -> ModelConfig:
    """The preset with its recipe's model levers: the model `train.py --preset PRESET` trains."""
    fields = ModelConfig.__dataclass_fields__
    return get_config(preset, **{k: v for k, v in RECIPES.get(preset, {}).items() if k in fields})


def lr_at(progress: float, s: argparse.Namespace) -> float:
    """The learning rate of a step that ends at `progress`, the fraction of the run done (of its steps, or of
    --time-budget's wall clock): linear warmup over warmup_frac, then cosine decay to min_lr at 1 (or, wsd,
    flat until the last decay_frac and linear to min_lr at 1), then min_lr (for --more-steps)."""
    if progress < s.warmup_frac:
        return s.lr * progress / s.warmup_frac
    if progress >= 1:
        return s.min_lr
    if s.schedule == "wsd":
        decay = max(0.0, (progress - (1 - s.decay_frac)) / s.decay_frac)
        return s.lr + decay * (s.min_lr - s.lr)
    decay = (progress - s.warmup_frac) / (1 - s.warmup_frac)
    return s.min_lr + 0.5 * (1 + math.cos(math.pi * decay)) * (s.lr - s.min_lr)


class MuonAdamW:
    """Muon for the hidden matrices, AdamW for everything else: stepped together, saved as one state."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW, on_cpu: bool):
        self.parts = {"muon": muon, "adamw": adamw}
        self.on_cpu = on_cpu

    @property
    def param_groups(self) -> list[dict]:  # read anew: load_state_dict replaces the groups
        return [group for opt in self.parts.values() for group in opt.param_groups]

    def step(self) -> None:
        with fp32_newton_schulz() if self.on_cpu and bf16_gemms_run_in_fp32() else nullcontext():
            self.parts["muon"].step()
        self.parts["adamw"].step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, opt in self.parts.items():
            opt.load_state_dict(state[name])


def make_optimizer(model: GPT, s: argparse.Namespace) -> torch.optim.AdamW | MuonAdamW:
    """AdamW: weight matrices and the (tied) embedding decay, RMSNorm gains do not. Muon: the attention and MLP
    matrices of every layer go to Muon (orthogonalised momentum, its update scaled to AdamW's RMS so that the
    two share a schedule); the embedding, an untied head and the norms stay with AdamW. The schedule scales
    both peak rates (--lr, --muon-lr) alike. Under DDP every rank orthogonalises the same all-reduced
    gradient, so the ranks stay in step."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if p.dim() == 2 and n.startswith("layers.")] if s.optimizer == "muon" else []
    rest = [p for _, p in named if all(p is not h for h in hidden)]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": s.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), fused=True)
    if not hidden:
        return adamw
    muon = torch.optim.Muon(hidden, lr=s.muon_lr or s.lr, weight_decay=s.weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(muon, adamw, on_cpu=next(model.parameters()).device.type == "cpu")


def torch_optimizers(optimizer: torch.optim.AdamW | MuonAdamW) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside (for torch.distributed.checkpoint's state-dict helpers)."""
    return list(optimizer.parts.values()) if isinstance(optimizer, MuonAdamW) else [optimizer]


def newton_schulz_fp32(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                       eps: float) -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation (the same quintic Newton-Schulz iteration) in fp32 instead of bf16."""
    a, b, c = ns_coefficients
    x = grad.float()
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if grad.size(0) > grad.size(1) else x).to(grad.dtype)


@contextmanager
def fp32_newton_schulz():
    """torch's Muon with newton_schulz_fp32 in place of its bf16 iteration, for the duration of one step. Torch
    has no public hook for it, so its private function is swapped and put back; a torch that renames it fails
    here, loudly. Without bf16 instructions (an AVX2-only EPYC) bf16 is emulated at ~0.3 GFLOP/s, and a bf16
    Muon step took 3x an AdamW step."""
    import torch.optim._muon as muon

    torchs = muon._zeropower_via_newtonschulz
    muon._zeropower_via_newtonschulz = newton_schulz_fp32
    try:
        yield
    finally:
        muon._zeropower_via_newtonschulz = torchs
