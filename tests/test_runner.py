"""runner.py: the compiled decode step against the eager one on the same cache, and one compiled step per model."""
import pytest
import torch

from model import GPT
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
