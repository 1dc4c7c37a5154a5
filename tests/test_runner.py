"""runner.py: the compiled decode step against the eager one on the same cache, one compiled step per model, the
sampling rule of a draft token, and the 8-bit KV cache against its formula."""
import pytest
import torch

from model import GPT, apply_rope
from runner import allocate_kv_cache, compile_decode_step
from tests.test_layers import small_config
from tests.test_model import prefill


@pytest.mark.parametrize("rows", [5, 32])
def test_compiled_bf16_decode_step_matches_eager_within_bf16_rounding(machine, rows):
    """bf16 weights: the frozen compiled step (oneDNN, or at 32 rows the fp32 GEMM route) against the eager
    step on the same cache. The kernels round differently, so logits are compared, not argmaxes: a step that
    read the wrong slots or positions would be off by whole units."""
    machine.pin("bf16_gemms_in_fp32=1")
    torch.manual_seed(0)
    model = GPT(small_config(vocab_size=128, init_std=0.2, tie_embeddings=False)).eval().bfloat16()
    kv = allocate_kv_cache(model, rows=rows, slots=32)
    prompts = [torch.randint(0, 128, (1 + i % 9,)).tolist() for i in range(rows)]
    with torch.no_grad():
        prefill(model, kv, prompts, list(range(rows)), [0] * rows)
        tokens = torch.randint(0, 128, (rows,))
        positions = torch.tensor([len(p) for p in prompts])
        eager = model.decode_step(tokens, positions, kv).float()
        compiled = compile_decode_step(model)(tokens, positions, kv).float()
        other = model.decode_step(tokens.roll(1), positions, kv).float()
    scale = eager.abs().max()
    assert (compiled - eager).abs().max() <= 0.03 * scale
    assert (other - eager).abs().max() > 0.3 * scale  # what a wrong input does, for comparison


def test_two_models_compiled_in_one_process_keep_their_own_steps():
    """Module guards are dropped from the compiled step; each model still gets its own graph and weights, and
    every runner over one model shares its step."""
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(GPT(small_config(vocab_size=128, init_std=0.2)).eval())
    tokens, positions = torch.tensor([3]), torch.tensor([0])
    with torch.no_grad():
        for model in models:
            kv = allocate_kv_cache(model, rows=1, slots=16)
            want = model.decode_step(tokens, positions, kv)
            got = compile_decode_step(model)(tokens, positions, kv)
            assert torch.allclose(got, want, atol=1e-5, rtol=0)
            assert compile_decode_step(model) is compile_decode_step(model)
    assert compile_decode_step(models[0]) is not compile_decode_step(models[1])


def test_a_sampled_draft_token_is_kept_with_its_probability_else_the_rest_is_sampled(monkeypatch):
    """Speculative sampling with a one-token draft distribution: draft token t is kept when the uniform draw is
    below p(t) (p: the request's own temperature, top-k and top-p), and on a rejection the token comes from p
    with t removed; after a kept draft the next token comes from p at the last position. Together that is
    sampling from p, whatever the draft (the standard rule). The draws are fixed here; the rule is checked."""
    from runner import ModelRunner, probabilities
    from scheduler import Request, Sequence

    torch.manual_seed(0)
    model = GPT(small_config(vocab_size=64)).eval()
    runner = ModelRunner(model, rows=1, max_len=16, step="eager")
    request = Request([1, 2], 8, temperature=0.7, top_k=20, top_p=0.9, seed=3)
    logits = torch.randn(3, 64)
    p = probabilities(logits, request)
    draft = [int(p[0].argmax()), int(p[1].argmin())]  # the second has probability 0 (outside top-k)
    draws, drawn_from = [], []
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(draws.pop(0)))
    monkeypatch.setattr(torch, "multinomial", lambda probs, n, generator=None: drawn_from.append(probs) or
                        torch.tensor([5]))
    draws[:] = [p[0, draft[0]].item() * 0.99, 0.5]  # keep the first, reject the second
    assert runner.accept(Sequence(request, 0), draft, logits) == [draft[0], 5]
    def without(probs: torch.Tensor, token: int) -> torch.Tensor:
        rest = probs.clone()
        rest[token] = 0
        return rest
    assert len(drawn_from) == 1 and torch.equal(drawn_from[0], without(p[1], draft[1]))
    draws[:] = [p[0, draft[0]].item() * 1.01]  # reject the first
    assert runner.accept(Sequence(request, 0), draft, logits) == [5]
    assert torch.equal(drawn_from[1], without(p[0], draft[0]))
    draws[:] = [0.0, 0.0]  # keep both (a draw of 0 is below any p(t) > 0): the second has p = 0, so it is not
    assert runner.accept(Sequence(request, 0), draft, logits) == [draft[0], 5] and drawn_from[2][draft[1]] == 0
    greedy = Sequence(Request([1, 2], 8), 0)
    best = logits.argmax(-1).tolist()
    assert runner.accept(greedy, [best[0], best[1]], logits) == best
    assert runner.accept(greedy, [best[0], best[1] + 1], logits) == best[:2]


def quantized_slots(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit cache's rule, written in torch: per slot of head_dim values, scale = max |x| / 127 and
    q = round(x / scale)."""
    scale = x.abs().amax(-1, keepdim=True) / 127
    return torch.where(scale > 0, torch.round(x / scale), 0), scale


def test_an_int8_kv_cache_stores_rounded_slots_and_attends_over_them(machine):
    """An 8-bit KV cache (fused step), with each instruction set's loops pinned in turn, on a ragged pass (prompt
    chunks beside decode tokens). Layer 0's slots hold K (after RoPE) and V rounded by the rule above (its inputs
    are the embeddings, so the same as fp32's to rounding), and the logits are the textbook forward's with K and V
    put through that rule (test_levers.reference_forward), far closer to it than to the exact forward."""
    from layers import kernel_isas
    from runner import ModelRunner
    from scheduler import Batch
    from tests.test_levers import reference_forward

    torch.manual_seed(0)
    model = GPT(small_config(vocab_size=128, d_model=64, n_layer=3, init_std=0.2, tie_embeddings=False)).eval()
    cfg = model.config
    prompts = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 7, 5)]
    first = Batch(chunks=[(0, 0, prompts[0]), (2, 0, prompts[2])], decode=[], sampled=[], span=3, length=5)
    second = Batch(chunks=[(1, 0, prompts[1])], decode=[(9, 3), (0, 0), (4, 5)], sampled=[0, 2], span=3, length=7)
    rows = [prompts[0] + [9], prompts[1], prompts[2] + [4]]  # each row's tokens after both passes

    def fake_quantized(x):
        q, scale = quantized_slots(x)
        return q * scale

    with torch.no_grad():
        exact = [reference_forward(model, torch.tensor([r]))[0] for r in rows]
        want = [reference_forward(model, torch.tensor([r]), kv=fake_quantized)[0] for r in rows]
        k0 = model.layers[0].self_attn.k_proj.weight
        for isa in [isa for isa in kernel_isas() if "vnni" not in isa and "int16" not in isa]:  # fp32 weights
            machine.pin(f"quant_kernel={isa}")
            runner = ModelRunner(model, rows=3, max_len=16, step="fused", kv_cache_dtype="int8")
            k_cache = runner.kv_cache[0][0]
            assert k_cache.dtype == torch.int8 and k_cache.shape == (3, cfg.n_kv_head, 16, cfg.head_dim + 4)
            runner.forward(first, [None] * 3)
            out = runner.forward(second, [None] * 3)
            got = {0: out.decode[0], 1: out.chunks[0], 2: out.decode[1]}
            for r, tokens in enumerate(rows):
                last = len(tokens) - 1
                assert (got[r] - want[r][last]).abs().max() <= 2e-3 * want[r][last].abs().max(), (isa, r)
                assert (got[r] - want[r][last]).abs().max() * 10 < (exact[r][last] - want[r][last]).abs().max()
                # layer 0's K: the embeddings through the norm, k_proj and RoPE, rounded
                h = model.layers[0].input_layernorm(model.embed_tokens.weight[tokens])
                k = (h @ k0.T).view(len(tokens), cfg.n_kv_head, cfg.head_dim).transpose(0, 1)
                k = apply_rope(k, model.rope_cos[:len(tokens)], model.rope_sin[:len(tokens)])
                q, scale = quantized_slots(k)
                slots = k_cache[r, :, :len(tokens)]
                assert torch.allclose(slots[..., -4:].contiguous().view(torch.float32), scale, rtol=1e-5, atol=0)
                assert (slots[..., :-4].float() - q).abs().max() <= 1  # a value on a .5 boundary may round apart
                assert (slots[..., :-4].float() == q).float().mean() > 0.99
