"""The config levers (QK-norm, zero-init, value residuals, logit soft-cap, ReLU², U-net skips) against a forward
written from their papers' formulas, and every way a model with them is run: the engine, int8 weights, export."""
import math

import pytest
import torch
import torch.nn.functional as F

from config import get_config
from engine import generate
from model import GPT, apply_rope
from quantize import quantize_model
from runner import ModelRunner

ALL = dict(qk_norm=True, value_residual=True, logit_softcap=2.0, mlp="relu2", unet_skips=True)


def small(**levers):
    return get_config("tiny", vocab_size=97, n_layer=5, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=64,
                      max_seq_len=64, **levers)


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_forward(m: GPT, idx: torch.Tensor, kv=None) -> torch.Tensor:
    """Logits by the textbook: QK-norm as Qwen3 (an RMSNorm over each head's q and k, before RoPE); value
    residuals as ResFormer (v_l <- v_l + lambda_l (v_1 - v_l)); U-net skips as modded-nanogpt (layer n-1-i adds
    w_i times layer i's output before it runs); the ReLU² MLP of Primer; Gemma 2's soft-cap cap * tanh(z / cap).
    Attention written out with K/V repeated per query head, as in test_model.slow_attention. kv: a function applied
    to K (after RoPE) and V (as a cache would store them)."""
    cfg, (B, T) = m.config, idx.shape
    H, Hkv, D, eps, n = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.norm_eps, cfg.n_layer
    cos, sin = m.rope_cos[:T], m.rope_sin[:T]
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    x, skips, v1 = m.embed_tokens.weight[idx], [], None
    for i, layer in enumerate(m.layers):
        a = layer.self_attn
        if cfg.unet_skips and i >= n - n // 2:
            x = x + m.skip_weights[n - 1 - i] * skips.pop()
        h = rms(x, layer.input_layernorm.weight, eps)
        q = (h @ a.q_proj.weight.T).view(B, T, H, D).transpose(1, 2)
        k = (h @ a.k_proj.weight.T).view(B, T, Hkv, D).transpose(1, 2)
        v = (h @ a.v_proj.weight.T).view(B, T, Hkv, D).transpose(1, 2)
        if cfg.qk_norm:
            q, k = rms(q, a.q_norm.weight, eps), rms(k, a.k_norm.weight, eps)
        if cfg.value_residual:
            v1, v = (v, v) if i == 0 else (v1, v + a.value_mix * (v1 - v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k, v = kv(k), kv(v)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(causal, float("-inf"))
        x = x + (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1) @ a.o_proj.weight.T
        h = rms(x, layer.post_attention_layernorm.weight, eps)
        mlp = layer.mlp
        if cfg.mlp == "relu2":
            hidden = torch.relu(h @ mlp.up_proj.weight.T) ** 2
        else:
            hidden = F.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)
        x = x + hidden @ mlp.down_proj.weight.T
        if cfg.unet_skips and i < n // 2:
            skips.append(x)
    logits = rms(x, m.norm.weight, eps) @ m.lm_head.weight.T
    return cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap) if cfg.logit_softcap else logits


def randomized(cfg) -> GPT:
    """A model whose lever weights are away from their initial values, so that a lever wired the wrong way shows."""
    torch.manual_seed(0)
    m = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or "value_mix" in name or "skip_weights" in name:
                p.uniform_(0.2, 1.5)
    return m


@pytest.mark.parametrize("levers", [{}, *({k: v} for k, v in ALL.items()), ALL],
                         ids=["none", *ALL, "all"])
def test_each_lever_matches_the_formula_of_its_paper(levers):
    m = randomized(small(**levers))
    idx = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        ours, ref = m(idx)[0], reference_forward(m, idx)
    assert torch.allclose(ours, ref, atol=2e-5, rtol=0), (ours - ref).abs().max()
    if levers.get("logit_softcap"):
        assert ours.abs().max() < levers["logit_softcap"]
    assert m.config.levers == list(levers)


def test_zero_init_starts_every_block_as_the_identity():
    """Output projections at zero: at initialisation each block adds nothing, so the logits are the head of the
    normalised embedding; the gradient still reaches every output projection."""
    torch.manual_seed(0)
    m = GPT(small(zero_init=True))
    assert all(layer.self_attn.o_proj.weight.abs().sum() == 0 == layer.mlp.down_proj.weight.abs().sum()
               for layer in m.layers)
    idx = torch.randint(0, 97, (2, 9))
    logits, loss = m(idx, idx)
    assert torch.allclose(logits, m.lm_head(m.norm(m.embed_tokens(idx))), atol=1e-6)
    loss.backward()
    assert all(layer.mlp.down_proj.weight.grad.abs().sum() > 0 for layer in m.layers)
    # Only an init: the model is plain Llama, which the fused step runs.
    assert m.config.levers == [] and ModelRunner(m.eval(), rows=1, max_len=16).step == "fused"


def test_a_model_with_levers_generates_through_the_engine_as_its_full_forward_says():
    """The fused C++ step holds plain Llama only: a model with levers runs the eager step (auto), greedy ids
    equal the argmax of full forwards token by token, and int8 weights (ReLU² has no gate to fuse) still run."""
    m = randomized(small(**ALL))
    assert ModelRunner(m, rows=2, max_len=64).step == "eager"
    with pytest.raises(ValueError, match="plain Llama"):
        ModelRunner(m, rows=2, max_len=64, step="fused")
    prompts = [[5, 6, 7], [11, 12, 13, 14, 15]]
    rows, _ = generate(m, prompts, 10)
    for prompt, row in zip(prompts, rows):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(10):
                ids.append(int(m(torch.tensor([ids]))[0][0, -1].argmax()))
        assert row == ids[len(prompt):]
    quantize_model(m, "int8")
    assert len(generate(m, prompts, 4)[0][1]) == 4
