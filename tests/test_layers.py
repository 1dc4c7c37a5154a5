"""layers.py and kernels.cpp: each linear path against an exact reference, with the machine's choice pinned and
the path that ran asserted."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import layers
from config import get_config
from layers import Linear
from model import GPT


def small_config(**kw):
    base = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=48, max_seq_len=64,
                tie_embeddings=True)
    return get_config("tiny", **base | kw)


@pytest.fixture
def bf16_gemms_in_fp32(machine):
    """Pins machine.py's bf16_gemms_in_fp32 (whatever this CPU measured) for the test."""
    return lambda on: machine.pin(f"bf16_gemms_in_fp32={int(on)}")


def took_fp32_gemm(y: torch.Tensor) -> bool:
    return type(y.grad_fn).__name__ == "Bf16LinearInFp32Backward"


def test_bf16_gemm_in_fp32_is_a_bf16_gemm(bf16_gemms_in_fp32):
    """Under bf16 autocast the fp32-kernel path and the bf16 kernel both give the exact product of the
    bf16-rounded operands, rounded to bf16 (within one bf16 ulp, float64 reference), forward and backward."""
    torch.manual_seed(0)
    lin = Linear(96, 80, bias=False)
    x0, c = torch.randn(4, 32, 96), torch.randn(4, 32, 80)
    w64, x64, c64 = (t.bfloat16().double() for t in (lin.weight.detach(), x0, c))
    want = {"y": x64 @ w64.T, "grad_x": c64 @ w64, "grad_w": c64.flatten(0, 1).T @ x64.flatten(0, 1)}
    for on in (False, True):
        bf16_gemms_in_fp32(on)
        lin.weight.grad = None
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lin(x)
        assert took_fp32_gemm(y) == on
        (y.float() * c).sum().backward()
        got = {"y": y, "grad_x": x.grad, "grad_w": lin.weight.grad}
        assert y.dtype == torch.bfloat16 and lin.weight.grad.dtype == torch.float32
        for name, value in got.items():
            err = (value.double() - want[name]).abs()
            assert (err <= 2 ** -8 * want[name].abs() + 1e-6).all(), (on, name, err.max())


def test_bf16_gemm_in_fp32_only_where_it_pays(bf16_gemms_in_fp32):
    """Few rows (weight-bound: widening the weights would cost more) and fp32 stay on the plain kernels."""
    bf16_gemms_in_fp32(True)
    lin = Linear(16, 16, bias=False)
    rows = layers.FP32_GEMM_MIN_ROWS["eager"]
    few, many = torch.randn(rows - 1, 16), torch.randn(rows, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert took_fp32_gemm(lin(many)) and not took_fp32_gemm(lin(few))
    assert not took_fp32_gemm(lin(many))
    assert took_fp32_gemm(lin.bfloat16()(many.bfloat16()))  # bf16 weights without autocast: inference


def test_bf16_training_step_same_with_either_gemm(bf16_gemms_in_fp32, monkeypatch):
    """A whole model under bf16 autocast: loss and gradients from the two GEMM paths agree to bf16 precision."""
    calls = []
    apply = layers.Bf16LinearInFp32.apply
    monkeypatch.setattr(layers.Bf16LinearInFp32, "apply", lambda *a: calls.append(1) or apply(*a))
    torch.manual_seed(0)
    model = GPT(small_config())
    idx = torch.randint(0, 97, (8, 32))  # 256 rows: every GEMM takes the fp32 path
    results = []
    for on in (False, True):
        bf16_gemms_in_fp32(on)
        calls.clear()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx, idx)[1]
        loss.backward()
        assert len(calls) == (2 * 7 + 1 if on else 0)  # 7 linears per layer, and the head
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-2)
    assert F.cosine_similarity(grad_a, grad_b, dim=0) > 0.999


# --- weight-only int8 / int4 layers ----------------------------------------------------------------------
def reference(x: torch.Tensor, layer: layers.QuantLinear) -> torch.Tensor:
    """The exact reference: the dequantized weights, in float64."""
    return F.linear(x.double(), layer.dequantize().double())


def q8_groups_of_32(w: torch.Tensor) -> layers.QuantLinear:
    """int8 with one scale per 32 weights (llama.cpp's Q8_0), the layout GGUF embeddings come in."""
    groups = w.view(w.size(0), -1, 32)
    s = (groups.abs().amax(-1).clamp(min=1e-4) / 127).half()  # fp16 scales, as GGUF stores them
    q = (groups / s.float()[..., None]).round().clamp(-127, 127).to(torch.int8).view_as(w)
    return layers.QuantLinear("q8", w.size(0), w.size(1), q=q, s=s)


LAYOUTS = {"int4": layers.quantize_q4, "int8 per channel": layers.quantize_q8, "int8 groups of 32": q8_groups_of_32}


def cpu_flags() -> set[str]:
    return {flag for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
            for flag in line.split(":", 1)[1].split()}


def test_the_kernels_offer_every_instruction_set_this_cpu_has(monkeypatch):
    """isas() is what the C++ side can run here, best first, as /proc/cpuinfo says; kernel_isas() caps it where
    ATen's kernels are capped (ATEN_CPU_CAPABILITY, as `make test-avx2` does), so that an emulated AVX2 machine
    runs the AVX2 kernels; machine.py picks the first unless pinned."""
    flags, isas = cpu_flags(), layers.quant_ops().isas()
    avx2 = {"avx2", "fma", "f16c"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl"} <= flags
    assert isas[-1] == "plain" and ("avx2" in isas) == ("avx2-int16" in isas) == avx2
    assert ("avx-vnni" in isas) == (avx2 and "avx_vnni" in flags)
    assert ("avx512" in isas) == avx512 and ("avx512-vnni" in isas) == (avx512 and "avx512_vnni" in flags)
    assert ("avx512-int8" in isas) == ("avx512-vnni" in isas) and "plain-int8" in isas
    assert isas == sorted(isas, key=["avx512", "avx2", "avx512-vnni", "avx-vnni", "avx2-int16", "avx512-int8",
                                     "plain-int8", "plain"].index)
    for cap, allowed in (("avx2", {"avx2", "avx2-int16", "plain-int8", "plain"}), ("default", {"plain-int8", "plain"}),
                         ("avx512", set(isas))):
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", cap)
        assert layers.kernel_isas() == [i for i in isas if i in allowed]


# The plain loops and the fp32 tiles are exact; the int16 kernels round activations to 16-bit fixed point per
# group of 32 (1.5e-5 of the group's largest |x|).
TOLERANCE = {"plain": 1e-6, "avx2": 1e-6, "avx512": 1e-6, "avx2-int16": 1e-4, "avx-vnni": 1e-4, "avx512-vnni": 1e-4}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("rows", [1, 3, 5])
def test_quantized_kernels_match_the_dequantized_weights(layout, rows):
    """Every kernel this CPU can run (and the plain loops any CPU runs) against the dequantized weights in
    float64."""
    g = torch.Generator().manual_seed(rows)
    layer = LAYOUTS[layout](torch.randn(200, 96, generator=g))
    x = torch.randn(rows, 96, generator=g)
    want = reference(x, layer)
    args = (layer.qs, layer.d, layer.m) if layer.fmt == "q4" else (layer.q, layer.s)
    for isa in layers.quant_ops().isas():  # every one, even above an ATEN_CPU_CAPABILITY cap
        if isa.endswith("int8"):  # against their own rounding, below
            continue
        got = getattr(torch.ops.slm, f"{layer.fmt}_linear")(x, *args, isa)
        assert (got.double() - want).abs().max() <= TOLERANCE[isa] * want.abs().max(), (isa, layout)


def int8_reference(x: torch.Tensor, layer: layers.QuantLinear) -> torch.Tensor:
    """The int8 kernels' arithmetic, in float64: each group of 32 activations rounded to s * round(x / s) with
    s = max |x| / 127 (ties to even); q4 weights' offsets m times the group's exact sum of x."""
    groups = x.double().view(x.size(0), -1, 32)
    s = groups.abs().amax(-1, keepdim=True) / 127
    rounded = (torch.round(groups / torch.where(s > 0, s, 1)) * s).flatten(1)
    if layer.fmt == "q8":
        return F.linear(rounded, layer.dequantize().double())
    N, K = layer.out_features, layer.in_features
    q = torch.cat([layer.qs.view(N, K // 32, 16) & 15, layer.qs.view(N, K // 32, 16) >> 4], -1).double()
    scaled = (q * layer.d.double()[..., None]).flatten(1)
    return F.linear(rounded, scaled) + groups.sum(-1) @ layer.m.double().T


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("rows", [1, 5, 13])
def test_int8_kernels_round_activations_to_8_bits_per_group(layout, rows):
    """The int8 kernels (vpdpbusd, and the plain loops that any CPU runs) equal their own arithmetic written in
    torch (8-bit activations per group of 32, as llama.cpp's Q8_1), over outputs that leave part of a 16-lane
    panel and rows that take each row block (8, 4, 1); and the rounding is really there: the exact product is 10x
    further away."""
    g = torch.Generator().manual_seed(rows)
    layer = LAYOUTS[layout](torch.randn(200, 96, generator=g))
    x = torch.randn(rows, 96, generator=g)
    want, exact = int8_reference(x, layer), reference(x, layer)
    args = (layer.qs, layer.d, layer.m) if layer.fmt == "q4" else (layer.q, layer.s)
    kernels = [isa for isa in layers.quant_ops().isas() if isa.endswith("int8")]
    assert "plain-int8" in kernels
    for isa in kernels:
        got = getattr(torch.ops.slm, f"{layer.fmt}_linear")(x, *args, isa).double()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (isa, layout)
        assert (got - want).abs().max() * 10 < (got - exact).abs().max(), (isa, layout)


@pytest.mark.parametrize("rows", [1, 2, 7, 13])
def test_bf16_kernels_multiply_inputs_rounded_to_bf16(rows):
    """The fused step's bf16 kernels (vdpbf16ps, and the plain loops any CPU runs) equal x rounded to bf16 times
    the bf16 weights in float64, over 29 panels of 16 outputs (the last one partial), which each thread's share
    takes as groups of 8 (one or two rows), 4 and 1 panels, and rows that take each row block (6, then 1 to 5);
    and the rounding is really there: the product with fp32 inputs is 10x further away."""
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(459, 96, generator=g).bfloat16(), torch.randn(rows, 96, generator=g)
    want, exact = F.linear(x.bfloat16().double(), w.double()), F.linear(x.double(), w.double())
    kernels = layers.quant_ops().bf16_kernels()
    assert "plain-bf16" in kernels
    for kernel in kernels:
        got = layers.quant_ops().bf16_linear(x, w, kernel).double()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), kernel
        assert (got - want).abs().max() * 10 < (got - exact).abs().max(), kernel
    with pytest.raises(RuntimeError, match="unknown bf16 kernel 'avx9-bf16'"):
        layers.quant_ops().bf16_linear(x, w, "avx9-bf16")


def test_a_layer_runs_the_pinned_kernel(machine, monkeypatch):
    """QuantLinear passes machine.py's quant_kernel to the op, which runs exactly that code (or refuses)."""
    ran, op = [], torch.ops.slm.q4_linear
    monkeypatch.setattr(torch.ops.slm, "q4_linear", lambda *args: ran.append(args[-1]) or op(*args))
    layer = layers.quantize_q4(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    for isa in layers.quant_ops().isas():
        machine.pin(f"quant_kernel={isa},dense_min_rows=64")
        layer(torch.randn(2, 64))
    assert ran == layers.quant_ops().isas()
    with pytest.raises(RuntimeError, match="unknown kernel instruction set 'sse9'"):
        op(torch.randn(1, 64), layer.qs, layer.d, layer.m, "sse9")


def test_quantizing_bounds_the_weight_error():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    int4, int8 = layers.quantize_q4(w), layers.quantize_q8(w)
    groups = w.view(64, 4, 32)
    low, step = groups.amin(-1), (groups.amax(-1) - groups.amin(-1)) / 15
    # int4: half a step, plus the rounding of d and m to fp16 (Q4_1 stores them so): 2^-11 of |m| + 15 d
    bound = (step / 2 + (low.abs() + 15 * step) * 2 ** -11).repeat_interleave(32, dim=1)
    assert ((int4.dequantize() - w).abs() <= bound).all()
    # int8: half a step of the fp16 scale (its rounding: 2^-11 of it, across the 127 steps to the largest weight)
    top = w.abs().amax(1, keepdim=True)
    assert ((int8.dequantize() - w).abs() <= top / 254 * (1 + 2 ** -11) + top * 2 ** -11).all()


def test_many_rows_take_the_gemm_and_fused_projections_equal_separate_ones(machine):
    g = torch.Generator().manual_seed(0)
    parts = [layers.quantize_q4(torch.randn(n, 64, generator=g)) for n in (64, 32, 32)]
    x = torch.randn(3, 64, generator=g)
    separate = [layer(x) for layer in parts]
    fused = layers.FusedProjections(parts)
    for a, b in zip(fused(x), separate):
        assert torch.equal(a, b)  # the same arithmetic for every output, one call instead of three
    assert all(torch.equal(layer(x), s) for layer, s in zip(parts, separate))  # members now views of the fused
    machine.pin("dense_min_rows=2")  # 3 rows: the GEMM on the dequantized weights
    for a, layer in zip(fused(x), parts):
        assert (a.double() - reference(x, layer)).abs().max() <= 1e-5 * a.abs().max()
