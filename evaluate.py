"""Validation loss and bits per byte: the one evaluation that train.py logs and bench compares.

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes the target tokens stand for, so it does not
depend on the tokenizer: models with different vocabularies compare fairly.
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data


@torch.no_grad()
def evaluate(model: torch.nn.Module, chunks: data.Chunks, byte_lengths: np.ndarray, micro_batch: int,
             autocast: AbstractContextManager | None = None, rank: int = 0, world: int = 1,
             device: torch.device | str = "cpu") -> tuple[float, float]:
    """Loss (nats/token) and bits per byte over every validation chunk; under DDP each rank takes its share
    and the sums are all-reduced, so every rank returns the same figures."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
    ids = list(range(rank, len(chunks), world))
    # Every rank runs as many forwards as the rank with the most chunks (an FSDP forward is collective); a
    # rank out of chunks runs one on its first chunk again and does not count it.
    batches = -(-len(range(0, len(chunks), world)) // micro_batch)
    for b in range(batches):
        batch = ids[b * micro_batch:(b + 1) * micro_batch]
        x, y = data.to_batch([chunks[c] for c in batch or ids[:1] or [0]])
        x, y = x.to(device), y.to(device)
        with autocast or nullcontext():
            logits, _ = model(x)
        if not batch:
            continue
        nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        sums += torch.stack([nats.double(), torch.tensor(y.numel(), device=device, dtype=torch.float64),
                             torch.tensor(float(byte_lengths[y.cpu().numpy()].sum()), device=device,
                                          dtype=torch.float64)])
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    return (sums[0] / sums[1]).item(), (sums[0] / math.log(2) / sums[2]).item()
