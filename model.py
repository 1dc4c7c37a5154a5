"""A decoder-only transformer in the Llama/SmolLM2 style: RoPE, RMSNorm, SwiGLU, GQA, tied embeddings.

Module names follow Hugging Face's LlamaForCausalLM (embed_tokens, layers.N.self_attn.q_proj, ...), so a
HF state dict maps onto ours by dropping the leading "model.".

Inference keeps a preallocated KV cache of `rows`, one row per sequence in flight. Each row has its own length
and its tokens sit at slots 0, 1, ... of its row, which are also their RoPE positions: no row is padded against
another. prefill() writes chunks of prompts into any rows; decode_step() adds one token to every row at once,
with shapes that never change (for torch.compile and CUDA graphs). engine.py schedules requests onto the rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ModelConfig
from kernels import Linear

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
class Prefill:
    """Chunks of prompts going into cache rows: chunk b is row rows[b]'s tokens from slot starts[b] on, right
    padded to one width. Only real tokens are written (the (batch, time) index pairs in token_b, token_t, at
    cache slots `slots`); each query sees the keys of its own row up to its own position (mask)."""
    rows: torch.Tensor      # (n,) cache rows
    token_b: torch.Tensor   # (N,) batch index of each real token
    token_t: torch.Tensor   # (N,) time index of each real token
    slots: torch.Tensor     # (N,) cache slot of each real token
    mask: torch.Tensor      # (n, 1, T, S) keys each query may see, S = the longest row after this chunk

    def attend(self, attn: Attention, q, k, v, kv):
        k_cache, v_cache = kv
        rows = self.rows[self.token_b]
        k_cache[rows, :, self.slots] = k[self.token_b, :, self.token_t]
        v_cache[rows, :, self.slots] = v[self.token_b, :, self.token_t]
        S = self.mask.size(-1)
        return F.scaled_dot_product_attention(q, k_cache[self.rows, :, :S], v_cache[self.rows, :, :S],
                                              attn_mask=self.mask, enable_gqa=attn.n_kv_head != attn.n_head)


@dataclass
class Decode:
    """One new token for every row of the cache, written at its row's slot `positions[b]`; each row attends
    over its own slots up to that one (mask). Shapes never change, so compiled steps replay."""
    positions: torch.Tensor  # (rows,)
    mask: torch.Tensor       # (rows, 1, 1, S)

    def attend(self, attn: Attention, q, k, v, kv):
        k_cache, v_cache = kv
        index = self.positions.view(-1, 1, 1, 1).expand_as(k)
        k_cache.scatter_(2, index, k)
        v_cache.scatter_(2, index, v)
        return attn.decode_attention(q, k_cache, v_cache, self.mask)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.dropout = cfg.dropout
        self.q_proj = Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, cache: Prefill | Decode | None = None, kv=None) -> torch.Tensor:
        """x (B, T, d_model). Without a cache: causal attention within x (training, scoring). With one: x's
        keys and values go into kv, this layer's (k_cache, v_cache), and the queries attend over the cache."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # no-op unless autocast or a bf16 model
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=self.n_kv_head != self.n_head,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            y = cache.attend(self, q, k, v, kv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

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
        self.gate_proj = Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, kv=None):
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache, kv))
        return x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.kv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # one (k, v) per layer
        self.apply(self._init_weights)
        # Residual-scaled init (GPT-2): each block adds two outputs to the residual stream.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

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
        x = self.embed_tokens(idx)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
            return logits, loss
        return self.lm_head(x[:, -1:] if last_only else x), None

    # --- KV cache: one row per sequence in flight ---------------------------------------------------
    def setup_kv_cache(self, rows: int, length: int, dtype: torch.dtype | None = None) -> None:
        """Preallocate per-layer K/V buffers of shape (rows, n_kv_head, length, head_dim)."""
        if length > self.config.max_seq_len:
            raise ValueError(f"KV cache length {length} exceeds max_seq_len {self.config.max_seq_len}")
        dtype = dtype or self.embed_tokens.weight.dtype
        device = self.embed_tokens.weight.device
        shape = (rows, self.config.n_kv_head, length, self.config.head_dim)
        self.kv_cache = [(torch.zeros(shape, dtype=dtype, device=device),
                          torch.zeros(shape, dtype=dtype, device=device)) for _ in self.layers]
        if device.type == "cuda":  # CUDA graphs replay in-place writes only into inputs with fixed addresses
            for k, v in self.kv_cache:
                torch._dynamo.mark_static_address(k)
                torch._dynamo.mark_static_address(v)

    def free_kv_cache(self) -> None:
        self.kv_cache = None

    def prefill(self, chunks: list[list[int]], rows: list[int], starts: list[int]) -> torch.Tensor:
        """Write prompt chunks into the cache: chunk b holds row rows[b]'s tokens for slots starts[b], ... (its
        earlier slots are already filled). Returns the logits after each chunk's last token, (n, vocab)."""
        device = self.embed_tokens.weight.device
        lengths = torch.tensor([len(c) for c in chunks], device=device)
        width, longest = int(lengths.max()), max(s + len(c) for s, c in zip(starts, chunks))
        if longest > self.kv_cache[0][0].size(2):
            raise ValueError(f"row length {longest} does not fit the KV cache of {self.kv_cache[0][0].size(2)} slots")
        idx = torch.tensor([c + [0] * (width - len(c)) for c in chunks], device=device)
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(width, device=device)  # (n, T)
        token_b, token_t = (torch.arange(width, device=device) < lengths[:, None]).nonzero(as_tuple=True)
        mask = torch.arange(longest, device=device) <= positions[:, :, None]                       # (n, T, S)
        cache = Prefill(torch.tensor(rows, device=device), token_b, token_t, positions[token_b, token_t],
                        mask.unsqueeze(1))
        safe = positions.clamp(max=self.config.max_seq_len - 1)  # pad tokens past the context are never read
        cos, sin = self.rope_cos[safe].unsqueeze(1), self.rope_sin[safe].unsqueeze(1)
        x = self.embed_tokens(idx)
        for layer, kv in zip(self.layers, self.kv_cache):
            x = layer(x, cos, sin, cache, kv)
        last = x[torch.arange(len(chunks), device=device), lengths - 1]
        return self.lm_head(self.norm(last))

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor,
                    kv_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One token for every cache row: tokens (rows,) go in at slots positions (rows,). kv_cache is
        self.kv_cache, or views of its first S slots (S > every position). Returns logits (rows, vocab).
        An argument, not self.kv_cache: Inductor freezing would fold an attribute into the graph as a constant."""
        keys = torch.arange(kv_cache[0][0].size(2), device=tokens.device)
        cache = Decode(positions, (keys[None] <= positions[:, None])[:, None, None])
        cos, sin = self.rope_cos[positions][:, None, None], self.rope_sin[positions][:, None, None]
        x = self.embed_tokens(tokens[:, None])
        for layer, kv in zip(self.layers, kv_cache):
            x = layer(x, cos, sin, cache, kv)
        return self.lm_head(self.norm(x))[:, 0]
