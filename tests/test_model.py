"""model.py against independent references: closed forms, slow attention, torch's MHA, full vs cached forward."""
import math

import pytest
import torch
import torch.nn.functional as F

from config import get_config
from model import GPT, apply_rope, rope_tables
from runner import allocate_kv_cache, prefill_part


def small_config(**kw):
    base = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=48, max_seq_len=64,
                tie_embeddings=True)
    base.update(kw)
    return get_config("tiny", **base)


def hand_count(cfg) -> int:
    """Parameters by hand: per layer q, k, v, o, gate, up, down and two RMSNorm gains; the embedding (counted
    once when tied to the head), and the final norm."""
    head = cfg.d_model // cfg.n_head
    attention = 2 * cfg.d_model * cfg.n_head * head + 2 * cfg.d_model * cfg.n_kv_head * head
    layer = attention + 3 * cfg.d_model * cfg.ffn_hidden + 2 * cfg.d_model
    embeddings = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return cfg.n_layer * layer + embeddings + cfg.d_model


@pytest.mark.parametrize("preset,readme", [("tiny", 5_048_576), ("slm-40m", 39_987_840),
                                           ("smollm2-135m", 134_515_008)])
def test_param_counts(preset, readme):
    """The README's figures, from a hand formula and from the model."""
    cfg = get_config(preset)
    assert GPT(cfg).num_params() == hand_count(cfg) == readme


def test_untied_has_separate_head():
    tied = GPT(small_config()).num_params()
    untied = GPT(small_config(tie_embeddings=False)).num_params()
    assert untied - tied == 97 * 32


def test_init_scales():
    torch.manual_seed(0)
    cfg = get_config("tiny", n_layer=8)
    m = GPT(cfg)
    assert m.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
    assert m.layers[3].mlp.down_proj.weight.std().item() == pytest.approx(resid_std, rel=0.05)
    assert m.layers[3].self_attn.o_proj.weight.std().item() == pytest.approx(resid_std, rel=0.05)
    assert torch.equal(m.norm.weight, torch.ones(cfg.d_model))


def test_causality():
    torch.manual_seed(0)
    m = GPT(small_config()).eval()
    x = torch.randint(0, 97, (2, 20))
    t = 11
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % 97
    with torch.no_grad():
        lx, _ = m(x)
        ly, _ = m(y)
    assert torch.equal(lx[:, :t], ly[:, :t])
    assert not torch.allclose(lx[:, t:], ly[:, t:])  # the change does reach later positions


def prefill(m: GPT, kv_cache, chunks: list[list[int]], rows: list[int], starts: list[int]) -> torch.Tensor:
    """Prompt chunks into cache rows through GPT.step, as the runner builds them: the logits after each chunk."""
    ids, positions, parts, ends = prefill_part(list(zip(rows, starts, chunks)), torch.device("cpu"))
    return m.step(ids, positions, parts, kv_cache, ends)


LEVERS = dict(qk_norm=True, value_residual=True, logit_softcap=3.0, mlp="relu2", unet_skips=True, n_layer=5)


@pytest.mark.parametrize("config", [dict(n_kv_head=4), dict(n_kv_head=2), dict(n_kv_head=1), LEVERS],
                         ids=["mha", "gqa", "mqa", "levers"])
def test_prefill_and_decode_steps_match_full_forward_on_ragged_rows(config):
    """Rows of different lengths at different positions: chunked prefill (one prompt in two chunks, the
    others in one batch) and then decode_step over all rows at once give each row's full-forward logits.
    Also with the config levers on (value residuals and U-net skips pass state between layers)."""
    torch.manual_seed(0)
    m = GPT(small_config(**config)).eval()  # the default init: no margins built in
    lengths, n_decode = [5, 13, 1], 7
    rows = [torch.randint(0, 97, (n + n_decode,)) for n in lengths]
    with torch.no_grad():
        reference = [m(r[None])[0][0] for r in rows]  # (len, vocab) per row
        kv = allocate_kv_cache(m, rows=4, slots=32)  # one more row than used: it must not disturb the others
        first = prefill(m, kv, [rows[1][:6].tolist()], [2], [0])
        assert torch.allclose(first[0], reference[1][5], atol=1e-5, rtol=0)
        logits = prefill(m, kv, [rows[0][:5].tolist(), rows[1][6:13].tolist(), rows[2][:1].tolist()], [0, 2, 3],
                         [0, 6, 0])
        for b, i in enumerate([0, 1, 2]):
            assert torch.allclose(logits[b], reference[i][lengths[i] - 1], atol=1e-5, rtol=0)
        cache_rows = [0, 2, 3]  # row i of the batch lives in cache row cache_rows[i]; cache row 1 is idle
        for step in range(n_decode):
            tokens, positions = torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
            for i, row in enumerate(cache_rows):
                tokens[row], positions[row] = rows[i][lengths[i] + step], lengths[i] + step
            logits = m.decode_step(tokens, positions, kv)
            for i, row in enumerate(cache_rows):
                assert torch.allclose(logits[row], reference[i][lengths[i] + step], atol=1e-5, rtol=0), (step, i)


def test_decode_step_writes_each_row_in_place_at_its_slot():
    m = GPT(small_config()).eval()
    kv = allocate_kv_cache(m, rows=2, slots=16)
    ptr = kv[1][0].data_ptr()
    with torch.no_grad():
        prefill(m, kv, [[1, 2, 3], [4]], [0, 1], [0, 0])
        m.decode_step(torch.tensor([5, 6]), torch.tensor([3, 1]), kv)
    cache = kv[1][0]  # layer 1's keys
    assert cache.data_ptr() == ptr and cache.shape == (2, 2, 16, 8)
    assert cache[0, :, :4].abs().sum() > 0 and cache[0, :, 4:].abs().sum() == 0
    assert cache[1, :, :2].abs().sum() > 0 and cache[1, :, 2:].abs().sum() == 0


def slow_attention(x, attn, cos, sin):
    """Textbook causal attention, K/V repeated once per query head in their group."""
    B, T, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(B, T, attn.n_head, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, attn.n_kv_head, hd).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, attn.n_kv_head, hd).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    group = attn.n_head // attn.n_kv_head
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_gqa_matches_slow_reference(n_kv_head):
    torch.manual_seed(0)
    m = GPT(small_config(n_kv_head=n_kv_head))
    attn = m.layers[0].self_attn
    x = torch.randn(2, 10, 32)
    cos, sin = m.rope_cos[:10], m.rope_sin[:10]
    with torch.no_grad():
        ours, _ = attn(x, cos, sin, None, None)
        ref = slow_attention(x, attn, cos, sin)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_mha_equals_torch_multihead_attention():
    """With n_kv_head == n_head and RoPE switched off (cos=1, sin=0) we are torch's nn.MultiheadAttention."""
    torch.manual_seed(0)
    m = GPT(small_config(n_kv_head=4))
    attn = m.layers[0].self_attn
    mha = torch.nn.MultiheadAttention(32, 4, bias=False, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        mha.out_proj.weight.copy_(attn.o_proj.weight)
        x = torch.randn(2, 10, 32)
        ours, _ = attn(x, torch.ones(10, 8), torch.zeros(10, 8), None, None)
        causal = torch.triu(torch.ones(10, 10, dtype=torch.bool), 1)
        ref, _ = mha(x, x, x, attn_mask=causal, need_weights=False)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_rope_relative_and_complex_reference():
    torch.manual_seed(0)
    hd, theta = 16, 10000.0
    cos, sin = rope_tables(hd, 128, theta)
    q, k = torch.randn(hd), torch.randn(hd)
    # q.k depends only on the offset between positions.
    def score(m, n):
        return apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n])
    assert score(10, 3).item() == pytest.approx(score(57, 50).item(), abs=1e-4)
    assert score(10, 3).item() != pytest.approx(score(10, 4).item(), abs=1e-3)
    # Complex reference: dims i and i+hd/2 form one complex number, rotated by pos * theta^(-2i/hd).
    pos = 37
    half = hd // 2
    z = torch.complex(q[:half].double(), q[half:].double())
    freqs = pos * theta ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
    rotated = z * torch.polar(torch.ones(half, dtype=torch.float64), freqs)
    ref = torch.cat([rotated.real, rotated.imag]).float()
    assert torch.allclose(apply_rope(q, cos[pos], sin[pos]), ref, atol=1e-5)


def test_last_only_logits_and_loss_ignore_index():
    torch.manual_seed(0)
    m = GPT(small_config()).eval()
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full, _ = m(x)
        last, _ = m(x, last_only=True)
        assert last.shape == (2, 1, 97) and torch.allclose(last[:, 0], full[:, -1], atol=1e-6)
        targets = torch.randint(0, 97, (2, 12))
        targets[:, :5] = -100
        _, loss = m(x, targets)
        ref = F.cross_entropy(full[:, 5:].reshape(-1, 97), targets[:, 5:].reshape(-1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_training_smoke_one_repeated_batch():
    """A tiny model memorises one batch: the loss falls well below ln(vocab)."""
    torch.manual_seed(0)
    cfg = small_config(vocab_size=256, d_model=64, ffn_hidden=128, n_head=4, n_kv_head=2)
    m = GPT(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    batch = torch.randint(0, 256, (4, 33))
    for _ in range(40):
        _, loss = m(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * math.log(256), loss.item()


def test_overlong_sequence_is_a_clear_error():
    m = GPT(small_config(max_seq_len=8))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        m(torch.zeros(1, 9, dtype=torch.long))
