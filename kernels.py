"""Machine-specific speed tricks, kept beside the model rather than inside it.

Each trick is chosen once per process, by measuring this machine where it matters, and never changes the
numbers silently: each has a test against an exact reference and a row in bench.py.

* bf16 GEMMs run by the fp32 kernel on CPUs whose bf16 unit is the slower one (`Linear`).
* glibc keeps freed blocks for reuse (`keep_freed_memory_for_reuse`).
* The decode step through torch.compile: frozen, prepacked weights on CPU, CUDA graphs on GPU
  (`compile_decode_step`).
"""
from __future__ import annotations

import ctypes
import os
import time
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# Inductor on CPU: freezing folds the weights into the graph and prepacks them (MKL for fp32, oneDNN for bf16);
# concat_linear fuses q/k/v and gate/up into one GEMM each; emulate_precision_casts rounds bf16 where eager does,
# so that greedy tokens stay close to the plain path's; the C++ wrapper calls the kernels without Python.
# Quantized models are not frozen: their kernels prepack nothing, their step was faster unfrozen (8.6 vs 9.5 ms),
# and only unfrozen graphs hit AOTAutograd's disk cache (a second start: 10 s instead of 23).
CPU_DECODE_COMPILE_OPTIONS = {"freezing": True, "cpp.enable_concat_linear": True, "emulate_precision_casts": True,
                              "cpp_wrapper": True}
# Compiled artifacts persist here (gitignored), so a second run of the same shape skips most of the compile.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parent / ".cache" / "inductor"))

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


def best_time(fn, repeats: int = 5) -> float:
    """Seconds of the fastest of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cpu_bf16_gemm_is_slow() -> bool:
    """Whether this CPU multiplies bf16 matrices slower than the same values held as fp32 (30% margin).
    On CPUs with AVX512-BF16 but no AMX the bf16 dot-product instruction has half the FMA rate: an Intel VM
    here peaked at 76 GFLOP/s per core in bf16 and 159 in fp32, so oneDNN's bf16 GEMMs reached 150 and MKL's
    fp32 ones 300; without bf16 instructions at all (AVX2) bf16 is emulated. Where bf16 is fast (AMX, Zen 5,
    GPUs) the bf16 kernels are kept."""
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
    b = a.bfloat16()
    return best_time(lambda: a @ a) < 0.7 * best_time(lambda: b @ b)


def bf16_gemms_run_in_fp32() -> bool:
    global BF16_GEMMS_IN_FP32
    if BF16_GEMMS_IN_FP32 is None:
        BF16_GEMMS_IN_FP32 = cpu_bf16_gemm_is_slow()
    return BF16_GEMMS_IN_FP32


TORCH_NEWTON_SCHULZ = torch.optim._muon._zeropower_via_newtonschulz  # torch's own, in bf16


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


def muon_in_fp32_where_bf16_is_slow() -> bool:
    """Muon runs its Newton-Schulz matmuls in bf16; on a CPU whose bf16 GEMMs are slower than fp32 (emulated
    without bf16 instructions: ~0.3 GFLOP/s on an AVX2-only EPYC, where a Muon step took 3x an AdamW step),
    run them in fp32. True when it swapped the function in."""
    if not bf16_gemms_run_in_fp32():
        return False
    torch.optim._muon._zeropower_via_newtonschulz = newton_schulz_fp32
    return True


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


def compile_decode_step(model: nn.Module):
    """model.decode_step through torch.compile, made once per model. On GPU it replays as CUDA graphs. On CPU,
    Inductor freezing folds the weights into the graph as constants and prepacks them (MKL, oneDNN), which is
    why the KV cache is an argument of decode_step and not an attribute (it would be frozen too). Frozen means
    frozen: weights changed after the first call are not seen. Each new shape compiles once; the seconds spent
    compiling are in model.compile_seconds."""
    if getattr(model, "_compiled_decode", None) is None:
        model.compile_seconds = 0.0
        if next(model.buffers()).is_cuda:
            model._compiled_decode = torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=True,
                                                   dynamic=False)
        else:
            import torch._inductor.config as inductor_config

            quantized = any(isinstance(m, QuantLinear) for m in model.modules())
            options = CPU_DECODE_COMPILE_OPTIONS | {"freezing": not quantized}
            # Module guards go (0.7 ms a step): the weights are fixed for the graph's life, frozen or not.
            compiled = torch.compile(own_code(model), fullgraph=True, dynamic=False,
                                     options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
            compiled_shapes = set()

            def frozen_decode_step(tokens, positions, kv_cache):
                # A config patch, not torch.compile(options=...): freezing set through options is not seen by
                # the compile and the step stays unfrozen (measured: 40% slower). Only a new shape compiles.
                shape = (tuple(tokens.shape), tuple(kv_cache[0][0].shape), kv_cache[0][0].dtype)
                if shape in compiled_shapes:
                    return compiled(tokens, positions, kv_cache)
                t0 = time.perf_counter()
                if quantized and tokens.size(0) >= dense_min_rows():
                    for module in model.modules():  # the GEMM path's fp32 weights, made before tracing
                        if isinstance(module, QuantLinear) and module.dense is None:
                            module.dense = module.dequantize()
                with inductor_config.patch(options):
                    logits = compiled(tokens, positions, kv_cache)
                compiled_shapes.add(shape)
                model.compile_seconds += time.perf_counter() - t0
                return logits
            model._compiled_decode = frozen_decode_step
    return model._compiled_decode


def own_code(model: nn.Module):
    """model.decode_step as a function with a code object of its own. Dynamo keeps one cache per code object
    and, without module guards, could not tell two models' compiled steps apart (bench.py loads several)."""
    def decode_step(tokens, positions, kv_cache):
        return model.decode_step(tokens, positions, kv_cache)
    code = decode_step.__code__.replace(co_name=f"decode_step_{id(model):x}")
    return types.FunctionType(code, decode_step.__globals__, code.co_name, None, decode_step.__closure__)


def compile_cache_hits() -> dict:
    """This process's hits and misses of Inductor's FX-graph cache and AOTAutograd's cache on disk."""
    from torch._dynamo.utils import counters

    inductor, aot = counters["inductor"], counters["aot_autograd"]
    return {"fx_graph_hit": inductor["fxgraph_cache_hit"], "fx_graph_miss": inductor["fxgraph_cache_miss"],
            "aot_autograd_hit": aot["autograd_cache_hit"], "aot_autograd_miss": aot["autograd_cache_miss"]}


# --- weight-only quantized layers (int8, int4) --------------------------------------------------------
# GGUF block layouts as bytes per block of 32 weights: Q4_0 d(fp16) qs(16); Q4_1 d m qs(16); Q8_0 d qs(32 int8).
GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
DENSE_MIN_ROWS: int | None = None  # None: measured once per process by dense_min_rows()
_ops_ready = False


def quant_ops():
    """torch.ops.slm, built from kernels.cpp at first use (about a minute, then cached in .cache/)."""
    global _ops_ready
    if not _ops_ready:
        import os
        import sys
        from pathlib import Path

        from torch.utils.cpp_extension import load

        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")  # ninja
        root = Path(__file__).resolve().parent
        build = root / ".cache" / "kernels"
        build.mkdir(parents=True, exist_ok=True)
        load(name="slm_kernels", sources=[str(root / "kernels.cpp")], build_directory=str(build),
             extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=False,
             verbose=False)
        for name in ("q4_linear", "q4_linear_plain"):  # output shapes, for torch.compile
            torch.library.register_fake(f"slm::{name}")(lambda x, qs, d, m: x.new_empty(x.size(0), qs.size(0)))
        for name in ("q8_linear", "q8_linear_plain"):
            torch.library.register_fake(f"slm::{name}")(lambda x, q, s: x.new_empty(x.size(0), q.size(0)))
        _ops_ready = True
    return torch.ops.slm


class QuantLinear(nn.Module):
    """y = x @ W.T without bias, W held as int4 ("q4": groups of 32, w = d * q + m, llama.cpp's Q4_1) or int8
    ("q8": w = s * q, one scale per group). A few rows run the fused kernels of kernels.cpp on the quantized
    weights; from DENSE_MIN_ROWS rows (measured per machine) a GEMM on the dequantized weights is faster, so
    those are made once and kept. Either way the numbers are the dequantized weights'."""

    def __init__(self, fmt: str, out_features: int, in_features: int, **tensors: torch.Tensor):
        super().__init__()
        self.fmt, self.out_features, self.in_features = fmt, out_features, in_features
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.dense: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"{self.fmt}, in_features={self.in_features}, out_features={self.out_features}"

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight matrix, dequantized to fp32 (the embedding lookup of a tied head)."""
        if self.fmt == "q4":
            packed = self.qs[ids].view(*ids.shape, -1, 16)
            q = torch.cat([packed & 15, packed >> 4], dim=-1).float()  # (.., groups, 32)
            w = self.d[ids].float()[..., None] * q + self.m[ids].float()[..., None]
        else:
            q = self.q[ids].float().view(*ids.shape, self.s.size(-1), -1)
            w = self.s[ids][..., None] * q
        return w.flatten(-2)

    def dequantize(self) -> torch.Tensor:
        return self.rows(torch.arange(self.out_features, device=self.s.device if self.fmt == "q8" else
                                      self.d.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        if x2.size(0) >= dense_min_rows() or x2.device.type != "cpu":
            weight = self.dense if self.dense is not None else self.dequantize()  # folded away when frozen
            if self.dense is None and not torch.compiler.is_compiling():
                self.dense = weight
            y = F.linear(x2, weight)
        elif self.fmt == "q4":
            y = quant_ops().q4_linear(x2, self.qs, self.d, self.m)
        else:
            y = quant_ops().q8_linear(x2, self.q, self.s)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class FusedProjections(nn.Module):
    """Projections of the same input (q, k, v; or gate, up) as one quantized matmul: one kernel call, and one
    conversion of x, instead of several. Its members' weights become views of the fused ones."""

    def __init__(self, layers: list[QuantLinear]):
        super().__init__()
        self.sizes = [layer.out_features for layer in layers]
        names = ("qs", "d", "m") if layers[0].fmt == "q4" else ("q", "s")
        self.fused = QuantLinear(layers[0].fmt, sum(self.sizes), layers[0].in_features,
                                 **{n: torch.cat([getattr(layer, n) for layer in layers]) for n in names})
        start = 0
        for layer in layers:
            for n in names:
                setattr(layer, n, getattr(self.fused, n)[start:start + layer.out_features])
            start += layer.out_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.fused(x).split(self.sizes, dim=-1)


def project(x: torch.Tensor, *layers: nn.Module) -> tuple[torch.Tensor, ...]:
    """Each layer applied to x: in one fused call where quantize_model fused these layers, else one by one."""
    group = getattr(layers[0], "group", None)
    if group is not None and len(group.sizes) == len(layers):
        return group(x)
    return tuple(layer(x) for layer in layers)


class QuantEmbedding(nn.Module):
    """The token lookup of a tied embedding whose matrix is quantized for the head: rows dequantized."""

    def __init__(self, head: QuantLinear):
        super().__init__()
        self.head = head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head.rows(ids)


def quantize_q4(w: torch.Tensor) -> QuantLinear:
    """int4 in llama.cpp's Q4_1 form: per group of 32, d = (max - min) / 15 and m = min, stored in fp16."""
    N, K = w.shape
    groups = w.float().view(N, K // 32, 32)
    low, high = groups.amin(-1), groups.amax(-1)
    d = (high - low) / 15
    q = ((groups - low[..., None]) / torch.where(d > 0, d, 1)[..., None] + 0.5).floor().clamp(0, 15).to(torch.uint8)
    qs = (q[..., :16] | (q[..., 16:] << 4)).reshape(N, K // 2)
    return QuantLinear("q4", N, K, qs=qs.contiguous(), d=d.half().float(), m=low.half().float())


def quantize_q8(w: torch.Tensor) -> QuantLinear:
    """int8, symmetric, one scale per output channel."""
    s = w.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    q = (w.float() / s).round().clamp(-127, 127).to(torch.int8)
    return QuantLinear("q8", w.size(0), w.size(1), q=q, s=s)


def from_gguf_blocks(kind: str, data: torch.Tensor, shape: tuple[int, int]) -> QuantLinear:
    """A layer holding a GGUF tensor's own blocks (raw bytes, [N, groups * block bytes]): no re-quantizing."""
    N, K = shape
    blocks = data.view(N, K // 32, GGUF_BLOCK_BYTES[kind])
    scale = blocks[..., :2].contiguous().view(torch.float16).view(N, K // 32)
    if kind == "Q8_0":
        return QuantLinear("q8", N, K, q=blocks[..., 2:].contiguous().view(torch.int8).view(N, K), s=scale.float())
    low = blocks[..., 2:4].contiguous().view(torch.float16).view(N, K // 32) if kind == "Q4_1" else -8 * scale
    qs = blocks[..., -16:].contiguous().view(N, K // 2)
    return QuantLinear("q4", N, K, qs=qs, d=scale.float(), m=low.float())  # fp16 to fp32 is exact


def quantize_model(model: nn.Module, mode: str, gguf_blocks: dict | None = None) -> nn.Module:
    """Every matmul weight (q, k, v, o, gate, up, down and the head) as int8 or int4, in place. Where the
    checkpoint kept GGUF blocks (convert.py --keep-quantized), those are used as they are: Q4_0/Q4_1 for int4,
    Q8_0 for either (llama.cpp's choice for SmolLM2's embedding, finer than 4 bits). A tied embedding's lookup
    reads the quantized head's rows. A load-time choice: checkpoints never hold these layers."""
    if mode not in ("int8", "int4"):
        raise ValueError(f"--quantize must be int8 or int4, not {mode!r}")
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
        else:
            quantize = quantize_q4 if mode == "int4" and module.in_features % 32 == 0 else quantize_q8
            layer = quantize(module.weight.detach())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.to(module.weight.device))
    if model.config.tie_embeddings:
        model.embed_tokens = QuantEmbedding(model.lm_head)
    for block in model.layers:
        for parent, names in ((block.self_attn, ("q_proj", "k_proj", "v_proj")), (block.mlp, ("gate_proj", "up_proj"))):
            layers = [getattr(parent, n) for n in names]
            if len({(layer.fmt, layer.in_features, tuple(layer.s.shape[1:]) if layer.fmt == "q8" else None)
                    for layer in layers}) == 1:  # one format and layout: they can be one matmul
                group = FusedProjections(layers)
                for layer in layers:
                    object.__setattr__(layer, "group", group)  # not a child: the group is registered once, below
                parent.fused = group
    return model


def dense_min_rows() -> int:
    """From how many rows a GEMM on dequantized weights beats the fused int4 kernel on this machine (timed
    once, on a 1536 x 576 layer). At one row the kernel reads 7x fewer bytes; with many rows the GEMM's
    register blocking wins."""
    global DENSE_MIN_ROWS
    if DENSE_MIN_ROWS is None:
        g = torch.Generator().manual_seed(0)
        layer = quantize_q4(torch.randn(1536, 576, generator=g))
        dense = layer.dequantize()
        ops = quant_ops()
        DENSE_MIN_ROWS = 64
        for rows in (2, 4, 8, 16, 32):
            x = torch.randn(rows, 576, generator=g)
            if best_time(lambda: F.linear(x, dense)) < best_time(lambda: ops.q4_linear(x, layer.qs, layer.d, layer.m)):
                DENSE_MIN_ROWS = rows
                break
    return DENSE_MIN_ROWS
