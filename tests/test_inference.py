"""inference.py: batching, KV cache, worker processes, output order and sampling against their plain twins."""
import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import inference
from checkpoint import load_model, save_checkpoint
from config import get_config
from engine import generate
from model import GPT
from runner import sample_next
from tests.test_bad_input import assert_one_error_line

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt_dir(small_tokenizer, tmp_path_factory):
    """A random model whose greedy text varies (untied head) with margins far above float rounding."""
    torch.manual_seed(0)
    cfg = get_config("tiny", vocab_size=512, n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=128,
                     max_seq_len=96, init_std=0.2, tie_embeddings=False)
    path = tmp_path_factory.mktemp("ckpt") / "run"
    save_checkpoint(path / "last.ckpt", {"model": GPT(cfg).state_dict(), "config": cfg.to_dict(),
                                         "tokenizer": small_tokenizer.to_str()})
    return path


@pytest.fixture(scope="module")
def loaded(ckpt_dir):
    return load_model(str(ckpt_dir), "cpu", "fp32")


def gen_args(**kw):
    base = dict(max_new_tokens=24, temperature=0.0, top_k=None, top_p=1.0, batch_size=8, ignore_eos=True,
                no_kv_cache=False, step="auto", seed=0, num_procs=1, device="cpu", dtype="fp32",
                checkpoint=None, batching="continuous", stop=[], quantize=None, machine="", speculate="none",
                draft_tokens=5, prefix_cache_mb=0, kv_cache_dtype="auto")
    return argparse.Namespace(**{**base, **kw})


PROMPTS = ["To be, or not to be", "O", "Friends, Romans, countrymen, lend me your ears;",
           "Now is the winter of our discontent", "All the world's a stage, and all the men"]


def test_ragged_batch_equals_one_by_one(loaded):
    model, tok = loaded
    prompts = [tok.encode(p) for p in PROMPTS]
    batched, _ = inference.generate_all(model, tok, prompts, gen_args(batch_size=8))
    alone = [inference.generate_all(model, tok, [p], gen_args(batch_size=1))[0][0] for p in prompts]
    assert batched == alone
    assert all(len(row) == 24 for row in batched) and len({tuple(r) for r in batched}) == 5


def test_kv_cache_equals_no_cache(loaded):
    model, tok = loaded
    prompts = [tok.encode(p) for p in PROMPTS]
    cached, _ = inference.generate_all(model, tok, prompts, gen_args())
    uncached, _ = inference.generate_all(model, tok, prompts, gen_args(no_kv_cache=True))
    assert cached == uncached


def test_more_prompts_than_rows_come_back_in_order(loaded):
    model, tok = loaded
    prompts = [tok.encode(p) for p in PROMPTS * 3]
    few_rows, report = inference.generate_all(model, tok, prompts, gen_args(batch_size=4, max_new_tokens=6))
    many_rows, _ = inference.generate_all(model, tok, prompts, gen_args(batch_size=64, max_new_tokens=6))
    assert few_rows == many_rows and report["new_tokens"] == 15 * 6
    assert few_rows[0] == few_rows[5] == few_rows[10]


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_two_workers_on_one_queue_equal_one_process(ckpt_dir, loaded, temperature):
    """Prompt i samples with seed + i wherever it runs, so even sampled text does not depend on the worker."""
    model, tok = loaded
    prompts = [tok.encode(p) for p in PROMPTS * 3]
    args = gen_args(checkpoint=str(ckpt_dir), batch_size=2, temperature=temperature, top_k=50)
    single, _ = inference.generate_all(model, tok, prompts, args)
    got = []
    report = inference.run_workers(argparse.Namespace(**{**vars(args), "num_procs": 2}), prompts,
                                   lambda i, r: got.append((i, r.tokens)))
    assert [i for i, _ in got] == list(range(15)) and [t for _, t in got] == single
    assert report["num_procs"] == 2 and len(report["workers"]) == 2
    assert sum(w["prompts"] for w in report["workers"]) == 15 and all(w["prompts"] > 0 for w in report["workers"])


def test_parent_does_not_load_the_model_when_workers_do(ckpt_dir, monkeypatch, capsys):
    """The spawned workers import inference afresh; only the parent's load_model is patched to refuse."""
    def refuse(*args):
        raise AssertionError("the parent loaded the model")
    monkeypatch.setattr(inference, "load_model", refuse)
    inference.main(["--checkpoint", str(ckpt_dir), "--num-procs", "2", "--temperature", "0", "--max-new-tokens",
                    "8", "--prompt", "To be", "--prompt", "O Romeo", "--prompt", "Now"])
    out = capsys.readouterr().out
    assert out.count("--- ") == 3 and out.count("worker: ") == 2 and "2 proc" in out


def test_top_k_1_is_greedy(loaded):
    model, tok = loaded
    prompts = [tok.encode(p) for p in PROMPTS]
    greedy, _ = inference.generate_all(model, tok, prompts, gen_args())
    top1, _ = inference.generate_all(model, tok, prompts, gen_args(temperature=1.3, top_k=1, seed=5))
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
    a, _ = inference.generate_all(model, tok, prompts, gen_args(temperature=1.0, top_k=50, top_p=0.9, seed=3))
    b, _ = inference.generate_all(model, tok, prompts, gen_args(temperature=1.0, top_k=50, top_p=0.9, seed=3))
    c, _ = inference.generate_all(model, tok, prompts, gen_args(temperature=1.0, top_k=50, top_p=0.9, seed=4))
    assert a == b and a != c


def test_row_stops_at_eos_without_garbage(loaded):
    model, tok = loaded
    prompts = [tok.encode(p) for p in PROMPTS]
    free, _ = generate(model, prompts, 24)
    eos = free[0][3]
    stopped, stats = generate(model, prompts, 24, eos_id=eos)
    for row_free, row in zip(free, stopped):
        assert row == row_free[:row_free.index(eos) if eos in row_free else len(row_free)]
    assert len(stopped[0]) == free[0].index(eos) <= 3
    assert stats["new_tokens"] == sum(len(r) for r in stopped)


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "inference.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_outputs_and_stats(ckpt_dir, loaded, tmp_path):
    model, tok = loaded
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    done = cli("--checkpoint", str(ckpt_dir), "--prompt", "To be", "--prompt", "O Romeo", "--temperature", "0",
               "--max-new-tokens", "8", "--ignore-eos", "--output", str(out), "--stats-json", str(stats))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["To be", "O Romeo"]
    want, _ = generate(model, [tok.encode("To be"), tok.encode("O Romeo")], 8)
    assert [r["completion_ids"] for r in rows] == want
    assert [r["completion"] for r in rows] == [tok.decode(w) for w in want]
    report = json.loads(stats.read_text())
    assert report["new_tokens"] == 16 and report["prompts"] == 2 and report["num_procs"] == 1
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "generated_tokens_per_s", "wall_s"):
        assert report[key] > 0, key
    assert report["generated_tokens_per_s"] == pytest.approx(report["new_tokens"] / report["wall_s"], rel=1e-9)
    assert report["prefill_tokens"] == len(tok.encode("To be")) + len(tok.encode("O Romeo"))
    assert f"= {report['generated_tokens_per_s']:,.1f} tok/s" in done.stdout


def test_cli_jsonl_prompts_stop_strings_and_markdown(ckpt_dir, tmp_path):
    """Prompts from a JSONL file; a --stop string cuts each completion where the free text has it (finish
    "stop"), and the .md output holds each prompt with its completion, in input order."""
    texts = ["To be, or not to be", "O Romeo", "Now is the winter"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    common = ["--checkpoint", str(ckpt_dir), "--prompts-file", str(prompts), "--temperature", "0",
              "--max-new-tokens", "16", "--device", "cpu"]
    inference.main([*common, "--output", str(tmp_path / "free.jsonl")])
    free = [json.loads(line) for line in (tmp_path / "free.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in free] == texts
    start = next(i for i in range(3, len(free[0]["completion"]) - 1) if free[0]["completion"][i:i + 2].isalpha())
    stop = free[0]["completion"][start:start + 2]
    inference.main([*common, "--stop", stop, "--output", str(tmp_path / "stopped.jsonl")])
    stopped = [json.loads(line) for line in (tmp_path / "stopped.jsonl").read_text().splitlines()]
    for row, whole in zip(stopped, free, strict=True):
        cut = whole["completion"].find(stop)
        assert row["completion"] == (whole["completion"] if cut < 0 else whole["completion"][:cut])
        assert row["finish_reason"] == ("stop" if cut >= 0 else whole["finish_reason"])
    assert stopped[0]["finish_reason"] == "stop" and stop not in stopped[0]["completion"]
    inference.main([*common, "--stop", stop, "--output", str(tmp_path / "stopped.md")])
    assert (tmp_path / "stopped.md").read_text() == "".join(
        f"### {t}\n\n```\n{t}{row['completion']}\n```\n\n" for t, row in zip(texts, stopped))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_generation_is_the_same_on_every_step(ckpt_dir, tmp_path, machine, mode):
    """inference.py --quantize MODE: the greedy ids of the compiled and the fused step equal the eager pass's,
    on 2 rows (below the dense-GEMM crossover, pinned at 4: the int kernels run) and on 8 (above it: the GEMM
    on the dequantized weights). The int16 kernels are pinned off: they round activations, the others do not."""
    prompts = [arg for text in PROMPTS + ["Is this a dagger", "We few, we happy few", "Double, double"]
               for arg in ("--prompt", text)]
    for rows in (2, 8):
        ids = {}
        for step in ("eager", "fused", "compiled"):
            out = tmp_path / f"{step}-{rows}.jsonl"
            inference.main(["--checkpoint", str(ckpt_dir), *prompts, "--quantize", mode, "--step", step,
                            "--batch-size", str(rows), "--machine", "dense_min_rows=4,int16_rows=0",
                            "--temperature", "0", "--ignore-eos", "--max-new-tokens", "12", "--device", "cpu",
                            "--output", str(out), "--stats-json", str(tmp_path / "stats.json")])
            assert json.loads((tmp_path / "stats.json").read_text())["step"] == step
            ids[step] = [json.loads(line)["completion_ids"] for line in out.read_text().splitlines()]
        assert ids["compiled"] == ids["eager"] == ids["fused"], rows
        assert len(ids["eager"]) == 8 and all(len(row) == 12 for row in ids["eager"])


def test_bf16_generation_through_the_cli(ckpt_dir, loaded, tmp_path):
    """inference.py --dtype bf16 runs bf16 weights (its report says so) and writes the greedy ids of the bf16
    model generated in this process; that model's logits are within bf16 rounding of fp32's, and not equal."""
    out, stats = tmp_path / "bf16.jsonl", tmp_path / "stats.json"
    inference.main(["--checkpoint", str(ckpt_dir), *[arg for p in PROMPTS for arg in ("--prompt", p)],
                    "--dtype", "bf16", "--temperature", "0", "--ignore-eos", "--max-new-tokens", "12",
                    "--device", "cpu", "--output", str(out), "--stats-json", str(stats)])
    assert json.loads(stats.read_text())["weights"] == "bfloat16"
    model, tok = load_model(str(ckpt_dir), "cpu", "bf16")
    prompts = [tok.encode(p) for p in PROMPTS]
    want, _ = generate(model, prompts, 12, batch_size=16)
    assert [json.loads(line)["completion_ids"] for line in out.read_text().splitlines()] == want
    x = torch.tensor([prompts[0]])
    with torch.no_grad():
        bf16, fp32 = model(x)[0].float(), loaded[0](x)[0]
    assert 0 < (bf16 - fp32).abs().max() <= 0.05 * fp32.abs().max()


def test_killed_run_keeps_what_it_wrote(ckpt_dir, tmp_path):
    """Results are written in input order as they finish: after a SIGKILL every complete line is the line an
    uninterrupted run writes there."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"{PROMPTS[i % 5]} {i}" for i in range(400)))
    common = ["--checkpoint", str(ckpt_dir), "--prompts-file", str(prompts), "--temperature", "0",
              "--max-new-tokens", "24", "--ignore-eos", "--batch-size", "4"]
    whole = cli(*common, "--output", str(tmp_path / "whole.jsonl"), timeout=600)
    assert whole.returncode == 0, whole.stderr
    expected = (tmp_path / "whole.jsonl").read_text().split("\n")
    partial = tmp_path / "partial.jsonl"
    proc = subprocess.Popen([sys.executable, "inference.py", *common, "--output", str(partial)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not partial.exists() or partial.read_text().count("\n") < 5):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    lines = partial.read_text().split("\n")[:-1]  # what follows the last newline may be cut short
    assert proc.returncode == -signal.SIGKILL and 5 <= len(lines) < 400
    assert lines == expected[:len(lines)]


def test_cli_bad_input_one_line(ckpt_dir):
    cases = [(("--checkpoint", "nope/"), 1, "checkpoint not found"),
             (("--checkpoint", str(ckpt_dir), "--prompt", "", "--max-new-tokens", "8"), 1, "prompt 1 is empty"),
             (("--checkpoint", str(ckpt_dir), "--max-new-tokens", "0"), 2, "--max-new-tokens must be at least 1"),
             (("--checkpoint", str(ckpt_dir), "--max-new-tokens", "96"), 1, "leave no room"),
             (("--checkpoint", str(ckpt_dir), "--top-p", "1.5"), 2, "--top-p must be in (0, 1]")]
    for args, code, message in cases:
        done = cli(*args)
        assert done.returncode == code, (args, done.stderr)
        assert_one_error_line(done.stderr, message)
    long = ("--checkpoint", str(ckpt_dir), "--prompt", "to be or not " * 60, "--max-new-tokens", "16")
    refused = cli(*long)
    assert refused.returncode == 1 and "pass --truncate" in refused.stderr
    truncated = cli(*long, "--truncate")
    assert truncated.returncode == 0 and "keeping the last 80" in truncated.stderr


def test_default_new_tokens_fit_a_short_context(ckpt_dir, loaded, tmp_path):
    """Without --max-new-tokens a row gets 128 new tokens, or half the context where that is shorter (this
    model's context is 96 tokens; tiny's is 128), so the default never overflows the window."""
    model, _ = loaded
    stats = tmp_path / "stats.json"
    done = cli("--checkpoint", str(ckpt_dir), "--prompt", "To be", "--ignore-eos", "--stats-json", str(stats))
    assert done.returncode == 0, done.stderr
    assert json.loads(stats.read_text())["new_tokens"] == model.config.max_seq_len // 2 == 48
