"""The model runner: owns the KV cache, turns a scheduled Batch into one forward pass, and samples.

A pass holds the decode tokens of the running rows and the step's prompt chunks, so a step that admits prompts
still reads the weights once. Three ways to run it, all with the model's own numbers:
  fused     step.cpp: the whole pass in one C++ call, each token attending over its own row's slots (any rows,
            any lengths, no compile); the default wherever it runs (CPU; fp32 or int8/int4 weights, and bf16
            where the CPU has AVX-512 BF16: inputs of its matmuls rounded to bf16, the rest in fp32)
  eager     model.py op by op: the decode part spans the rows up to the highest one in use and the cache slots up
            to the longest row (rounded up to 64), so a step costs time linear in what is in use
  compiled  torch.compile of the decode part (frozen, prepacked weights on CPU, CUDA graphs on GPU), every row and
            every slot, its shapes fixed; prompt chunks go through the eager pass first
"""
from __future__ import annotations

import time
import types
import weakref
from dataclasses import dataclass, field

import torch

from config import STEPS
from layers import (
    QuantEmbedding,
    QuantLinear,
    bf16_kernel,
    dense_min_rows,
    int16_kernel,
    int16_rows,
    quant_kernel,
    quant_ops,
)
from model import GPT, Decode, Prefill
from scheduler import Batch, Sequence

KV_WINDOW = 64  # eager passes read the cache slots in use, rounded up to this


def allocate_kv_cache(model: GPT, rows: int, slots: int,
                      dtype: str = "auto") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer K/V buffers of shape (rows, n_kv_head, slots, head_dim), in the model's dtype (auto; fp32 for
    the fused step, which keeps its activations in fp32 whatever its weights). Separate tensors:
    a compiled step writes into each in place (views of one big tensor made Inductor copy it whole).
    dtype int8: each slot is head_dim int8 values and their fp32 scale, 4 bytes more (step.cpp's store_q8), so
    that a slice of slots (the prefix cache's blocks) carries its scales with it."""
    cfg = model.config
    if slots > cfg.max_seq_len:
        raise ValueError(f"KV cache length {slots} exceeds max_seq_len {cfg.max_seq_len}")
    int8 = dtype == "int8"
    shape = (rows, cfg.n_kv_head, slots, cfg.head_dim + 4 * int8)
    options = {"dtype": {"int8": torch.int8, "fp32": torch.float32}.get(dtype, model.norm.weight.dtype),
               "device": model.rope_cos.device}
    cache = [(torch.zeros(shape, **options), torch.zeros(shape, **options)) for _ in model.layers]
    if model.rope_cos.is_cuda:  # CUDA graphs replay in-place writes only into inputs with fixed addresses
        for k, v in cache:
            torch._dynamo.mark_static_address(k)
            torch._dynamo.mark_static_address(v)
    return cache


@dataclass
class Logits:
    """One pass's logits, by what asked for them."""
    decode: torch.Tensor | None  # (len(batch.sampled), vocab)
    chunks: torch.Tensor | None  # (len(batch.chunks), vocab): after each chunk's last token
    verify: list[torch.Tensor]   # per row of batch.verify: (1 + its draft, vocab), at every one of its tokens
    scored: dict[int, torch.Tensor] = field(default_factory=dict)  # chunk index -> (its length, vocab), if scored

    @classmethod
    def split(cls, logits: torch.Tensor, batch: Batch) -> Logits:
        """From logits at: the sampled rows, then each chunk's last token (every token of a scored chunk), then
        every token being verified."""
        per_chunk = [len(tokens) if scored(batch, b) else 1 for b, (_, _, tokens) in enumerate(batch.chunks)]
        sizes = [len(batch.sampled), sum(per_chunk)] + [len(tokens) for _, _, tokens in batch.verify]
        decode, chunks, *verify = logits.split(sizes)
        kept = {b: part for b, part in enumerate(chunks.split(per_chunk)) if scored(batch, b)}
        if kept:
            chunks = torch.stack([part[-1] for part in chunks.split(per_chunk)])
        return cls(decode if batch.sampled else None, chunks if batch.chunks else None, verify, kept)


def scored(batch: Batch, chunk: int) -> bool:
    return bool(batch.scored) and batch.scored[chunk]


def logits_at(batch: Batch, offset: int) -> list[int]:
    """Where the wanted logits are among a pass's tokens that hold the chunks and then the drafts being verified,
    from `offset` on: the last token of each chunk (each token of a scored one), every token of each draft."""
    at, out = offset, []
    for b, (_, _, tokens) in enumerate(batch.chunks):
        out.extend(range(at if scored(batch, b) else at + len(tokens) - 1, at + len(tokens)))
        at += len(tokens)
    for _, _, tokens in batch.verify:
        out.extend(range(at, at + len(tokens)))
        at += len(tokens)
    return out


class ModelRunner:
    def __init__(self, model: GPT, rows: int, max_len: int, step: str = "auto", use_cache: bool = True,
                 kv_cache_dtype: str = "auto"):
        """step: fused, eager or compiled (auto: fused where it runs, else eager). use_cache=False recomputes
        every sequence whole at every step (for comparison only). kv_cache_dtype int8: an 8-bit KV cache (fused
        step only)."""
        if step not in STEPS:
            raise ValueError(f"step must be one of {', '.join(STEPS)}, not {step!r}")
        if step == "fused" and not fused_runs(model):
            raise ValueError("the fused step runs plain Llama models (no config levers) on the CPU with fp32 or "
                             "int8/int4 weights, or bf16 ones where the CPU has AVX-512 BF16; use --step eager")
        self.model, self.rows, self.max_len, self.use_cache = model, rows, max_len, use_cache
        self.device = model.rope_cos.device
        self.step = "recompute" if not use_cache else ("fused" if fused_runs(model) else "eager") if step == "auto" \
            else step
        if kv_cache_dtype == "int8" and self.step != "fused":
            raise ValueError(f"an int8 KV cache runs in the fused step only, and this run takes the {self.step} step "
                             "(plain Llama on the CPU with fp32 or int8/int4 weights is fused); use --kv-cache-dtype "
                             "auto")
        kv_dtype = "fp32" if self.step == "fused" and kv_cache_dtype == "auto" else kv_cache_dtype
        self.kv_cache = allocate_kv_cache(model, rows, max_len, kv_dtype) if use_cache else None
        self.compiled = self.step == "compiled"
        self.decode_step = compile_decode_step(model) if self.compiled else model.decode_step
        self.fused = fused_model(model) if self.step == "fused" else None
        self.quantized = any(isinstance(m, QuantLinear) for m in model.modules())

    @property
    def compile_seconds(self) -> float:
        return self.decode_step.seconds if self.compiled else 0.0

    def forward(self, batch: Batch, running: list[Sequence | None]) -> Logits:
        """The logits of the batch's sampled rows, after each prompt chunk's last token, and at every token of
        each row's draft being verified."""
        if self.step == "recompute":
            return self.forward_without_cache(batch, running)
        pieces = batch.chunks + batch.verify  # both go in as runs of tokens into a row at an offset
        if self.step == "fused":
            decode = [batch.decode[row] for row in batch.sampled]
            ids = [token for token, _ in decode] + [t for _, _, tokens in pieces for t in tokens]
            rows = batch.sampled + [row for row, _, tokens in pieces for _ in tokens]
            positions = [slot for _, slot in decode] + [start + j for _, start, tokens in pieces
                                                        for j in range(len(tokens))]
            at = list(range(len(decode))) + logits_at(batch, len(decode))
            # A pass of a few tokens takes the int16 kernels where they win (machine.py), counting decode and
            # prompt tokens only: a draft is verified on the kernels its row's lone decode token would take.
            plain = max(1, len(decode) + sum(len(tokens) for _, _, tokens in batch.chunks))
            few = self.quantized and int16_kernel() != "none" and plain <= int16_rows()
            isa = int16_kernel() if few else quant_kernel()
            logits = self.fused.forward(*(torch.tensor(v) for v in (ids, rows, positions, at)),
                                        [k for k, _ in self.kv_cache], [v for _, v in self.kv_cache], isa,
                                        bf16_kernel())
            return Logits.split(logits, batch)
        chunks = prefill_part(pieces, self.device) if pieces else None
        span = self.rows if self.compiled else batch.span
        slots = self.max_len if self.compiled else min(self.max_len, -(-batch.length // KV_WINDOW) * KV_WINDOW)
        kv = self.kv_cache if (span, slots) == (self.rows, self.max_len) else \
            [(k[:span, :, :slots], v[:span, :, :slots]) for k, v in self.kv_cache]
        decode = None
        if batch.sampled:
            fill = [(0, 0)] * (span - len(batch.decode))  # rows past the highest in use: slot 0 of a free row
            tokens, positions = (torch.tensor(column, device=self.device) for column in zip(*batch.decode, *fill))
            decode = (tokens, positions)
        sampled = torch.tensor(batch.sampled, device=self.device)
        if self.compiled or chunks is None:  # the decode step alone, after the prompt chunks
            at = torch.tensor(logits_at(batch, 0), device=self.device)
            chunk_logits = self.model.step(*chunks[:3], kv, at) if chunks else None
            decode_logits = self.decode_step(*decode, kv)[sampled] if decode else None
            return Logits.split(torch.cat([t for t in (decode_logits, chunk_logits) if t is not None]), batch)
        ids, positions, parts, _ = chunks
        at = torch.tensor(logits_at(batch, span if decode else 0), device=self.device)
        if decode:
            ids, positions = torch.cat([decode[0], ids]), torch.cat([decode[1], positions])
            parts = [Decode.at(decode[1], slots), *parts]
            at = torch.cat([sampled, at])
        return Logits.split(self.model.step(ids, positions, parts, kv, at), batch)

    def forward_without_cache(self, batch: Batch, running: list[Sequence | None]) -> Logits:
        """Next-token logits of whole sequences, recomputed from scratch (right padding is causal-safe)."""
        def logits_of(sequences: list[list[int]]) -> torch.Tensor:
            width = max(len(s) for s in sequences)
            idx = torch.tensor([s + [0] * (width - len(s)) for s in sequences], device=self.device)
            logits, _ = self.model(idx)
            return logits[torch.arange(len(sequences)), torch.tensor([len(s) - 1 for s in sequences])]
        chunks = logits_of([running[row].request.prompt for row, _, _ in batch.chunks]) if batch.chunks else None
        decode = logits_of([running[row].request.prompt + running[row].request.tokens for row in batch.sampled]) \
            if batch.sampled else None
        return Logits(decode, chunks, [])

    def sample(self, sequences: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Next token of each sequence (logits (n, vocab)): the greedy ones from one argmax, the others each with
        its own settings and generator; a constrained one only from the tokens its grammar allows next. Reading
        them back waits for the device."""
        constrained = [b for b, seq in enumerate(sequences) if seq.request.constraint is not None]
        if constrained:
            logits = logits.clone()
            for b in constrained:
                logits[b].masked_fill_(~sequences[b].request.constraint.allowed().to(logits.device), float("-inf"))
        greedy = logits.argmax(dim=-1).tolist()
        tokens = []
        for b, seq in enumerate(sequences):
            r = seq.request
            if r.temperature == 0:
                tokens.append(greedy[b])
                continue
            tokens.append(int(torch.multinomial(probabilities(logits[b:b + 1], r), 1, generator=self.generator(seq))))
        return tokens

    def accept(self, seq: Sequence, draft: list[int], logits: torch.Tensor) -> list[int]:
        """The tokens a sequence takes from a verified draft (logits (1 + len(draft), vocab) at its waiting token
        and each draft token): the draft's longest prefix that the model would have made, then the model's own
        next token. Greedy: the drafts that equal the argmax. Sampled: draft token t is kept with probability
        p(t), else the next token is drawn from p without t (renormalised), which is exactly sampling from p
        (the draft is one token with probability 1), so speculation never changes what a request gets."""
        r = seq.request
        if r.temperature == 0:
            best = logits.argmax(dim=-1).tolist()
            kept = next((i for i, (d, b) in enumerate(zip(draft, best)) if d != b), len(draft))
            return draft[:kept] + [best[kept]]
        probs, generator = probabilities(logits, r), self.generator(seq)
        for i, token in enumerate(draft):
            if torch.rand((), generator=generator, device=self.device) >= probs[i, token]:
                rest = probs[i].clone()
                rest[token] = 0
                return draft[:i] + [int(torch.multinomial(rest, 1, generator=generator))]
        return draft + [int(torch.multinomial(probs[len(draft)], 1, generator=generator))]

    def generator(self, seq: Sequence) -> torch.Generator | None:
        """The sequence's own random generator (None: torch's global one), made at its first sampled token."""
        if seq.generator is None and seq.request.seed is not None:
            seq.generator = torch.Generator(self.device).manual_seed(seq.request.seed)
        return seq.generator


def fused_runs(model: GPT) -> bool:
    """Whether step.cpp can run this model: plain Llama (no levers), on the CPU, with fp32 or int8/int4 weights,
    or bf16 ones (all of them, in multiples of 32 inputs) where a bf16 kernel was chosen."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    fp32 = model.norm.weight.dtype == torch.float32 and all(m.weight.dtype == torch.float32 for m in linears)
    bf16 = model.norm.weight.dtype == torch.bfloat16 and bool(linears) and all(
        m.weight.dtype == torch.bfloat16 and m.in_features % 32 == 0 for m in linears)
    return not model.config.levers and not model.rope_cos.is_cuda and (fp32 or bf16 and bf16_kernel() != "none")


FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (its weights, step.cpp's Model)


def fused_model(model: GPT):
    """step.cpp's Model over this model's own weight tensors, made once per model and remade only when a weight
    tensor was replaced (no copies of the weights: it sees in-place updates, as training makes; int4/int8 layers
    keep their blocks, which its kernels dequantize as they go)."""
    weights = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
    if model in FUSED and FUSED[model][0] == weights:
        return FUSED[model][1]
    empty = torch.empty(0)

    def spec(module) -> list[torch.Tensor]:
        if isinstance(module, QuantLinear):
            return list((module.qs, module.d, module.m) if module.fmt == "q4" else (module.q, module.s, empty))
        return [module.weight.detach(), empty, empty]

    def group(parent, names: tuple[str, ...]) -> list[list[torch.Tensor]]:
        fused = getattr(parent, "fused", None)  # quantize_model's one matmul for these
        return [spec(fused.fused)] if fused is not None else [spec(getattr(parent, n)) for n in names]

    cfg = model.config
    embed = spec(model.embed_tokens.head if isinstance(model.embed_tokens, QuantEmbedding) else model.embed_tokens)
    norms = [[block.input_layernorm.weight.detach().float(), block.post_attention_layernorm.weight.detach().float()]
             for block in model.layers]  # a bf16 model's norms and RoPE tables widened (exactly) for the fp32 pass
    projections = [[group(b.self_attn, ("q_proj", "k_proj", "v_proj")), [spec(b.self_attn.o_proj)],
                    group(b.mlp, ("gate_proj", "up_proj")), [spec(b.mlp.down_proj)]] for b in model.layers]
    FUSED[model] = weights, quant_ops().Model(cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.norm_eps,
                                              model.rope_cos.float(), model.rope_sin.float(), embed, norms,
                                              projections, model.norm.weight.detach().float(), [spec(model.lm_head)])
    return FUSED[model][1]


def prefill_part(chunks: list[tuple[int, int, list[int]]], device: torch.device):
    """Prompt chunks (row, first slot, tokens) as one step's flat ids and positions, their Prefill part, and
    where each chunk ends among them."""
    rows = [row for row, _, _ in chunks]
    starts = torch.tensor([start for _, start, _ in chunks], device=device)
    lengths = torch.tensor([len(c) for _, _, c in chunks], device=device)
    token_b = torch.repeat_interleave(torch.arange(len(chunks), device=device), lengths)
    token_t = torch.arange(len(token_b), device=device) - (lengths.cumsum(0) - lengths)[token_b]
    slots = starts[token_b] + token_t
    longest = max(start + len(c) for _, start, c in chunks)
    queries = starts[:, None] + torch.arange(int(lengths.max()), device=device)              # (n, T)
    mask = (torch.arange(longest, device=device) <= queries[:, :, None]).unsqueeze(1)      # (n, 1, T, S)
    part = Prefill(torch.tensor(rows, device=device), token_b, token_t, slots, mask)
    ids = torch.tensor([t for _, _, c in chunks for t in c], device=device)
    return ids, slots, [part], lengths.cumsum(0) - 1


def probabilities(logits: torch.Tensor, request) -> torch.Tensor:
    """logits (B, V) -> the distribution (B, V) a request samples from: its temperature, top-k and top-p."""
    return filtered(logits, request.temperature, request.top_k, request.top_p).softmax(dim=-1)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy; top-p keeps the smallest set of most
    likely tokens whose probability mass reaches p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filtered(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def filtered(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float) -> torch.Tensor:
    """Logits scaled by the temperature, -inf outside the top-k and outside the smallest set of most likely
    tokens whose probability mass reaches top_p."""
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
    return logits


# --- the compiled decode step -------------------------------------------------------------------------------
# Inductor on CPU: freezing folds the weights into the graph and prepacks them (MKL for fp32, oneDNN for bf16);
# concat_linear fuses q/k/v and gate/up into one GEMM each; emulate_precision_casts rounds bf16 where eager does,
# so that greedy tokens stay close to the plain path's; the C++ wrapper calls the kernels without Python.
# Quantized models are not frozen: their kernels prepack nothing, their step was faster unfrozen (8.6 vs 9.5 ms),
# and only unfrozen graphs hit AOTAutograd's disk cache (a second start: 10 s instead of 23).
CPU_DECODE_COMPILE_OPTIONS = {"freezing": True, "cpp.enable_concat_linear": True, "emulate_precision_casts": True,
                              "cpp_wrapper": True}
COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its compiled step, made once


class CompiledDecodeStep:
    """model.decode_step through torch.compile, one per model (every runner over the model shares it). On GPU it
    replays as CUDA graphs. On CPU, Inductor freezing folds the weights into the graph as constants and
    prepacks them, which is why the KV cache is an argument of decode_step and not an attribute (it would be
    frozen too). Frozen means frozen: weights changed after the first call are not seen. Each new shape
    compiles once; `seconds` is the time spent compiling."""

    def __init__(self, model: GPT):
        self.model, self.seconds, self.shapes = weakref.proxy(model), 0.0, set()  # the cache must not keep it
        self.quantized = any(isinstance(m, QuantLinear) for m in model.modules())
        if model.rope_cos.is_cuda:
            self.options = {}
            self.compiled = torch.compile(own_code(model), mode="reduce-overhead", fullgraph=True, dynamic=False)
        else:
            self.options = CPU_DECODE_COMPILE_OPTIONS | {"freezing": not self.quantized}
            # Module guards go (0.7 ms a step): the weights are fixed for the graph's life, frozen or not.
            self.compiled = torch.compile(own_code(model), fullgraph=True, dynamic=False, options={
                "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, kv_cache) -> torch.Tensor:
        shape = (tuple(tokens.shape), tuple(kv_cache[0][0].shape), kv_cache[0][0].dtype)
        if shape in self.shapes:
            return self.compiled(tokens, positions, kv_cache)
        import torch._inductor.config as inductor_config

        t0 = time.perf_counter()
        if self.quantized:  # the machine's choices, decided before tracing (the trace reads them)
            quant_kernel()
            if tokens.size(0) >= dense_min_rows():
                for module in self.model.modules():  # the GEMM path's fp32 weights, made before tracing
                    if isinstance(module, QuantLinear) and module.dense is None:
                        module.dense = module.dequantize()
        # A config patch, not torch.compile(options=...): freezing set through options is not seen by the
        # compile and the step stays unfrozen (measured: 40% slower). Only a new shape compiles.
        with inductor_config.patch(self.options):
            logits = self.compiled(tokens, positions, kv_cache)
        self.shapes.add(shape)
        self.seconds += time.perf_counter() - t0
        return logits


def compile_decode_step(model: GPT) -> CompiledDecodeStep:
    if model not in COMPILED:
        COMPILED[model] = CompiledDecodeStep(model)
    return COMPILED[model]


def own_code(model: GPT):
    """model.decode_step as a function with a code object of its own. Dynamo keeps one cache per code object
    and, without module guards, could not tell two models' compiled steps apart (bench loads several)."""
    ref = weakref.ref(model)  # not the model itself: COMPILED's entry for it would keep it alive for ever

    def decode_step(tokens, positions, kv_cache):
        return ref().decode_step(tokens, positions, kv_cache)
    code = decode_step.__code__.replace(co_name=f"decode_step_{id(model):x}")
    return types.FunctionType(code, decode_step.__globals__, code.co_name, None, decode_step.__closure__)


def compile_cache_hits() -> dict:
    """This process's hits and misses of Inductor's FX-graph cache and AOTAutograd's cache on disk."""
    from torch._dynamo.utils import counters

    inductor, aot = counters["inductor"], counters["aot_autograd"]
    return {"fx_graph_hit": inductor["fxgraph_cache_hit"], "fx_graph_miss": inductor["fxgraph_cache_miss"],
            "aot_autograd_hit": aot["autograd_cache_hit"], "aot_autograd_miss": aot["autograd_cache_miss"]}
