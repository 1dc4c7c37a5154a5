"""Model surgery for int8/int4 weights: every matmul of a GPT swapped for a QuantLinear, at load time.

Where the checkpoint kept a GGUF file's own blocks (convert.py --keep-quantized), those are used as they are
instead of re-quantizing dequantized weights. Checkpoints never hold these layers.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from layers import FusedProjections, QuantEmbedding, QuantLinear, quantize_q4, quantize_q8
from model import GPT

# GGUF block layouts as bytes per block of 32 weights: Q4_0 d(fp16) qs(16); Q4_1 d m qs(16); Q8_0 d qs(32 int8).
GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
MODES = ("int8", "int4")


def quantize_model(model: GPT, mode: str, gguf_blocks: dict | None = None, blocks_only: bool = False) -> GPT:
    """Every matmul weight (q, k, v, o, gate, up, down and the head) as int8 or int4, in place. Where the
    checkpoint kept GGUF blocks, those are used as they are: Q4_0/Q4_1 for int4, Q8_0 for either (llama.cpp's
    choice for SmolLM2's embedding, finer than 4 bits); blocks_only leaves every other weight as it is, so the
    numbers stay the checkpoint's. A tied embedding's lookup reads the quantized head's rows. q/k/v and gate/up
    of one format and layout become one matmul each."""
    if mode not in MODES:
        raise ValueError(f"quantization must be int8 or int4, not {mode!r}")
    gguf_blocks = gguf_blocks or {}
    wanted = {"int4": ("Q4_0", "Q4_1", "Q8_0"), "int8": ("Q8_0",)}[mode]
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        key = f"{name}.weight"
        if key not in gguf_blocks and name == "lm_head" and model.config.tie_embeddings:
            key = "embed_tokens.weight"
        block = gguf_blocks.get(key)
        if block is not None and block["type"] in wanted:
            layer = from_gguf_blocks(block["type"], block["data"], tuple(module.weight.shape))
        elif blocks_only:
            continue
        else:
            quantize = quantize_q4 if mode == "int4" and module.in_features % 32 == 0 else quantize_q8
            layer = quantize(module.weight.detach())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.to(module.weight.device))
    if model.config.tie_embeddings and isinstance(model.lm_head, QuantLinear):
        model.embed_tokens = QuantEmbedding(model.lm_head)
    for block in model.layers:
        for parent, names in ((block.self_attn, ("q_proj", "k_proj", "v_proj")), (block.mlp, ("gate_proj", "up_proj"))):
            layers = [getattr(parent, n) for n in names if hasattr(parent, n)]  # ReLU² has no gate_proj
            layouts = {(layer.fmt, layer.in_features, tuple(layer.s.shape[1:]) if layer.fmt == "q8" else None)
                       for layer in layers if isinstance(layer, QuantLinear)}
            if all(isinstance(layer, QuantLinear) for layer in layers) and len(layouts) == 1:  # one matmul
                group = FusedProjections(layers)
                for layer in layers:
                    object.__setattr__(layer, "group", group)  # not a child: the group is registered once, below
                parent.fused = group
    return model


def from_gguf_blocks(kind: str, data: torch.Tensor, shape: tuple[int, int]) -> QuantLinear:
    """A layer holding a GGUF tensor's own blocks (raw bytes, [N, groups * block bytes]): no re-quantizing."""
    N, K = shape
    blocks = data.view(N, K // 32, GGUF_BLOCK_BYTES[kind])
    scale = blocks[..., :2].contiguous().view(torch.float16).view(N, K // 32)
    if kind == "Q8_0":
        return QuantLinear("q8", N, K, q=blocks[..., 2:].contiguous().view(torch.int8).view(N, K), s=scale)
    low = blocks[..., 2:4].contiguous().view(torch.float16).view(N, K // 32) if kind == "Q4_1" else -8 * scale
    qs = blocks[..., -16:].contiguous().view(N, K // 2)
    return QuantLinear("q4", N, K, qs=qs, d=scale, m=low)  # -8 times an fp16 number is exact in fp16
