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
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    frozen: weights changed after the first call are not seen. Each new shape compiles once."""
    if getattr(model, "_compiled_decode", None) is None:
        if next(model.parameters()).is_cuda:
            model._compiled_decode = torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=True,
                                                   dynamic=False)
        else:
            import torch._inductor.config as inductor_config

            compiled = torch.compile(model.decode_step, fullgraph=True, dynamic=False)

            def frozen_decode_step(*args):
                # A config patch, not torch.compile(options=...): freezing set through options is not seen by
                # the compile and the step stays unfrozen (measured: 40% slower).
                with inductor_config.patch(CPU_DECODE_COMPILE_OPTIONS):
                    return compiled(*args)
            model._compiled_decode = frozen_decode_step
    return model._compiled_decode
