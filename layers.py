"""The linear paths under the model: each computes x @ W.T the fastest way this machine has, with the same numbers.

* Linear: nn.Linear whose bf16 GEMMs run on the fp32 kernel on CPUs whose bf16 unit is the slower one.
* QuantLinear: int8 or int4 weights. A few rows run the fused kernels of kernels.cpp on the quantized weights;
  from dense_min_rows rows, a GEMM on the dequantized weights.
* FusedProjections / project(): q/k/v and gate/up as one quantized call.
Which path runs is a machine.py choice, measured here, beside the layer it times.
"""
from __future__ import annotations

import functools
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from machine import CACHE, MACHINE, best_time

# Rows from which a bf16 GEMM pays to run in fp32 (measured on SmolLM2 decode): eager code widens the weights on
# every call, which pays from about 128 rows; a frozen compiled step widens them once, into its constants.
FP32_GEMM_MIN_ROWS = {"eager": 128, "compiled": 32}


def bf16_gemms_run_in_fp32() -> bool:
    return MACHINE.decide("bf16_gemms_in_fp32", cpu_bf16_gemm_is_slow)


def cpu_bf16_gemm_is_slow() -> bool:
    """Whether this CPU multiplies bf16 matrices slower than the same values held as fp32 (30% margin).
    On CPUs with AVX512-BF16 but no AMX the bf16 dot-product instruction has half the FMA rate: an Intel VM
    here peaked at 76 GFLOP/s per core in bf16 and 159 in fp32, so oneDNN's bf16 GEMMs reached 150 and MKL's
    fp32 ones 300; without bf16 instructions at all (AVX2) bf16 is emulated. Where bf16 is fast (AMX, Zen 5,
    GPUs) the bf16 kernels are kept."""
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
    b = a.bfloat16()
    return best_time(lambda: a @ a) < 0.7 * best_time(lambda: b @ b)


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


# --- weight-only quantized layers (int8, int4) --------------------------------------------------------
@functools.cache
def quant_ops():
    """kernels.cpp + step.cpp as torch.ops.slm (the quantized matmuls), isas() and Model (the fused decoder step),
    built at first use with this machine's compiler (about a minute, once; then cached in .cache/kernels)."""
    from pathlib import Path

    from torch.utils.cpp_extension import load

    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")  # ninja
    build = CACHE / "kernels"
    build.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parent
    if not any(build.glob("*.so")):
        print("building kernels.cpp and step.cpp for this machine (once, about a minute)...", file=sys.stderr)
    sources = ("kernels.cpp", "kernels_int16.cpp", "kernels_int8.cpp", "kernels_bf16.cpp", "step.cpp")
    module = load(name="slm_kernels", sources=[str(root / n) for n in sources],
                  build_directory=str(build), extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                  extra_include_paths=[str(root)], verbose=False)
    # output shapes, for torch.compile
    torch.library.register_fake("slm::q4_linear")(lambda x, qs, d, m, isa: x.new_empty(x.size(0), qs.size(0)))
    torch.library.register_fake("slm::q8_linear")(lambda x, q, s, isa: x.new_empty(x.size(0), q.size(0)))
    return module


def quant_kernel() -> str:
    """The instruction set the int8/int4 kernels and the fused step run with: the best this CPU has, unless
    pinned (a pin this CPU cannot run fails at the first call, saying so)."""
    return MACHINE.decide("quant_kernel", lambda: kernel_isas()[0])


def int16_kernel() -> str:
    """The int16 kernels (activations rounded to 16 bits) that passes of a few tokens take, or "none"."""
    return MACHINE.decide("int16_kernel", lambda: next((i for i in kernel_isas() if "vnni" in i or "int16" in i),
                                                       "none"))


def int16_rows() -> int:
    return MACHINE.decide("int16_rows", time_int16_crossover)


def time_int16_crossover() -> int:
    """Up to how many rows the int16 kernel beats the exact one on this machine (timed in turns on SmolLM2's
    1536 x 576 int4 layer, which streams from memory at one row): it reads and unpacks each weight once with
    fewer floating-point operations, while from a few rows on the exact kernel's tiles dequantize once for all.
    It must win by 10%."""
    if int16_kernel() == "none":
        return 0
    g = torch.Generator().manual_seed(0)
    weights = [quantize_q4(torch.randn(1536, 576, generator=g)) for _ in range(16)]  # 16 MB: past the caches
    exact, int16, best = quant_kernel(), int16_kernel(), 0
    for rows in (1, 2, 4, 8, 16):
        x = torch.randn(rows, 576, generator=g)
        times = {isa: [] for isa in (exact, int16)}
        for _ in range(3):
            for isa in times:
                times[isa].append(best_time(lambda: [torch.ops.slm.q4_linear(x, m.qs, m.d, m.m, isa) for m in weights]))
        if min(times[int16]) >= 0.9 * min(times[exact]):
            break
        best = rows
    return best


def bf16_kernel() -> str:
    """The fused step's kernel for bf16 weights: AVX-512 BF16's dot products where this CPU has them (and the
    kernels are not capped below AVX-512), else none, and bf16 models take the eager step as before."""
    capped = os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("avx2", "default")
    return MACHINE.decide("bf16_kernel", lambda: "avx512-bf16" if not capped and "avx512-bf16" in
                          quant_ops().bf16_kernels() else "none")


def kernel_isas() -> list[str]:
    """The instruction sets of kernels.cpp this CPU can run, best first, capped where ATen's own kernels are
    (ATEN_CPU_CAPABILITY=avx2 or default), so that a machine capped to emulate a smaller one runs its kernels."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    allowed = {"avx2": ("avx2", "avx2-int16", "plain-int8", "plain"), "default": ("plain-int8", "plain")}.get(cap)
    return [isa for isa in quant_ops().isas() if allowed is None or isa in allowed]


def dense_min_rows() -> int:
    return MACHINE.decide("dense_min_rows", time_dense_crossover)


def time_dense_crossover() -> int:
    """From how many rows a GEMM on dequantized weights beats the fused int4 kernel on this machine (timed on a
    1536 x 576 layer). At one row the kernel reads 7x fewer bytes; with many rows the GEMM's register blocking
    wins. The GEMM must win by 10% at this row count and the next, both timed in turns, so that a busy moment
    does not move the choice (it is kept for later processes)."""
    g = torch.Generator().manual_seed(0)
    layer = quantize_q4(torch.randn(1536, 576, generator=g))
    dense, isa = layer.dequantize(), quant_kernel()
    wins = []
    for rows in (4, 8, 16, 32, 64, 128):
        x = torch.randn(rows, 576, generator=g)
        kernel, gemm = [], []
        for _ in range(3):
            kernel.append(best_time(lambda: torch.ops.slm.q4_linear(x, layer.qs, layer.d, layer.m, isa)))
            gemm.append(best_time(lambda: F.linear(x, dense)))
        wins.append(min(gemm) < 0.9 * min(kernel))
        if wins[-2:] == [True, True]:
            return rows // 2
    return 128


class QuantLinear(nn.Module):
    """y = x @ W.T without bias, W held as int4 ("q4": groups of 32, w = d * q + m, llama.cpp's Q4_1) or int8
    ("q8": w = s * q, one scale per group), the scales in fp16 as GGUF stores them. Eager passes run the kernels
    of kernels.cpp on the quantized weights, or from dense_min_rows() rows (measured per machine, where MKL's
    GEMM wins) a GEMM on the dequantized weights, made once and kept. Either way the numbers are the dequantized
    weights'."""

    def __init__(self, fmt: str, out_features: int, in_features: int, **tensors: torch.Tensor):
        super().__init__()
        quant_ops()  # torch.ops.slm, built or loaded
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
            w = self.s[ids].float()[..., None] * q
        return w.flatten(-2)

    def dequantize(self) -> torch.Tensor:
        return self.rows(torch.arange(self.out_features, device=(self.d if self.fmt == "q4" else self.s).device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        if x2.size(0) >= dense_min_rows() or x2.device.type != "cpu":
            weight = self.dense if self.dense is not None else self.dequantize()  # folded away when frozen
            if self.dense is None and not torch.compiler.is_compiling():
                self.dense = weight
            y = F.linear(x2, weight)
        elif self.fmt == "q4":
            y = torch.ops.slm.q4_linear(x2, self.qs, self.d, self.m, quant_kernel())
        else:
            y = torch.ops.slm.q8_linear(x2, self.q, self.s, quant_kernel())
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
    return QuantLinear("q4", N, K, qs=qs.contiguous(), d=d.half(), m=low.half())


def quantize_q8(w: torch.Tensor) -> QuantLinear:
    """int8, symmetric, one scale per output channel, stored in fp16 as llama.cpp stores its Q8_0 scales."""
    s = (w.float().abs().amax(-1, keepdim=True).clamp(min=1e-4) / 127).half()
    q = (w.float() / s.float()).round().clamp(-127, 127).to(torch.int8)
    return QuantLinear("q8", w.size(0), w.size(1), q=q, s=s)
