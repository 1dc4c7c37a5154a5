"""prefix_cache.py: reused KV blocks give the ids of a run without them, hold copies of what the rows computed,
and are evicted leaves first within the byte bound."""
import pytest
import torch

from config import get_config
from engine import Engine, Request
from model import GPT
from prefix_cache import BLOCK, PrefixCache, block_keys


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = get_config("tiny", vocab_size=512, n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=128,
                     max_seq_len=256, init_std=0.2, tie_embeddings=False)
    return GPT(cfg).eval()


def shared_prefix_prompts(n: int, prefix_len: int = 100) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    system = torch.randint(2, 512, (prefix_len,), generator=g).tolist()
    return [system + torch.randint(2, 512, (3 + 2 * i,), generator=g).tolist() for i in range(n)]


@pytest.mark.parametrize("step", ["eager", "fused", "compiled", "fused-int8"])
def test_reused_blocks_give_the_ids_of_a_run_without_them(model, step):
    """Six prompts behind one 100-token prefix, on 2 rows: greedy ids equal the run with the cache off. The
    first two start together and compute the prefix; the other four reuse its 6 full blocks (96 tokens) and
    compute only the rest, which the stats and the prefill count say. With an 8-bit KV cache too: a block's
    slots carry their scales."""
    prompts = shared_prefix_prompts(6)
    ids, engines = {}, {}
    step, _, kv_dtype = step.partition("-")
    for mb in (0, 64):
        engines[mb] = Engine(model, rows=2, max_len=160, step=step, prefix_cache_mb=mb,
                             kv_cache_dtype=kv_dtype or "auto")
        requests = [Request(p, 12) for p in prompts]
        for _ in engines[mb].run(requests):
            pass
        ids[mb] = [r.tokens for r in requests]
    assert ids[64] == ids[0]
    reused = 4 * (100 // BLOCK) * BLOCK
    stats = engines[64].summary()["prefix_cache"]
    assert stats["hit_tokens"] == reused and stats["miss_tokens"] == sum(map(len, prompts)) - reused
    assert engines[64].stats["prefill_tokens"] == engines[0].stats["prefill_tokens"] - reused
    assert engines[0].summary()["prefix_cache"] is None


def test_a_reused_row_holds_exact_copies_and_the_last_token_is_computed():
    """Copied blocks are bit for bit what the first row held; a prompt of exactly two blocks reuses only one,
    so that its last token is computed (its logits give the first new token)."""
    layers, heads, dim, slots = 3, 2, 4, 64
    kv = [(torch.randn(2, heads, slots, dim), torch.randn(2, heads, slots, dim)) for _ in range(layers)]
    prompt = list(range(100, 100 + 2 * BLOCK))
    cache = PrefixCache(1 << 20)
    assert cache.reuse(prompt, kv, row=0) == 0
    cache.keep(prompt, kv, row=0)
    assert cache.reuse(prompt, kv, row=1) == BLOCK
    for k, v in kv:
        assert torch.equal(k[1, :, :BLOCK], k[0, :, :BLOCK]) and torch.equal(v[1, :, :BLOCK], v[0, :, :BLOCK])
        assert not torch.equal(k[1, :, BLOCK:2 * BLOCK], k[0, :, BLOCK:2 * BLOCK])
    assert cache.reuse(prompt + [7], kv, row=1) == 2 * BLOCK
    assert cache.reuse([1] + prompt, kv, row=1) == 0  # a key stands for its whole prefix, not its block alone


def test_eviction_keeps_the_byte_bound_and_drops_longer_prefixes_first():
    """Room for 4 blocks; two prompts of 3 blocks each: the first prompt's last two blocks go, its first
    block stays (a prefix outlives what extends it), and the second prompt's three stay."""
    kv = [(torch.randn(1, 2, 64, 4), torch.randn(1, 2, 64, 4))]
    block_bytes = 2 * 2 * BLOCK * 4 * 4  # k and v, 2 heads, BLOCK slots, dim 4, fp32
    cache = PrefixCache(4 * block_bytes)
    first, second = list(range(3 * BLOCK)), list(range(1000, 1000 + 3 * BLOCK))
    cache.keep(first, kv, row=0)
    cache.keep(second, kv, row=0)
    assert cache.bytes == 4 * block_bytes and cache.summary()["evicted_blocks"] == 2
    assert list(cache.blocks) == [block_keys(first)[0], *block_keys(second)[::-1]]
    assert cache.reuse(first + [1], kv, row=0) == BLOCK
    assert cache.reuse(second + [1], kv, row=0) == 3 * BLOCK
