"""train.py: DDP over real gloo processes vs one process, accumulation, exact resume, schedule, checkpoints."""
import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from config import get_config
from model import GPT

ROOT = Path(__file__).resolve().parent.parent


def small_run(tok_path, out_dir, *extra):
    return ["--n-layer", "2", "--d-model", "64", "--n-head", "4", "--n-kv-head", "2", "--ffn-hidden", "128",
            "--vocab-size", "512", "--max-seq-len", "64", "--tokenizer", str(tok_path), "--dtype", "fp32",
            "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "1000", "--peak-flops", "1e12",
            "--out-dir", str(out_dir), "--run-name", "run", "--data-dir", str(ROOT / "data"), *extra]


def run_in_process(argv):
    train.main(argv)
    return load_checkpoint(Path(argv[argv.index("--out-dir") + 1]) / "run" / "last.ckpt")


def assert_same_run(a, b, atol=1e-6):
    assert a["step"] == b["step"]
    losses_a = [loss for _, loss in a["history"]["train"]]
    losses_b = [loss for _, loss in b["history"]["train"]]
    assert losses_a == pytest.approx(losses_b, abs=atol, rel=0)
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor, b["model"][name], atol=atol, rtol=0), name


def test_ddp_two_gloo_ranks_equal_one_process(tok_path, tmp_path):
    common = ["--max-steps", "3", "--micro-batch", "4", "--tokens-per-step", "512"]
    single = run_in_process(small_run(tok_path, tmp_path / "single", *common))  # 1 rank x 2 micro-steps
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", "29517",
           "train.py", *small_run(tok_path, tmp_path / "ddp", *common)]       # 2 ranks x 1 micro-step
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world 2 x micro-batch 4 x seq 64 x accum 1" in done.stdout
    ddp = load_checkpoint(tmp_path / "ddp" / "run" / "last.ckpt")
    assert_same_run(single, ddp, atol=2e-5)
    assert single["history"]["train"][-1][1] < single["history"]["train"][0][1]


def test_gradient_accumulation_equals_big_batch(tok_path, tmp_path):
    four_by_two = run_in_process(small_run(tok_path, tmp_path / "a", "--max-steps", "2", "--micro-batch", "2",
                                           "--tokens-per-step", "512"))
    one_by_eight = run_in_process(small_run(tok_path, tmp_path / "b", "--max-steps", "2", "--micro-batch", "8",
                                            "--tokens-per-step", "512"))
    assert_same_run(four_by_two, one_by_eight, atol=2e-5)


def test_resume_is_exact(tok_path, tmp_path):
    common = ["--max-steps", "6", "--micro-batch", "4", "--tokens-per-step", "256", "--save-every", "100"]
    straight = run_in_process(small_run(tok_path, tmp_path / "straight", *common))
    stopped = run_in_process(small_run(tok_path, tmp_path / "split", *common, "--stop-at", "3"))
    assert stopped["step"] == 3
    resumed = run_in_process(small_run(tok_path, tmp_path / "split", "--resume"))
    assert_same_run(straight, resumed, atol=0)
    # One flag trains further from a finished run, at the final (minimum) learning rate.
    more = run_in_process(small_run(tok_path, tmp_path / "split", "--resume", "--more-steps", "2"))
    assert more["step"] == 8 and more["train_args"]["decay_steps"] == 6


def test_lr_schedule_values():
    args = argparse.Namespace(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110)
    assert train.lr_at(0, args) == pytest.approx(1e-4)
    assert train.lr_at(9, args) == pytest.approx(1e-3)
    assert train.lr_at(60, args) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert train.lr_at(110, args) == pytest.approx(1e-4)
    assert train.lr_at(500, args) == pytest.approx(1e-4)
    assert all(train.lr_at(s, args) >= train.lr_at(s + 1, args) for s in range(10, 120))


def test_weight_decay_groups():
    model = GPT(get_config("tiny", n_layer=2))
    opt = train.make_optimizer(model, argparse.Namespace(lr=1e-3, weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "embed_tokens.weight" in names and "layers.1.mlp.down_proj.weight" in names
    assert not any("norm" in n for n in names)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_atomic_checkpoint_survives_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "config": {}, "step": 1})
    good = path.read_bytes()

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(CheckpointError, match="No space left on device.*previous last.ckpt, if any, is intact"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "config": {}, "step": 2})
    assert path.read_bytes() == good and list(tmp_path.iterdir()) == [path]
    assert load_checkpoint(path)["step"] == 1


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, {"model": {"w": torch.ones(1000)}, "config": {}, "step": 1})
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_flops_per_token_counts_head_once():
    cfg = get_config("tiny")
    n = GPT(cfg).num_params()
    assert train.flops_per_token(cfg, 256, n) == 6 * n + 12 * cfg.n_layer * cfg.d_model * 256
    assert math.isfinite(train.measure_peak_flops(torch.device("cpu"), torch.float32))
