"""inference.py: batching, KV cache, worker processes and sampling against their plain counterparts."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import inference
import model as model_py
from checkpoint import save_checkpoint
from config import get_config
from model import GPT, generate, sample_next

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt_dir(small_tokenizer, tmp_path_factory):
    """A random model with peaked logits (init_std 0.1), so greedy choices have clear margins."""
    torch.manual_seed(0)
    cfg = get_config("tiny", vocab_size=512, n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=128,
                     max_seq_len=96, init_std=0.1)
    path = tmp_path_factory.mktemp("ckpt") / "run"
    save_checkpoint(path / "last.ckpt", {"model": GPT(cfg).state_dict(), "config": cfg.to_dict(),
                                         "tokenizer": small_tokenizer.to_str()})
    return path


@pytest.fixture(scope="module")
def loaded(ckpt_dir):
    return inference.load_model(str(ckpt_dir), "cpu", "fp32")


def gen_args(**kw):
    base = dict(max_new_tokens=24, temperature=0.0, top_k=None, top_p=1.0, batch_size=8, ignore_eos=True,
                no_kv_cache=False, compile=False, seed=0, num_procs=1, device="cpu", dtype="fp32",
                checkpoint=None)
    return argparse.Namespace(**{**base, **kw})


PROMPTS = ["To be, or not to be", "O", "Friends, Romans, countrymen, lend me your ears;",
           "Now is the winter of our discontent", "All the world's a stage, and all the men"]


def test_ragged_batch_equals_one_by_one(loaded):
    model, tok = loaded
    prompts = [tok.encode(p) for p in PROMPTS]
    batched, _ = inference.generate_all(model, tok, prompts, gen_args(batch_size=8))
    alone = [inference.generate_all(model, tok, [p], gen_args(batch_size=1))[0][0] for p in prompts]
    assert batched == alone
    assert all(len(row) == 24 for row in batched)


def test_kv_cache_equals_no_cache(loaded):
    model, tok = loaded
    prompts = [tok.encode(p) for p in PROMPTS]
    cached, _ = inference.generate_all(model, tok, prompts, gen_args())
    uncached, _ = inference.generate_all(model, tok, prompts, gen_args(no_kv_cache=True))
    assert cached == uncached


def test_long_prompt_lists_split_into_batches_in_order(loaded):
    model, tok = loaded
    prompts = [tok.encode(p) for p in PROMPTS * 3]
    small_batches, report = inference.generate_all(model, tok, prompts, gen_args(batch_size=4, max_new_tokens=6))
    one_batch, _ = inference.generate_all(model, tok, prompts, gen_args(batch_size=64, max_new_tokens=6))
    assert small_batches == one_batch and report["new_tokens"] == 15 * 6
    assert small_batches[0] == small_batches[5] == small_batches[10]


def test_worker_processes_equal_one_process(ckpt_dir, loaded):
    model, tok = loaded
    prompts = [tok.encode(p) for p in PROMPTS]
    single, _ = inference.run(gen_args(checkpoint=str(ckpt_dir)), prompts, model, tok)
    multi, report = inference.run_workers(gen_args(checkpoint=str(ckpt_dir), num_procs=2, batch_size=2), prompts)
    assert multi == single
    assert report["num_procs"] == 2 and len(report["workers"]) == 2
    assert sum(w["prompts"] for w in report["workers"]) == 5


def test_top_k_1_is_greedy(loaded):
    model, tok = loaded
    prompts = [tok.encode(p) for p in PROMPTS]
    greedy, _ = inference.generate_all(model, tok, prompts, gen_args())
    top1, _ = inference.generate_all(model, tok, prompts, gen_args(temperature=1.3, top_k=1),
                                     torch.Generator().manual_seed(5))
    assert top1 == greedy


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()[None].repeat(4000, 1)
    for p, expected in [(0.5, {1}), (0.75, {1, 3}), (0.85, {1, 2, 3}), (0.96, {0, 1, 2, 3})]:
        draws = sample_next(logits, temperature=1.0, top_p=p, generator=torch.Generator().manual_seed(0))
        assert set(draws.tolist()) == expected, p
    # Renormalised inside the kept set: 0.5 / 0.8 of draws are token 1 for p = 0.75.
    draws = sample_next(logits, temperature=1.0, top_p=0.75, generator=torch.Generator().manual_seed(1))
    assert (draws == 1).float().mean().item() == pytest.approx(0.625, abs=0.03)


def test_fixed_seed_reproduces_sampling(loaded):
    model, tok = loaded
    prompts = [tok.encode(p) for p in PROMPTS]
    args = gen_args(temperature=1.0, top_k=50, top_p=0.9)
    a, _ = inference.generate_all(model, tok, prompts, args, torch.Generator().manual_seed(3))
    b, _ = inference.generate_all(model, tok, prompts, args, torch.Generator().manual_seed(3))
    c, _ = inference.generate_all(model, tok, prompts, args, torch.Generator().manual_seed(4))
    assert a == b and a != c


def test_row_stops_at_eos_without_garbage(loaded):
    model, tok = loaded
    prompts = [tok.encode(p) for p in PROMPTS]
    free, _ = generate(model, prompts, 24)
    eos = free[0][3]
    stopped, stats = generate(model, prompts, 24, eos_id=eos)
    for row_free, row in zip(free, stopped):
        cut = row_free.index(eos) if eos in row_free else len(row_free)
        assert row == row_free[:cut]
    assert len(stopped[0]) == free[0].index(eos) <= 3
    assert stats["new_tokens"] == sum(len(r) for r in stopped)


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "inference.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_outputs_and_stats(ckpt_dir, tmp_path):
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    done = cli("--checkpoint", str(ckpt_dir), "--prompt", "To be", "--prompt", "O Romeo", "--temperature", "0",
               "--max-new-tokens", "8", "--ignore-eos", "--output", str(out), "--stats-json", str(stats))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["To be", "O Romeo"] and all(len(r["completion_ids"]) == 8 for r in rows)
    report = json.loads(stats.read_text())
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "generated_tokens_per_s", "wall_s", "batch_size",
                "new_tokens", "num_procs"):
        assert key in report
    assert report["new_tokens"] == 16 and "tok/s" in done.stdout


def test_cli_bad_input_one_line(ckpt_dir):
    cases = [(("--checkpoint", "nope/"), 1, "checkpoint not found"),
             (("--checkpoint", str(ckpt_dir), "--prompt", "", "--max-new-tokens", "8"), 1, "prompt 1 is empty"),
             (("--checkpoint", str(ckpt_dir), "--max-new-tokens", "0"), 2, "--max-new-tokens must be at least 1"),
             (("--checkpoint", str(ckpt_dir), "--max-new-tokens", "96"), 1, "leaves no room"),
             (("--checkpoint", str(ckpt_dir), "--top-p", "1.5"), 2, "--top-p must be in (0, 1]")]
    for args, code, message in cases:
        done = cli(*args)
        assert done.returncode == code, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    long = ("--checkpoint", str(ckpt_dir), "--prompt", "to be or not " * 60, "--max-new-tokens", "16")
    refused = cli(*long)
    assert refused.returncode == 1 and "pass --truncate" in refused.stderr
    truncated = cli(*long, "--truncate")
    assert truncated.returncode == 0 and "keeping the last 80" in truncated.stderr


def test_compiled_decode_step_gives_the_same_tokens(loaded):
    """The fast path (torch.compile of the static decode step) against the plain path, on a ragged batch."""
    model, tok = loaded
    prompts = [tok.encode(p) for p in PROMPTS]
    plain, _ = generate(model, prompts, 16)
    fast, _ = generate(model, prompts, 16, compile=True)
    assert fast == plain
    again, _ = generate(model, prompts[:2], 16, compile=True)  # other shapes: recompiles, still right
    assert again == [generate(model, [p], 16)[0][0] for p in prompts[:2]]


def test_compiled_decode_step_bf16_gives_the_same_tokens(ckpt_dir, monkeypatch):
    """bf16 weights, frozen oneDNN step vs eager. The kernels differ, so bf16 rounding can part the two at a
    near-tie (on SmolLM2 at token 12-40, see the README); this small model has margins wide enough for 16."""
    model, tok = inference.load_model(str(ckpt_dir), "cpu", "bf16")
    prompts = [tok.encode(p) for p in PROMPTS]
    plain, _ = generate(model, prompts, 16)
    fast, _ = generate(model, prompts, 16, compile=True)
    assert fast == plain
    # 32 rows: the compiled step runs its GEMMs in fp32 on CPUs with slow bf16 ones (model.Linear), eager not
    monkeypatch.setattr(model_py, "BF16_GEMMS_IN_FP32", True)
    wide = prompts * (32 // len(prompts) + 1)
    assert generate(model, wide, 16, compile=True)[0] == generate(model, wide, 16)[0]
