"""A decoder-only transformer in the Llama/SmolLM2 style: RoPE, RMSNorm, SwiGLU, GQA, tied embeddings.

Module names follow Hugging Face's LlamaForCausalLM (embed_tokens, layers.N.self_attn.q_proj, ...), so a
HF state dict maps onto ours by dropping the leading "model.".

Batched inference uses a preallocated KV cache and LEFT padding: row b of a batch starts with pad_lens[b]
pad tokens, its real tokens get positions 0, 1, ... and every key slot before pad_lens[b] is masked out.
All rows then share one write slot per step, so decode writes K/V in place at that slot, never with torch.cat.
"""
from __future__ import annotations

import ctypes
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ModelConfig

IGNORE_INDEX = -100  # targets with this value do not count in the loss (padding)
# Inductor on CPU: freezing folds the weights into the graph and prepacks them (MKL for fp32, oneDNN for bf16);
# concat_linear fuses q/k/v and gate/up into one GEMM each; emulate_precision_casts rounds bf16 where eager does,
# so that greedy tokens stay close to the plain path's.
CPU_DECODE_COMPILE_OPTIONS = {"freezing": True, "cpp.enable_concat_linear": True, "emulate_precision_casts": True}


# Rows from which a bf16 GEMM pays to run in fp32 (measured on SmolLM2 decode): eager code widens the weights on
# every call, which pays from about 128 rows; a frozen compiled step widens them once, into its constants.
FP32_GEMM_MIN_ROWS = {"eager": 128, "compiled": 32}
BF16_GEMMS_IN_FP32: bool | None = None  # None: measured once per process by bf16_gemms_run_in_fp32()


def keep_freed_memory_for_reuse() -> None:
    """glibc gives large freed blocks back to the OS, so the next activation of that size page-faults its
    memory in again (at ~5 GB/s here). Blocks up to 32 MB (glibc's most) kept on an untrimmed heap made prefill
    and training steps 10-15% faster on this machine, for transformers too. Only where glibc is the libc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)


keep_freed_memory_for_reuse()


def cpu_bf16_gemm_is_slow() -> bool:
    """Whether this CPU multiplies bf16 matrices slower than the same values held as fp32 (30% margin).
    On CPUs with AVX512-BF16 but no AMX the bf16 dot-product instruction has half the FMA rate: this VM's
    Xeon peaks at 76 GFLOP/s per core in bf16 and 159 in fp32, so oneDNN's bf16 GEMMs reach 150 and MKL's
    fp32 ones 300. Where bf16 is fast (AMX, the issue's Zen 5, GPUs) the bf16 kernels are kept."""
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone

    def best_of_five(m: torch.Tensor) -> float:
        m @ m
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            m @ m
            times.append(time.perf_counter() - t0)
        return min(times)
    return best_of_five(a) < 0.7 * best_of_five(a.bfloat16())


def bf16_gemms_run_in_fp32() -> bool:
    global BF16_GEMMS_IN_FP32
    if BF16_GEMMS_IN_FP32 is None:
        BF16_GEMMS_IN_FP32 = cpu_bf16_gemm_is_slow()
    return BF16_GEMMS_IN_FP32


class Bf16LinearInFp32(torch.autograd.Function):
    """y = x @ w.T for bf16 x and w, computed by the fp32 GEMM: widening bf16 to fp32 is exact, so is a product
    of two bf16 numbers in fp32, and oneDNN's bf16 kernels accumulate in fp32 too. So this is a bf16 GEMM done
    by other kernels (as oneDNN itself does on CPUs without bf16 instructions): bf16 in, bf16 out, only the
    summation order differs. Under autocast it takes the place of the bf16 F.linear, gradients included."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.bfloat16)
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return F.linear(x.float(), w.float()).to(torch.bfloat16)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors
        g = grad_y.float()
        grad_x = (g @ w.float()).to(x.dtype)
        grad_w = (g.flatten(0, -2).T @ x.float().flatten(0, -2)).to(w.dtype)
        return grad_x, grad_w


class Linear(nn.Linear):
    """nn.Linear whose bf16 GEMMs (without bias, as all of ours) run as fp32 GEMMs on CPUs where those are
    faster (see above)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bf16 = self.weight.dtype == torch.bfloat16 or (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        min_rows = FP32_GEMM_MIN_ROWS["compiled" if torch.compiler.is_compiling() else "eager"]
        if (bf16 and self.bias is None and x.device.type == "cpu" and x.numel() >= min_rows * x.size(-1)
                and bf16_gemms_run_in_fp32()):
            return Bf16LinearInFp32.apply(x, self.weight)
        return F.linear(x, self.weight, self.bias)


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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.dropout = cfg.dropout
        self.q_proj = Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, mask, cache_pos: int | torch.Tensor | None, kv=None) -> torch.Tensor:
        """kv: this layer's (k_cache, v_cache), each (batch, n_kv_head, max_len, head_dim), when caching."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # no-op unless autocast or a bf16 model
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(cache_pos, torch.Tensor):  # decode_step: static shapes, the mask hides unfilled slots
            k_all, v_all = kv[0][:B], kv[1][:B]
            k_all.index_copy_(2, cache_pos, k)
            v_all.index_copy_(2, cache_pos, v)
            return self.o_proj(self.decode_attention(q, k_all, v_all, mask).transpose(1, 2).reshape(B, T, -1))
        if cache_pos is not None:  # write in place, then attend over every slot filled so far
            end = cache_pos + T
            kv[0][:B, :, cache_pos:end] = k
            kv[1][:B, :, cache_pos:end] = v
            k, v = kv[0][:B, :, :end], kv[1][:B, :, :end]
        # Causal without a mask only when queries and keys start together; one query may see every key.
        is_causal = mask is None and T > 1 and k.size(2) == T
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)
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

    def forward(self, x, cos, sin, mask, cache_pos, kv=None):
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_pos, kv))
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
        self.cache_pos: int | None = None  # next write slot of the KV cache; None = cache not in use
        bf16_gemms_run_in_fp32()  # measured now, so that torch.compile later only reads the answer
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

    # --- KV cache -------------------------------------------------------------------------------
    def setup_kv_cache(self, batch_size: int, max_len: int | None = None,
                       dtype: torch.dtype | None = None) -> None:
        """Preallocate per-layer K/V buffers; they are reused while big enough, with the same dtype."""
        max_len = max_len or self.config.max_seq_len
        if max_len > self.config.max_seq_len:
            raise ValueError(f"KV cache length {max_len} exceeds max_seq_len {self.config.max_seq_len}")
        dtype = dtype or self.embed_tokens.weight.dtype
        device = self.embed_tokens.weight.device
        c = self.kv_cache[0][0] if self.kv_cache else None
        if c is None or c.size(0) < batch_size or c.size(2) < max_len or c.dtype != dtype or c.device != device:
            cfg = self.config
            shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
            self.kv_cache = [(torch.zeros(shape, dtype=dtype, device=device),
                              torch.zeros(shape, dtype=dtype, device=device)) for _ in self.layers]
            if device.type == "cuda":  # CUDA graphs replay in-place writes only into inputs with fixed addresses
                for k, v in self.kv_cache:
                    torch._dynamo.mark_static_address(k)
                    torch._dynamo.mark_static_address(v)
        self.cache_pos = 0

    def reset_kv_cache(self) -> None:
        """Start a new batch of sequences; the buffers stay allocated and old slots are overwritten."""
        if self.kv_cache is None:
            raise RuntimeError("no KV cache: call setup_kv_cache(batch_size) first")
        self.cache_pos = 0

    def free_kv_cache(self) -> None:
        self.kv_cache = None
        self.cache_pos = None

    # --- forward --------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                pad_lens: torch.Tensor | None = None, use_cache: bool = False,
                last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits, loss).

        targets: (B, T) next-token ids, IGNORE_INDEX where no loss is wanted.
        pad_lens: (B,) number of left pad tokens per row (None: no padding).
        use_cache: append to the KV cache at slot self.cache_pos instead of attending within idx only.
        last_only: compute logits for the last position only (all generation needs).
        """
        B, T = idx.shape
        start = self.cache_pos if use_cache else 0
        if use_cache and start is None:
            raise RuntimeError("use_cache=True needs setup_kv_cache() first")
        end = start + T
        if end > self.config.max_seq_len:
            raise ValueError(f"sequence length {end} exceeds max_seq_len {self.config.max_seq_len}")
        cache = self.kv_cache[0][0] if use_cache else None
        if use_cache and (B > cache.size(0) or end > cache.size(2)):
            raise ValueError(f"batch {B} x length {end} does not fit the KV cache; call setup_kv_cache again")

        slots = torch.arange(start, end, device=idx.device)
        if pad_lens is None:
            cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
            # A chunk after the first one (start > 0, T > 1) needs an offset causal mask.
            mask = None if (T == 1 or start == 0) else slots[:, None] >= torch.arange(end, device=idx.device)
        else:
            positions = (slots[None, :] - pad_lens[:, None]).clamp(min=0)  # (B, T)
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
            keys = torch.arange(end, device=idx.device)
            causal = keys[None, :] <= slots[:, None]                       # (T, S)
            real = keys[None, :] >= pad_lens[:, None]                      # (B, S)
            # A pad query would see no key at all (NaN softmax), so it may always see itself.
            mask = (causal[None] & real[:, None, :]) | (keys[None, :] == slots[:, None])[None]
            mask = mask.unsqueeze(1)                                       # (B, 1, T, S)

        x = self.embed_tokens(idx)
        cache_pos = start if use_cache else None
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache_pos, self.kv_cache[i] if use_cache else None)
        if use_cache:
            self.cache_pos = end
        x = self.norm(x)

        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
            return logits, loss
        logits = self.lm_head(x[:, -1:] if last_only else x)
        return logits, None

    def compiled_decode_step(self):
        """decode_step through torch.compile, made once per model: CUDA graphs replay it on GPU; on CPU,
        Inductor freezing folds the weights into the graph as constants and prepacks them (MKL, oneDNN), which
        is why the KV cache is an argument of decode_step and not an attribute (it would be frozen too).
        Frozen means frozen: weights changed after the first call are not seen."""
        if getattr(self, "_compiled_decode", None) is None:
            if self.embed_tokens.weight.is_cuda:
                self._compiled_decode = torch.compile(self.decode_step, mode="reduce-overhead", fullgraph=True,
                                                      dynamic=False)
            else:
                import torch._inductor.config as inductor_config

                compiled = torch.compile(self.decode_step, fullgraph=True, dynamic=False)

                def frozen_decode_step(*args):
                    # A config patch, not torch.compile(options=...): freezing set through options is
                    # not seen by the compile and the step stays unfrozen (measured: 40% slower).
                    with inductor_config.patch(CPU_DECODE_COMPILE_OPTIONS):
                        return compiled(*args)
                self._compiled_decode = frozen_decode_step
        return self._compiled_decode

    def decode_step(self, tokens: torch.Tensor, slot: torch.Tensor, pad_lens: torch.Tensor,
                    kv_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One cached decode step with shapes that never change: tokens (B, 1), slot (1,) the cache slot to
        write, pad_lens (B,), kv_cache = self.kv_cache. Attends over the whole cache buffer, masked, so that
        torch.compile (and CUDA graphs) see one static graph for the whole generation. Returns (B, vocab)."""
        B = tokens.size(0)
        keys = torch.arange(kv_cache[0][0].size(2), device=tokens.device)
        positions = (slot - pad_lens).clamp(min=0)                                  # (B,)
        cos, sin = self.rope_cos[positions][:, None, None], self.rope_sin[positions][:, None, None]
        mask = ((keys[None] <= slot) & (keys[None] >= pad_lens[:, None]))[:, None, None]  # (B, 1, 1, S)
        x = self.embed_tokens(tokens)
        for layer, kv in zip(self.layers, kv_cache):
            x = layer(x, cos, sin, mask, slot, kv)
        return self.lm_head(self.norm(x))[:, -1].view(B, -1)


# --- generation: one sampling routine and one loop, shared by train, inference, app and bench -----------
def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy; top-p keeps the smallest set of most
    likely tokens whose probability mass reaches p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # drop a token once the ones before it reach p
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float = 1.0, eos_id: int | None = None, pad_id: int = 0,
             generator: torch.Generator | None = None, use_cache: bool = True, compile: bool = False,
             on_token=None) -> tuple[list[list[int]], dict]:
    """Generate for a batch of token-id prompts of any lengths (left-padded into one batch).

    A row stops at eos_id (which is not returned) or after max_new_tokens. on_token(step, ids) is called
    with each step's (B,) ids, for streaming. With the KV cache, prefill runs model.forward and every
    decode step runs model.decode_step (static shapes); compile=True runs that step through torch.compile
    (CUDA graphs on GPU). use_cache=False recomputes the whole sequence each step, for comparison.
    Returns the new ids per row, in input order, and timings.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.embed_tokens.weight.device
    lengths = [len(p) for p in prompts]
    width, batch = max(lengths), len(prompts)
    if width + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt ({width}) + max_new_tokens ({max_new_tokens}) exceeds the context window "
                         f"of {model.config.max_seq_len} tokens")
    idx = torch.tensor([[pad_id] * (width - n) + p for p, n in zip(prompts, lengths)], device=device)
    pad_lens = torch.tensor([width - n for n in lengths], device=device) if min(lengths) < width else None
    if use_cache:
        model.setup_kv_cache(batch, width + max_new_tokens)
        slot = torch.tensor([width], device=device)
        decode = model.compiled_decode_step() if compile else model.decode_step
        row_pads = pad_lens if pad_lens is not None else torch.zeros(batch, dtype=torch.long, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    logits, _ = model(idx, pad_lens=pad_lens, use_cache=use_cache, last_only=True)
    next_ids = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
    sync()
    t1 = time.perf_counter()
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    n_steps = 0
    for step in range(max_new_tokens):
        if eos_id is not None:
            next_ids = next_ids.masked_fill(finished, eos_id)  # finished rows only repeat eos
            finished |= next_ids == eos_id
        out[:, step] = next_ids
        n_steps = step + 1
        if on_token is not None:
            on_token(step, next_ids)
        # Asking whether every row is done waits for the GPU, so there it is asked every 8th step only;
        # rows that finished keep producing eos, which is cut off below.
        done_check = eos_id is not None and (step % 8 == 7 or device.type != "cuda")
        if step == max_new_tokens - 1 or (done_check and bool(finished.all())):
            break
        if use_cache:
            logits = decode(next_ids[:, None], slot, row_pads, model.kv_cache)
            slot += 1
        else:
            idx = torch.cat([idx, next_ids[:, None]], dim=1)
            logits = model(idx, pad_lens=pad_lens, last_only=True)[0][:, -1]
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)
    sync()
    t2 = time.perf_counter()
    rows = []
    for row in out[:, :n_steps].tolist():
        rows.append(row[: row.index(eos_id)] if eos_id is not None and eos_id in row else row)
    stats = {"prefill_tokens": sum(lengths), "prefill_s": t1 - t0,
             "new_tokens": sum(len(r) for r in rows), "decode_s": t2 - t1, "steps": n_steps}
    return rows, stats
