"""A decoder-only transformer in the Llama/SmolLM2 style: RoPE, RMSNorm, SwiGLU, GQA, tied embeddings, plus
the small-model levers that config.py can turn on (QK-norm, zero-initialised output projections, value residuals,
a logit soft-cap, ReLU², U-net skips); with all of them off it is exactly Llama.

Module names follow Hugging Face's LlamaForCausalLM (embed_tokens, layers.N.self_attn.q_proj, ...), so a
HF state dict maps onto ours by dropping the leading "model.".

Inference reads and writes a KV cache that the caller owns (runner.py) and passes in: one (k, v) pair per layer,
of shape (rows, n_kv_head, slots, head_dim), one row per sequence in flight. Each row has its own length and its
tokens sit at slots 0, 1, ... of its row, which are also their RoPE positions: no row is padded against another.
step() runs one pass over flat tokens whose parts (Decode, Prefill) say how each attends the cache;
decode_step() adds one token to every row at once, with shapes that never change (for torch.compile and CUDA
graphs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ModelConfig
from layers import Linear, project

IGNORE_INDEX = -100  # targets with this value do not count in the loss (padding)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as HF Llama does, so bf16 runs match the reference.
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (max_len, head_dim) in HF's rotate-half layout (the two halves repeat)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class Decode:
    """One new token for every row of the cache, written at its row's slot `positions[b]`; each row attends
    over its own slots up to that one (mask). Shapes never change, so compiled steps replay."""
    positions: torch.Tensor  # (rows,)
    mask: torch.Tensor       # (rows, 1, 1, S)

    @classmethod
    def at(cls, positions: torch.Tensor, slots: int) -> Decode:
        """Row b's token at slot positions[b], attending over its slots 0 .. positions[b] of `slots`."""
        keys = torch.arange(slots, device=positions.device)
        return cls(positions, (keys[None] <= positions[:, None])[:, None, None])

    @property
    def tokens(self) -> int:
        return self.mask.size(0)

    def attend(self, attn: Attention, q, k, v, kv):
        """q (H, rows, D), k and v (H_kv, rows, D) -> (H, rows, D)."""
        k_cache, v_cache = kv
        index = self.positions.view(-1, 1, 1, 1).expand(-1, k.size(0), 1, k.size(-1))
        k_cache.scatter_(2, index, k.transpose(0, 1)[:, :, None])
        v_cache.scatter_(2, index, v.transpose(0, 1)[:, :, None])
        y = attn.decode_attention(q.transpose(0, 1)[:, :, None], k_cache, v_cache, self.mask)
        return y[:, :, 0].transpose(0, 1)


@dataclass
class Prefill:
    """Prompt chunks going into cache rows: chunk b is row rows[b]'s tokens for slots starts[b], ... Their
    tokens come flat (token_b, token_t: which chunk and place each is; slots: its cache slot). Attention pads
    the chunks to one width, and each query sees the keys of its own row up to its own position (mask)."""
    rows: torch.Tensor      # (n,) cache rows
    token_b: torch.Tensor   # (N,) chunk of each token
    token_t: torch.Tensor   # (N,) place in its chunk
    slots: torch.Tensor     # (N,) cache slot of each token
    mask: torch.Tensor      # (n, 1, T, S): T the longest chunk, S the longest row after this step

    @property
    def tokens(self) -> int:
        return self.token_b.numel()

    def attend(self, attn: Attention, q, k, v, kv):
        """q (H, N, D), k and v (H_kv, N, D) -> (H, N, D)."""
        k_cache, v_cache = kv
        rows = self.rows[self.token_b]
        k_cache[rows, :, self.slots] = k.transpose(0, 1)
        v_cache[rows, :, self.slots] = v.transpose(0, 1)
        n, _, T, S = self.mask.shape
        padded = q.new_zeros(n, q.size(0), T, q.size(-1))
        padded[self.token_b, :, self.token_t] = q.transpose(0, 1)
        y = F.scaled_dot_product_attention(padded, k_cache[self.rows, :, :S], v_cache[self.rows, :, :S],
                                           attn_mask=self.mask, enable_gqa=attn.n_kv_head != attn.n_head)
        return y[self.token_b, :, self.token_t].transpose(0, 1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, first: bool = False):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.dropout = cfg.dropout
        self.q_proj = Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps), RMSNorm(cfg.head_dim, cfg.norm_eps)
        # The first layer's values pass on as they are; later layers learn how much of them to mix in.
        self.value_mix = nn.Parameter(torch.full((1,), 0.5)) if cfg.value_residual and not first else None
        self.passes_values = cfg.value_residual and first

    def forward(self, x, cos, sin, parts: list[Decode | Prefill] | None = None, kv=None,
                first_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d_model). Without parts: causal attention within x (training, scoring). With parts: x is
        one engine step's tokens, flat (B == 1), part after part; their keys and values go into kv, this
        layer's (k_cache, v_cache), and each part attends over the cache its own way. first_v: the first
        layer's values of these tokens (value residuals). Returns the output, and the first layer's values
        where later layers mix them in (else None)."""
        B, T, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.value_mix is not None:  # mixed before the cache, so cached values are this layer's own
            v = v + self.value_mix.to(v.dtype) * (first_v - v)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # no-op unless autocast or a bf16 model
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if parts is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=self.n_kv_head != self.n_head,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            ys, start = [], 0
            for part in parts:
                end = start + part.tokens
                ys.append(part.attend(self, q[0, :, start:end], k[0, :, start:end], v[0, :, start:end], kv))
                start = end
            y = (ys[0] if len(ys) == 1 else torch.cat(ys, dim=1))[None]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), v if self.passes_values else None

    def decode_attention(self, q, k, v, mask):
        """Attention of one new query per row over the cache, written out: the query heads that share a KV
        head become rows of one matmul against it, so each cached K/V is read once, not once per query head
        (SDPA's CPU kernel took 35% of a batch-64 step). Softmax in fp32, as in HF Llama's eager attention."""
        B, _, T, D = q.shape
        group = self.n_head // self.n_kv_head
        scores = q.reshape(B, self.n_kv_head, group * T, D) @ k.transpose(-1, -2) * D ** -0.5
        probs = scores.float().masked_fill(~mask, float("-inf")).softmax(dim=-1).to(v.dtype)
        return (probs @ v).view(B, self.n_head, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.mlp == "swiglu":
            self.gate_proj = Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "gate_proj"):  # ReLU²
            return self.down_proj(F.relu(self.up_proj(x)).square())
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, first: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, first)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, parts=None, kv=None, first_v=None):
        y, v = self.self_attn(self.input_layernorm(x), cos, sin, parts, kv, first_v)
        x = x + self.resid_dropout(y)
        return x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x))), v


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, first=i == 0) for i in range(config.n_layer))
        # U-net: layer n_layer - 1 - i adds layer i's output back, for i in the first half, by a learned weight.
        self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2)) if config.unet_skips else None
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # Residual-scaled init (GPT-2): each block adds two outputs to the residual stream. Or zero (a lever).
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.0 if config.zero_init else
                                config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def num_params(self) -> int:
        """Parameter count with the tied embedding/lm_head matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits, loss), with causal attention within idx (no cache).

        targets: (B, T) next-token ids, IGNORE_INDEX where no loss is wanted.
        last_only: logits for the last position only.
        """
        T = idx.size(1)
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        x = self.norm(self.blocks(self.embed_tokens(idx), self.rope_cos[:T], self.rope_sin[:T]))
        if targets is not None:
            logits = self.head(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
            return logits, loss
        return self.head(x[:, -1:] if last_only else x), None

    def blocks(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, parts: list | None = None,
               kv_cache: list | None = None) -> torch.Tensor:
        """The residual stream through every layer (with the first layer's values and the U-net's skips passed
        along where those levers are on)."""
        skips, first_v, n = [], None, len(self.layers)
        for i, layer in enumerate(self.layers):
            if self.skip_weights is not None and i >= n - len(self.skip_weights):
                x = x + self.skip_weights[n - 1 - i].to(x.dtype) * skips.pop()
            x, v = layer(x, cos, sin, parts, kv_cache[i] if kv_cache else None, first_v)
            first_v = v if i == 0 else first_v
            if self.skip_weights is not None and i < len(self.skip_weights):
                skips.append(x)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, soft-capped in fp32 where that lever is on."""
        logits, cap = self.lm_head(x), self.config.logit_softcap
        return cap * torch.tanh(logits.float() / cap) if cap else logits

    # --- inference over a KV cache: one row per sequence in flight ----------------------------------------
    def step(self, ids: torch.Tensor, positions: torch.Tensor, parts: list[Decode | Prefill],
             kv_cache: list[tuple[torch.Tensor, torch.Tensor]], logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """One pass over an engine step's tokens, flat: ids and their positions (N,), part after part (a Decode
        and prompt chunks, which read the weights once between them). Their keys and values go into kv_cache,
        one (k, v) per layer, or views of their first S slots (S past every slot read or written); an argument,
        not an attribute, because Inductor freezing would fold an attribute in as a constant.
        Returns the logits of the tokens at logits_at (all of them: None)."""
        cos, sin = self.rope_cos[positions][None, None], self.rope_sin[positions][None, None]
        x = self.blocks(self.embed_tokens(ids[None]), cos, sin, parts, kv_cache)
        x = x[0] if logits_at is None else x[0, logits_at]
        return self.head(self.norm(x))

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor,
                    kv_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """step() with one token for every row (rows[b] at slot positions[b]) and nothing else: shapes that
        never change (torch.compile, CUDA graphs). Returns logits (rows, vocab)."""
        return self.step(tokens, positions, [Decode.at(positions, kv_cache[0][0].size(2))], kv_cache)
