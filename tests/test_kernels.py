"""kernels.py: each machine-specific speed trick against an exact reference."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from config import get_config
from kernels import Linear
from model import GPT


def small_config(**kw):
    base = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=48, max_seq_len=64,
                tie_embeddings=True)
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


# --- weight-only int8 / int4 layers ----------------------------------------------------------------------
def reference(x: torch.Tensor, layer: kernels.QuantLinear) -> torch.Tensor:
    """The exact reference: the dequantized weights, in float64."""
    return F.linear(x.double(), layer.dequantize().double())


def q8_groups_of_32(w: torch.Tensor) -> kernels.QuantLinear:
    """int8 with one scale per 32 weights (llama.cpp's Q8_0), the layout GGUF embeddings come in."""
    groups = w.view(w.size(0), -1, 32)
    s = groups.abs().amax(-1).clamp(min=1e-12) / 127
    q = (groups / s[..., None]).round().clamp(-127, 127).to(torch.int8).view_as(w)
    return kernels.QuantLinear("q8", w.size(0), w.size(1), q=q, s=s)


LAYOUTS = {"int4": kernels.quantize_q4, "int8 per channel": kernels.quantize_q8, "int8 groups of 32": q8_groups_of_32}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("rows", [1, 3, 5])
def test_quantized_kernels_match_the_dequantized_weights(layout, rows):
    """Both kernels (AVX2, and the plain loops any CPU runs) against the dequantized weights in float64. The
    AVX2 path rounds activations to 16-bit fixed point per group of 32 (1.5e-5 of the group's largest |x|)."""
    g = torch.Generator().manual_seed(rows)
    layer = LAYOUTS[layout](torch.randn(200, 96, generator=g))
    x = torch.randn(rows, 96, generator=g)
    want = reference(x, layer)
    ops = kernels.quant_ops()
    args = (layer.qs, layer.d, layer.m) if layer.fmt == "q4" else (layer.q, layer.s)
    for op, tolerance in (("_plain", 1e-6), ("", 1e-4)):
        got = getattr(ops, f"{layer.fmt}_linear{op}")(x, *args)
        assert (got.double() - want).abs().max() <= tolerance * want.abs().max(), (op, layout)


def test_quantizing_bounds_the_weight_error():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    int4, int8 = kernels.quantize_q4(w), kernels.quantize_q8(w)
    groups = w.view(64, 4, 32)
    low, step = groups.amin(-1), (groups.amax(-1) - groups.amin(-1)) / 15
    # int4: half a step, plus the rounding of d and m to fp16 (Q4_1 stores them so): 2^-11 of |m| + 15 d
    bound = (step / 2 + (low.abs() + 15 * step) * 2 ** -11).repeat_interleave(32, dim=1)
    assert ((int4.dequantize() - w).abs() <= bound).all()
    assert ((int8.dequantize() - w).abs() <= w.abs().amax(1, keepdim=True) / 254 + 1e-6).all()


def test_many_rows_take_the_gemm_and_fused_projections_equal_separate_ones(monkeypatch):
    g = torch.Generator().manual_seed(0)
    layers = [kernels.quantize_q4(torch.randn(n, 64, generator=g)) for n in (64, 32, 32)]
    x = torch.randn(3, 64, generator=g)
    separate = [layer(x) for layer in layers]
    fused = kernels.FusedProjections(layers)
    for a, b in zip(fused(x), separate):
        assert torch.equal(a, b)  # the same arithmetic for every output, one call instead of three
    assert all(torch.equal(layer(x), s) for layer, s in zip(layers, separate))  # members now views of the fused
    monkeypatch.setattr(kernels, "DENSE_MIN_ROWS", 2)  # 3 rows: the GEMM on the dequantized weights
    for a, layer in zip(fused(x), layers):
        assert (a.double() - reference(x, layer)).abs().max() <= 1e-5 * a.abs().max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_matches_fp32_with_the_dequantized_weights(mode):
    """The whole model, prefill and decode steps, plain and compiled: the exact reference is the fp32 model
    whose weights are the quantized layers' dequantized ones (1e-3 of the largest logit)."""
    torch.manual_seed(0)
    model = GPT(small_config(vocab_size=128, d_model=64, ffn_hidden=96, init_std=0.2)).eval()
    quantized = GPT(model.config).eval()
    quantized.load_state_dict(model.state_dict())
    kernels.quantize_model(quantized, mode)
    assert isinstance(quantized.layers[0].self_attn.q_proj, kernels.QuantLinear)
    assert isinstance(quantized.embed_tokens, kernels.QuantEmbedding)  # the tied head's rows
    with torch.no_grad():  # the reference: every quantized weight, dequantized, in an fp32 model
        for name, module in quantized.named_modules():
            if isinstance(module, kernels.QuantLinear) and "fused" not in name:  # the tied head: lm_head
                model.get_submodule(name.replace("embed_tokens.head", "lm_head")).weight.copy_(module.dequantize())
    prompts = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 7)]
    with torch.no_grad():
        for m in (model, quantized):
            m.setup_kv_cache(rows=2, length=16)
        want, got = (m.prefill(prompts, [0, 1], [0, 0]) for m in (model, quantized))
        assert (got - want).abs().max() <= 1e-3 * want.abs().max()
        tokens, positions = torch.tensor([5, 9]), torch.tensor([3, 7])
        want = model.decode_step(tokens, positions, model.kv_cache)
        assert (quantized.decode_step(tokens, positions, quantized.kv_cache) - want).abs().max() <= \
            1e-3 * want.abs().max()
        compiled = kernels.compile_decode_step(quantized)(tokens, positions, quantized.kv_cache)
        assert (compiled - want).abs().max() <= 1e-3 * want.abs().max()


def test_two_models_compiled_in_one_process_keep_their_own_steps():
    """Module guards are dropped from the compiled step; each model still gets its own graph and weights."""
    steps = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = GPT(small_config(vocab_size=128, init_std=0.2)).eval()
        model.setup_kv_cache(rows=1, length=16)
        steps.append(model)
    tokens, positions = torch.tensor([3]), torch.tensor([0])
    with torch.no_grad():
        for model in steps:
            want = model.decode_step(tokens, positions, model.kv_cache)
            got = kernels.compile_decode_step(model)(tokens, positions, model.kv_cache)
            assert torch.allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(64, 192), (192, 64)])
def test_newton_schulz_in_fp32_matches_torchs_bf16_iteration(shape):
    """The fp32 Newton-Schulz that Muon uses where bf16 GEMMs are slow against torch's own (bf16): the same
    iteration, so the same result up to bf16 rounding; and both orthogonalise (singular values near 1)."""
    torch.manual_seed(0)
    grad = torch.randn(shape)
    ours = kernels.newton_schulz_fp32(grad, (3.4445, -4.775, 2.0315), 5, 1e-7)
    theirs = kernels.TORCH_NEWTON_SCHULZ(grad, (3.4445, -4.775, 2.0315), 5, 1e-7).float()
    assert ours.shape == grad.shape and ours.dtype == grad.dtype
    assert (ours - theirs).norm() / theirs.norm() < 3e-2
    singular = torch.linalg.svdvals(ours)
    assert singular.min() > 0.5 and singular.max() < 1.5
