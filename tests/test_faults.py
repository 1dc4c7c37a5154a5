"""Reliability: SIGKILL at random points, SIGTERM/Ctrl-C saves, torchrun elastic restarts, unsafe pickles,
and bounded memory. FAULT_KILLS=50 pytest tests/test_faults.py is the stress mode (README)."""
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tests.test_train import assert_same_run, free_port, small_run, torchrun

ROOT = Path(__file__).resolve().parent.parent
KILLS = int(os.environ.get("FAULT_KILLS", "3"))


def train_cmd(tok_path, out_dir, *extra):
    return [sys.executable, "train.py", *small_run(tok_path, out_dir, "--micro-batch", "4", "--tokens-per-step",
                                                   "256", "--save-every", "1", *extra)]


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tok_path, tmp_path):
    steps = str(20 * KILLS)  # enough steps that every kill lands mid-run (an attempt lasts a few steps)
    straight = subprocess.run(train_cmd(tok_path, tmp_path / "straight", "--max-steps", steps),
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    rng = random.Random(int(os.environ.get("FAULT_SEED", "0")))
    ckpt_path = tmp_path / "killed" / "run" / "last.ckpt"
    kills = attempts = 0
    seen_steps = []
    while True:
        attempts += 1
        assert attempts < 4 * KILLS + 10, "the run never finished"
        saved = load_checkpoint(ckpt_path)["step"] if ckpt_path.exists() else 0
        log = tmp_path / f"attempt{attempts}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(train_cmd(tok_path, tmp_path / "killed", "--max-steps", steps, "--auto-resume"),
                                    cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True)
        if kills < KILLS:
            # Wait for this attempt to make progress, then kill it at a random moment: mid-step or mid-save.
            before = load_checkpoint(ckpt_path)["step"] if ckpt_path.exists() else 0
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline:
                if ckpt_path.exists() and load_checkpoint(ckpt_path)["step"] > before:
                    break
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.6))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        _, err = proc.communicate(timeout=600)
        # Whatever moment the kill hit, last.ckpt is whole and readable.
        ckpt = load_checkpoint(ckpt_path)
        seen_steps.append(ckpt["step"])
        # Each attempt really resumed: it started at the step that was saved when it was launched...
        started = re.search(r"from step (\d+) to", log.read_text())
        assert started and int(started.group(1)) == saved, (saved, log.read_text()[-500:])
        # ...and from the saved state: the loss history runs on, one entry per step, never restarting.
        assert [s for s, _ in ckpt["history"]["train"]] == list(range(1, ckpt["step"] + 1))
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert kills >= KILLS and seen_steps == sorted(seen_steps)
    assert_same_run(load_checkpoint(tmp_path / "straight" / "run" / "last.ckpt"), load_checkpoint(ckpt_path),
                    atol=0)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_before_exit(tok_path, tmp_path, sig, code):
    cmd = train_cmd(tok_path, tmp_path, "--max-steps", "100000", "--save-every", "100000", "--log-every", "2")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # train until the step-2 log line: mid-run, nothing saved yet
        if line.startswith("step 2:"):
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert not (tmp_path / "run" / "best.ckpt").exists()  # the save came from the signal, not a schedule
    assert "saved" in err and "--resume" in err and "Traceback" not in err
    ckpt = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert ckpt["step"] >= 1 and len(ckpt["history"]["train"]) == ckpt["step"]
    if sig == signal.SIGTERM:  # the saved state resumes to exactly what an uninterrupted run reaches
        end = str(ckpt["step"] + 3)
        # the two runs side by side: each is mostly its interpreter starting
        resumed, straight = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                             for c in ([*cmd, "--resume", "--stop-at", end],
                                       [*train_cmd(tok_path, tmp_path / "straight", "--max-steps", "100000",
                                                   "--save-every", "100000", "--log-every", "2"), "--stop-at", end])]
        errors = [p.communicate(timeout=300)[1] for p in (resumed, straight)]
        assert resumed.returncode == straight.returncode == 0, errors[0][-2000:] + errors[1][-2000:]
        assert_same_run(load_checkpoint(tmp_path / "straight" / "run" / "last.ckpt"),
                        load_checkpoint(tmp_path / "run" / "last.ckpt"), atol=0)


def test_torchrun_elastic_restart_resumes_from_last_ckpt(tok_path, tmp_path):
    common = ["--max-steps", "14", "--micro-batch", "4", "--tokens-per-step", "512"]
    reference = subprocess.run([sys.executable, "train.py", *small_run(tok_path, tmp_path / "ref", *common)],
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
           "--master-port", "29531", "train.py",
           *small_run(tok_path, tmp_path / "ddp", *common, "--save-every", "1", "--auto-resume")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})
    ckpt_path = tmp_path / "ddp" / "run" / "last.ckpt"
    deadline = time.time() + 180
    while not (ckpt_path.exists() and load_checkpoint(ckpt_path)["step"] >= 3) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-6000:]
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    killed_at = load_checkpoint(ckpt_path)["step"]
    os.kill(int(workers[1]), signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    final = load_checkpoint(ckpt_path)
    assert final["step"] == 14 and killed_at < 14
    assert out.count("world 2 x micro-batch 4") == 2  # the workers started twice: once, then once restarted
    assert_same_run(load_checkpoint(tmp_path / "ref" / "run" / "last.ckpt"), final, atol=2e-5)


def test_two_nodes_on_loopback_equal_one_node_and_survive_a_node_kill(tok_path, tmp_path):
    """Two torchrun agents, one rank each, meet through c10d rendezvous on loopback as two "nodes". One node's
    worker is SIGKILLed mid-run: both agents restart their workers (--max-restarts 1), which resume from
    last.ckpt, and the run ends with the parameters of one node with two ranks."""
    common = ["--max-steps", "10", "--micro-batch", "4", "--tokens-per-step", "512"]
    torchrun(2, small_run(tok_path, tmp_path / "one", *common))
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
                               "--max-restarts", "1", "train.py",
                               *small_run(tok_path, tmp_path / "two", *common, "--save-every", "1", "--auto-resume")],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})
             for _ in range(2)]
    ckpt_path = tmp_path / "two" / "run" / "last.ckpt"
    deadline = time.time() + 180
    while not (ckpt_path.exists() and load_checkpoint(ckpt_path)["step"] >= 3) and time.time() < deadline:
        assert all(node.poll() is None for node in nodes), nodes[0].communicate()[1][-4000:]
        time.sleep(0.05)
    worker = subprocess.run(["pgrep", "-P", str(nodes[1].pid)], capture_output=True, text=True).stdout.split()
    assert len(worker) == 1, worker
    killed_at = load_checkpoint(ckpt_path)["step"]
    os.kill(int(worker[0]), signal.SIGKILL)
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-3000:] for _, err in outputs]
    final = load_checkpoint(ckpt_path)
    assert final["step"] == 10 and killed_at < 10
    started = "".join(out for out, _ in outputs).count("world 2 x micro-batch 4")
    assert started == 2  # rank 0 printed it twice: once, then once restarted
    assert_same_run(load_checkpoint(tmp_path / "one" / "run" / "last.ckpt"), final, atol=0)


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/slm-pickle-ran-code"


def test_pickle_that_runs_code_is_refused(tmp_path):
    Path(MARKER).unlink(missing_ok=True)
    path = tmp_path / "evil.ckpt"
    torch.save({"model": {}, "config": {}, "payload": RunsCode()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path)
    assert not Path(MARKER).exists()
    done = subprocess.run([sys.executable, "inference.py", "--checkpoint", str(path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 1 and "refusing to load" in done.stderr and not Path(MARKER).exists()
    # The file is live: a full unpickle does run its code. The refusal is what protects us.
    torch.load(path, weights_only=False)
    assert Path(MARKER).exists()
    Path(MARKER).unlink()


def test_finished_requests_are_released(small_tokenizer, tmp_path, monkeypatch):
    """2,000 prompts stream through inference.py's main on 16 rows, with the garbage collector off: each time a
    result is written, at most the rows, the admission queue and the results held for input order are still
    alive. Anything that kept finished requests (a stats list, a reference cycle) would keep all 2,000."""
    import gc
    import weakref

    import inference
    from config import get_config
    from model import GPT

    cfg = get_config("tiny", vocab_size=512, n_layer=1, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=128,
                     max_seq_len=64)
    save_checkpoint(tmp_path / "last.ckpt", {"model": GPT(cfg).state_dict(), "config": cfg.to_dict(),
                                             "tokenizer": small_tokenizer.to_str()})
    made, alive_at_each_result = [], []
    make_request, write = inference.make_request, inference.Output.__call__

    def tracked_request(*args, **kwargs):
        request = make_request(*args, **kwargs)
        made.append(weakref.ref(request))
        return request

    def counting_write(self, i, request):
        alive_at_each_result.append(sum(ref() is not None for ref in made))
        write(self, i, request)

    monkeypatch.setattr(inference, "make_request", tracked_request)
    monkeypatch.setattr(inference.Output, "__call__", counting_write)
    (tmp_path / "prompts.txt").write_text("\n".join(f"Prompt number {i} says hello" for i in range(2000)))
    gc.disable()
    try:
        inference.main(["--checkpoint", str(tmp_path / "last.ckpt"), "--prompts-file", str(tmp_path / "prompts.txt"),
                        "--max-new-tokens", "4", "--ignore-eos", "--batch-size", "16", "--device", "cpu",
                        "--output", str(tmp_path / "out.jsonl")])
    finally:
        gc.enable()
    assert (tmp_path / "out.jsonl").read_text().count("\n") == 2000 == len(made) == len(alive_at_each_result)
    # 16 rows + at most 16 queued + those finished in the same step, waiting for an earlier one
    assert max(alive_at_each_result) <= 3 * 16, max(alive_at_each_result)
    assert sum(ref() is not None for ref in made) == 0
