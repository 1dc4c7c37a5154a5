"""Past one machine, on torchrun's own machinery: FSDP2 training with sharded checkpoints (DCP) that resume on
another number of ranks, and generation that shares one queue across "nodes" through the store."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convert
import train
from checkpoint import load_checkpoint, save_checkpoint
from config import get_config
from model import GPT
from tests.test_train import (
    assert_same_optimizer_state,
    assert_same_run,
    free_port,
    run_in_process,
    small_run,
    torchrun,
)

ROOT = Path(__file__).resolve().parent.parent


def test_fsdp_equals_one_process_and_resumes_on_another_number_of_ranks(tok_path, tmp_path):
    """tiny's optimizer (Muon on DTensor shards for the hidden matrices, AdamW for the rest): 6 steps in one
    plain process (which 2 DDP ranks equal, test_train.py) against FSDP2 runs that stop at step 3 and go on
    with another number of ranks (2 -> 1 and 1 -> 2): the global batch does not depend on the ranks, so the
    losses, the weights and the optimizer state agree to float rounding (the all-reduce's summation order;
    Newton-Schulz is pinned to fp32). The sharded checkpoint holds each rank's shards, and convert.py turns it
    into the one file, which a plain run resumes."""
    common = ["--max-steps", "6", "--micro-batch", "2", "--tokens-per-step", "512", "--optimizer", "muon"]
    single = run_in_process(small_run(tok_path, tmp_path / "single", *common))
    for first, then in ((2, 1), (1, 2)):  # one rank: plain `python train.py --fsdp`, a process group of one
        out = tmp_path / f"fsdp{first}{then}"
        launch(first, small_run(tok_path, out, *common, "--fsdp", "--stop-at", "3"))
        link = out / "run" / "last.dcp"
        assert link.is_symlink() and not (out / "run" / "last.ckpt").exists()
        assert sorted(p.name for p in link.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(first)]
        assert load_checkpoint(link, mmap=True)["step"] == 3
        launch(then, small_run(tok_path, out, *common, "--resume"))  # --fsdp comes from the checkpoint
        assert [p.name for p in (out / "run").glob(".last.dcp.*")] == [link.resolve().name]  # the old copy went
        sharded = load_checkpoint(out / "run")  # consolidated from the shards
        assert_same_run(single, sharded, atol=5e-5)
        assert_same_optimizer_state(single, sharded, atol=5e-5)
    convert.main(["from-dcp", str(out / "run"), "--out", str(tmp_path / "plain" / "run")])
    plain = load_checkpoint(tmp_path / "plain" / "run" / "last.ckpt")
    assert not plain["train_args"]["fsdp"]
    for name, tensor in sharded["model"].items():
        assert torch.equal(tensor, plain["model"][name]), name


def launch(ranks: int, argv: list[str]) -> None:
    if ranks == 1:
        train.main(argv)
    else:
        torchrun(ranks, argv)


def test_a_one_file_checkpoint_is_not_resumed_with_fsdp_by_mistake(tok_path, tmp_path, capsys):
    """A one-file run asked to go on with --fsdp is told to convert or drop the flag, in one line."""
    common = ["--max-steps", "2", "--micro-batch", "2", "--tokens-per-step", "256"]
    train.main(small_run(tok_path, tmp_path, *common))
    with pytest.raises(SystemExit) as exit_info:
        train.main(small_run(tok_path, tmp_path, *common, "--resume", "--more-steps", "1", "--fsdp"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "last.ckpt is one file: resume it without --fsdp" in err, err


@pytest.fixture(scope="module")
def random_checkpoint(small_tokenizer, tmp_path_factory):
    """A random model with an untied head, whose greedy text varies with margins far above float rounding."""
    torch.manual_seed(0)
    cfg = get_config("tiny", vocab_size=512, n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=128,
                     max_seq_len=96, init_std=0.2, tie_embeddings=False)
    path = tmp_path_factory.mktemp("ckpt") / "run" / "last.ckpt"
    save_checkpoint(path, {"model": GPT(cfg).state_dict(), "config": cfg.to_dict(),
                           "tokenizer": small_tokenizer.to_str()})
    return path


def test_generation_across_two_nodes_equals_one_process(tmp_path, random_checkpoint):
    """Two torchrun "nodes" on loopback claim prompts from the store's counter; rank 0 writes every result in
    input order, and each equals one process's greedy output."""
    prompts = [f"{word} the king" for word in ("Now", "What", "O", "Good", "Come", "Why", "Then")]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    args = ["inference.py", "--checkpoint", str(random_checkpoint), "--prompts-file", str(tmp_path / "prompts.txt"),
            "--temperature", "0", "--max-new-tokens", "12", "--batch-size", "2", "--ignore-eos"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    single = subprocess.run([sys.executable, *args, "--output", str(tmp_path / "one.jsonl")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "gen",
                               *args, "--output", str(tmp_path / "two.jsonl"), "--stats-json",
                               str(tmp_path / "stats.json")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=120) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-3000:] for _, err in outputs]
    one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in two] == prompts
    assert [row["completion_ids"] for row in two] == [row["completion_ids"] for row in one]
    ranks = json.loads((tmp_path / "stats.json").read_text())["prompts_per_rank"]
    assert sum(ranks) == len(prompts) and min(ranks) >= 1, ranks  # both nodes took work
