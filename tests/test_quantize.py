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
