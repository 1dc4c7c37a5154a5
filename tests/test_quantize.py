"""quantize.py: a whole quantized model against the fp32 model that holds its dequantized weights."""
import pytest
import torch

from layers import QuantEmbedding, QuantLinear
from model import GPT
from quantize import quantize_model
from runner import allocate_kv_cache, compile_decode_step
from tests.test_layers import small_config
from tests.test_model import prefill


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_matches_fp32_with_the_dequantized_weights(mode):
    """The whole model, prefill and decode steps, plain and compiled: the exact reference is the fp32 model
    whose weights are the quantized layers' dequantized ones (1e-3 of the largest logit)."""
    torch.manual_seed(0)
    model = GPT(small_config(vocab_size=128, d_model=64, ffn_hidden=96, init_std=0.2)).eval()
    quantized = GPT(model.config).eval()
    quantized.load_state_dict(model.state_dict())
    quantize_model(quantized, mode)
    assert isinstance(quantized.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(quantized.embed_tokens, QuantEmbedding)  # the tied head's rows
    with torch.no_grad():  # the reference: every quantized weight, dequantized, in an fp32 model
        for name, module in quantized.named_modules():
            if isinstance(module, QuantLinear) and "fused" not in name:  # the tied head: lm_head
                model.get_submodule(name.replace("embed_tokens.head", "lm_head")).weight.copy_(module.dequantize())
    prompts = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 7)]
    with torch.no_grad():
        kv = {m: allocate_kv_cache(m, rows=2, slots=16) for m in (model, quantized)}
        want, got = (prefill(m, kv[m], prompts, [0, 1], [0, 0]) for m in (model, quantized))
        assert (got - want).abs().max() <= 1e-3 * want.abs().max()
        tokens, positions = torch.tensor([5, 9]), torch.tensor([3, 7])
        want = model.decode_step(tokens, positions, kv[model])
        assert (quantized.decode_step(tokens, positions, kv[quantized]) - want).abs().max() <= \
            1e-3 * want.abs().max()
        compiled = compile_decode_step(quantized)(tokens, positions, kv[quantized])
        assert (compiled - want).abs().max() <= 1e-3 * want.abs().max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("gemm_rows", [2, 64], ids=["gemm", "kernels"])
def test_fused_step_of_a_quantized_model_equals_the_eager_pass(machine, mode, gemm_rows):
    """step.cpp on int8/int4 weights, with every instruction set this CPU has pinned in turn and the many-row GEMM
    on the dequantized weights taken (dense_min_rows 2) or not (64): its logits on a ragged pass (prompt chunks
    beside decode tokens) equal the eager pass's, and the runner ran the fused step. The fp32 kernels (plain,
    avx2, avx512) and the GEMM are exact (1e-5 of the largest logit); the int16 kernels round activations to 16
    bits per group, so passes whose inputs differ by fp32 rounding may round a few of them apart (1e-3, as
    against fp32 above)."""
    from layers import kernel_isas
    from runner import ModelRunner
    from scheduler import Batch

    torch.manual_seed(0)
    model = quantize_model(GPT(small_config(vocab_size=128, d_model=64, ffn_hidden=96, init_std=0.2)).eval(), mode)
    prompts = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 7, 5)]
    first = Batch(chunks=[(0, 0, prompts[0]), (2, 0, prompts[2])], decode=[], sampled=[], span=3, length=5)
    second = Batch(chunks=[(1, 0, prompts[1])], decode=[(9, 3), (0, 0), (4, 5)], sampled=[0, 2], span=3, length=7)
    for isa in [isa for isa in kernel_isas() if not isa.endswith("int8")]:  # the int8 kernels: below
        machine.pin(f"quant_kernel={isa},dense_min_rows={gemm_rows},int16_rows=0")
        got = {}
        for step in ("eager", "fused"):
            runner = ModelRunner(model, rows=3, max_len=16, step=step)
            assert runner.step == step
            with torch.no_grad():
                got[step] = [runner.forward(first, [None] * 3), runner.forward(second, [None] * 3)]
        for want, have in zip(got["eager"], got["fused"]):
            for a, b in ((want.decode, have.decode), (want.chunks, have.chunks)):
                if a is not None:
                    tolerance = 1e-3 if "int16" in isa or "vnni" in isa else 1e-5
                    assert (a - b).abs().max() <= tolerance * a.abs().max(), (isa, gemm_rows)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_step_with_int8_activations_equals_the_eager_pass_on_the_same_kernels(machine, mode):
    """Pinned int8 kernels (quant_kernel=...-int8): the fused step, which reads each weight from the 16-output
    panels it packed once, gives the eager pass's logits on the same kernels (the op packs as it goes) to 1e-4,
    10x closer than the exact kernels are: the activations were rounded to 8 bits, in both. One layer, since a
    deeper pass rounds a few activations apart wherever fp32 rounding moves them across a step."""
    from layers import kernel_isas
    from runner import ModelRunner
    from scheduler import Batch

    torch.manual_seed(0)
    model = quantize_model(GPT(small_config(vocab_size=128, d_model=64, ffn_hidden=96, n_layer=1)).eval(), mode)
    prompts = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 7, 5)]
    first = Batch(chunks=[(0, 0, prompts[0]), (2, 0, prompts[2])], decode=[], sampled=[], span=3, length=5)
    second = Batch(chunks=[(1, 0, prompts[1])], decode=[(9, 3), (0, 0), (4, 5)], sampled=[0, 2], span=3, length=7)

    def logits(isa: str, step: str) -> torch.Tensor:
        machine.pin(f"quant_kernel={isa},dense_min_rows=64,int16_rows=0")
        runner = ModelRunner(model, rows=3, max_len=16, step=step)
        with torch.no_grad():
            runner.forward(first, [None] * 3)
            out = runner.forward(second, [None] * 3)
        return torch.cat([out.decode, out.chunks])

    int8 = [isa for isa in kernel_isas() if isa.endswith("int8")]
    assert "plain-int8" in int8
    exact = logits("plain", "eager")
    for isa in int8:
        want, got = logits(isa, "eager"), logits(isa, "fused")
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), isa
        assert (got - want).abs().max() * 10 < (exact - want).abs().max(), isa


def test_fused_step_of_a_bf16_model_equals_fp32_with_its_matmul_inputs_rounded_to_bf16(machine):
    """A bf16 model (--dtype bf16) in the fused step, each bf16 kernel this CPU has pinned in turn: its logits on a
    ragged pass equal an fp32 model holding the same (widened) weights whose every matmul input is rounded to
    bf16 first, the reference written in torch (1e-4 of the largest logit), and the runner ran the fused step.
    With bf16_kernel=none the model takes the eager step, as before."""
    from layers import quant_ops
    from runner import ModelRunner
    from scheduler import Batch

    torch.manual_seed(0)
    model = GPT(small_config(vocab_size=128, d_model=64, ffn_hidden=96, init_std=0.2)).eval().bfloat16()
    reference = GPT(model.config).eval()
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    for module in reference.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda _, args: (args[0].bfloat16().float(),))
    reference.rope_cos, reference.rope_sin = model.rope_cos.float(), model.rope_sin.float()
    prompts = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 7, 5)]
    first = Batch(chunks=[(0, 0, prompts[0]), (2, 0, prompts[2])], decode=[], sampled=[], span=3, length=5)
    second = Batch(chunks=[(1, 0, prompts[1])], decode=[(9, 3), (0, 0), (4, 5)], sampled=[0, 2], span=3, length=7)

    def logits(m: GPT, step: str = "auto") -> tuple[str, torch.Tensor]:
        runner = ModelRunner(m, rows=3, max_len=16, step=step)
        with torch.no_grad():
            runner.forward(first, [None] * 3)
            out = runner.forward(second, [None] * 3)
        return runner.step, torch.cat([out.decode, out.chunks]).float()

    want = logits(reference, "eager")[1]  # the hooks run in the eager pass, module by module
    for kernel in quant_ops().bf16_kernels():
        machine.pin(f"bf16_kernel={kernel}")
        step, got = logits(model)
        assert step == "fused", kernel
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), kernel
    machine.pin("bf16_kernel=none")
    assert logits(model)[0] == "eager"


def test_passes_of_a_few_tokens_take_the_int16_kernels_and_drafts_go_with_their_row(machine, monkeypatch):
    """With int16_rows pinned at 2, a pass of up to 2 decode and prompt tokens runs the int16 kernels, a larger
    one the exact ones, and a row's draft tokens do not count: a verify pass runs what its decode token would."""
    from layers import kernel_isas
    from runner import ModelRunner
    from scheduler import Batch

    int16 = [isa for isa in kernel_isas() if "vnni" in isa or "int16" in isa]
    if not int16:  # this CPU has no int16 kernels: the exact kernels take every pass
        int16 = ["none"]
    machine.pin(f"quant_kernel=plain,int16_kernel={int16[0]},int16_rows=2")
    model = quantize_model(GPT(small_config(vocab_size=128, d_model=64, ffn_hidden=96)).eval(), "int4")
    runner = ModelRunner(model, rows=3, max_len=16, step="fused")
    ran, forward = [], runner.fused.forward
    monkeypatch.setattr(runner, "fused", type("Spy", (), {"forward": lambda self, *a: ran.append(a[-2]) or
                                                          forward(*a)})())
    with torch.no_grad():
        runner.forward(Batch([(0, 0, [1, 2])], [], [], 1, 2), [None] * 3)                 # 2 prompt tokens
        runner.forward(Batch([(1, 0, [1, 2, 3])], [], [], 2, 3), [None] * 3)              # 3
        runner.forward(Batch([], [(5, 2)], [0], 1, 3), [None] * 3)                         # 1 decode token
        runner.forward(Batch([], [], [], 1, 8, verify=[(0, 3, [5, 6, 7, 8, 9])]), [None] * 3)  # a draft alone
    fast = int16[0] if int16[0] != "none" else "plain"
    assert ran == [fast, "plain", fast, fast]
