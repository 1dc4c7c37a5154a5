"""kernels.py: each machine-specific speed trick against an exact reference."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from config import get_config
from kernels import Linear
from model import GPT


def small_config(**kw):
    base = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=48, max_seq_len=64)
    return get_config("tiny", **base | kw)


@pytest.fixture
def bf16_gemms_in_fp32(monkeypatch):
    """Sets kernels.BF16_GEMMS_IN_FP32 (whatever this CPU measured) and restores it after the test."""
    return lambda on: monkeypatch.setattr(kernels, "BF16_GEMMS_IN_FP32", on)


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
    rows = kernels.FP32_GEMM_MIN_ROWS["eager"]
    few, many = torch.randn(rows - 1, 16), torch.randn(rows, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert took_fp32_gemm(lin(many)) and not took_fp32_gemm(lin(few))
    assert not took_fp32_gemm(lin(many))
    assert took_fp32_gemm(lin.bfloat16()(many.bfloat16()))  # bf16 weights without autocast: inference


def test_bf16_training_step_same_with_either_gemm(bf16_gemms_in_fp32, monkeypatch):
    """A whole model under bf16 autocast: loss and gradients from the two GEMM paths agree to bf16 precision."""
    calls = []
    apply = kernels.Bf16LinearInFp32.apply
    monkeypatch.setattr(kernels.Bf16LinearInFp32, "apply", lambda *a: calls.append(1) or apply(*a))
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


@pytest.mark.parametrize("rows", [5, 32])
def test_compiled_bf16_decode_step_matches_eager_within_bf16_rounding(bf16_gemms_in_fp32, rows):
    """bf16 weights: the frozen compiled step (oneDNN, or at 32 rows the fp32 GEMM route) against the eager
    step on the same cache. The kernels round differently, so logits are compared, not argmaxes: a step that
    read the wrong slots or positions would be off by whole units."""
    bf16_gemms_in_fp32(True)
    torch.manual_seed(0)
    model = GPT(small_config(vocab_size=128, init_std=0.2, tie_embeddings=False)).eval().bfloat16()
    model.setup_kv_cache(rows=rows, length=32)
    prompts = [torch.randint(0, 128, (1 + i % 9,)).tolist() for i in range(rows)]
    with torch.no_grad():
        model.prefill(prompts, list(range(rows)), [0] * rows)
        tokens = torch.randint(0, 128, (rows,))
        positions = torch.tensor([len(p) for p in prompts])
        eager = model.decode_step(tokens, positions, model.kv_cache).float()
        compiled = kernels.compile_decode_step(model)(tokens, positions, model.kv_cache).float()
        other = model.decode_step(tokens.roll(1), positions, model.kv_cache).float()
    scale = eager.abs().max()
    assert (compiled - eager).abs().max() <= 0.03 * scale
    assert (other - eager).abs().max() > 0.3 * scale  # what a wrong input does, for comparison
