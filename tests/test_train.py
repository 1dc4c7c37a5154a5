"""train.py: DDP over real gloo processes vs one process, accumulation, exact resume, schedule, checkpoints."""
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
import training
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from config import MLPS, get_config
from machine import peak_matmul_flops
from model import GPT
from optim import recipe_config

ROOT = Path(__file__).resolve().parent.parent


def small_run(tok_path, out_dir, *extra):
    # AdamW + cosine unless a test asks for Muon or WSD (tiny's defaults), and plain Llama (tiny's recipe turns
    # model levers on), so each test keeps one recipe. Muon's Newton-Schulz runs in fp32 whatever this CPU's bf16
    # rate (machine.py's choice, pinned): its bf16 iteration turns the all-reduce's rounding into differences of
    # 1e-4 after 3 steps.
    return ["--device", "cpu", "--machine", "bf16_gemms_in_fp32=1", "--optimizer", "adamw", "--schedule", "cosine",
            "--no-qk-norm", "--no-value-residual", "--no-unet-skips",
            "--n-layer", "2", "--d-model", "64", "--n-head", "4", "--n-kv-head", "2", "--ffn-hidden", "128",
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(n: int, argv: list[str], script: str = "train.py") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master-port",
           str(free_port()), script, *argv]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def optimizer_states(ckpt) -> list[dict]:
    """The state of each optimizer in a checkpoint: AdamW's alone, or Muon's and AdamW's."""
    saved = ckpt["optimizer"]
    return [saved["state"]] if "state" in saved else [part["state"] for part in saved.values()]


def assert_same_optimizer_state(a, b, atol):
    for state_a, state_b in zip(optimizer_states(a), optimizer_states(b), strict=True):
        assert state_a.keys() == state_b.keys() and state_a
        for i, moments in state_a.items():
            for key, value in moments.items():
                assert torch.allclose(value, state_b[i][key], atol=atol, rtol=0), (i, key)


# train.py under torchrun, with a DDP communication hook that records which gradient buckets each rank
# all-reduces (the default all-reduce still does the work), written to all_reduces-RANK.json at exit.
COUNT_ALL_REDUCES = """
import atexit, json, os, runpy, sys
import torch.nn.parallel
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

out_dir, buckets, init = sys.argv[1], [], torch.nn.parallel.DistributedDataParallel.__init__
def hook(state, bucket):
    buckets.append(bucket.index())
    return allreduce_hook(state, bucket)
def counting_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.register_comm_hook(None, hook)
torch.nn.parallel.DistributedDataParallel.__init__ = counting_init
atexit.register(lambda: open(f"{out_dir}/all_reduces-{os.environ['RANK']}.json", "w").write(json.dumps(buckets)))
sys.path.insert(0, sys.argv[2])
sys.argv = [sys.argv[2] + "/train.py", *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_with_accumulation_equals_one_process(tok_path, tmp_path, optimizer):
    """2 gloo ranks x 2 micro-steps (the no_sync branch runs) against 1 process x 4 micro-steps. With Muon,
    each rank orthogonalises the all-reduced gradient, so both ranks' updates equal the single process's.
    Each rank all-reduces every gradient bucket once a step, never on a no_sync micro-step."""
    common = ["--max-steps", "3", "--micro-batch", "2", "--tokens-per-step", "512", "--optimizer", optimizer]
    single = run_in_process(small_run(tok_path, tmp_path / "single", *common))
    (tmp_path / "count_all_reduces.py").write_text(COUNT_ALL_REDUCES)
    done = torchrun(2, [str(tmp_path), str(ROOT), *small_run(tok_path, tmp_path / "ddp", *common)],
                    script=str(tmp_path / "count_all_reduces.py"))
    assert "world 2 x micro-batch 2 x seq 64 x accum 2" in done.stdout
    for rank in range(2):
        buckets = json.loads((tmp_path / f"all_reduces-{rank}.json").read_text())
        assert len(buckets) == 3 * len(set(buckets)) and buckets, buckets  # 3 steps x each bucket once
    ddp = load_checkpoint(tmp_path / "ddp" / "run" / "last.ckpt")
    assert single["train_args"]["micro_batch"] == 2 and "accum" not in single["train_args"]
    # Muon's Newton-Schulz iteration runs in fp32 here (pinned), so only the summation order of the all-reduce
    # differs. A rank that orthogonalised its own gradient instead would be off by the order of lr.
    atol = 2e-5 if optimizer == "adamw" else 1e-4
    assert_same_run(single, ddp, atol=atol)
    assert_same_optimizer_state(single, ddp, atol=atol)
    assert single["history"]["train"][-1][1] < single["history"]["train"][0][1]


def test_stream_mode_end_to_end_with_two_ranks_and_resume(tok_path, tmp_path):
    """--data-mode stream over a local .jsonl through `datasets`: 2 ranks read disjoint documents, and a run
    stopped and resumed (each rank's stream position from the checkpoint) equals one run straight through."""
    docs = [f"Document {i}. " + "To be, or not to be, that is the question. " * (1 + i % 4) for i in range(400)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    common = ["--data", str(corpus), "--data-mode", "stream", "--val-docs", "20", "--data-dir", str(tmp_path / "d"),
              "--max-steps", "4", "--micro-batch", "2", "--tokens-per-step", "256"]
    torchrun(2, without(small_run(tok_path, tmp_path / "straight", *common), "--data-dir"))
    torchrun(2, without(small_run(tok_path, tmp_path / "split", *common, "--stop-at", "2"), "--data-dir"))
    stopped = load_checkpoint(tmp_path / "split" / "run" / "last.ckpt")
    assert stopped["step"] == 2 and len(stopped["data_state"]) == 2
    assert stopped["data_state"][0] != stopped["data_state"][1]
    torchrun(2, without(small_run(tok_path, tmp_path / "split", *common, "--resume"), "--data-dir"))
    straight = load_checkpoint(tmp_path / "straight" / "run" / "last.ckpt")
    assert_same_run(straight, load_checkpoint(tmp_path / "split" / "run" / "last.ckpt"), atol=1e-6)


def test_compile_trains_and_saves_plain_names(tok_path, tmp_path):
    common = ["--max-steps", "2", "--micro-batch", "4", "--tokens-per-step", "256"]
    eager = run_in_process(small_run(tok_path, tmp_path / "eager", *common))
    compiled = run_in_process(small_run(tok_path, tmp_path / "compiled", *common, "--compile"))
    assert compiled["model"].keys() == eager["model"].keys()
    assert not any("_orig_mod" in k for k in compiled["model"])
    assert_same_run(eager, compiled, atol=1e-4)


def test_bf16_autocast_training_follows_fp32(tok_path, tmp_path):
    """--dtype bf16 on CPU: matmuls under bf16 autocast, master weights and optimizer state in fp32 (what is
    saved). Its losses follow the fp32 run's to within bf16 rounding, and differ from them."""
    common = ["--max-steps", "4", "--micro-batch", "4", "--tokens-per-step", "256"]
    fp32 = run_in_process(small_run(tok_path, tmp_path / "fp32", *common))
    bf16 = run_in_process([*without(small_run(tok_path, tmp_path / "bf16", *common), "--dtype"), "--dtype", "bf16"])
    assert bf16["train_args"]["dtype"] == "bf16"
    assert all(t.dtype == torch.float32 for t in bf16["model"].values())
    losses = {name: [loss for _, loss in run["history"]["train"]] for name, run in (("fp32", fp32), ("bf16", bf16))}
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=0.02) and losses["bf16"] != losses["fp32"]
    assert losses["bf16"][-1] < losses["bf16"][0]


def test_auto_precision_times_the_runs_own_step_and_takes_the_faster(tok_path, tmp_path, machine, monkeypatch,
                                                                     capsys):
    """--dtype auto --compile off on a CPU: fp32 and bf16 autocast are timed on the run's shape (a fresh model
    and optimizer), the log gives both rates, the faster is taken and saved in the checkpoint; the next run of
    the same shape takes it from .cache/machine without timing; a pin decides only what the flags leave auto."""
    import machine as machine_module
    monkeypatch.setattr(machine_module, "measured_path", lambda: tmp_path / "measured.json")
    machine.values.pop("train_step", None)
    common = ["--max-steps", "1", "--micro-batch", "4", "--tokens-per-step", "512", "--compile", "off"]
    ckpt = run_in_process([*without(small_run(tok_path, tmp_path / "a", *common), "--dtype"), "--dtype", "auto"])
    timed = re.search(r"train_step measured on this run's shape: fp32 ([\d,]+) tok/s, bf16 ([\d,]+) tok/s; "
                      r"taking (\w+)", capsys.readouterr().out)
    fp32, bf16 = (int(timed.group(i).replace(",", "")) for i in (1, 2))
    assert timed.group(3) == ckpt["train_args"]["dtype"] == ("bf16" if bf16 > fp32 else "fp32")
    assert ckpt["train_args"]["compile"] == "off"
    kept = json.loads((tmp_path / "measured.json").read_text())
    assert [k.split("@")[0] for k in kept] == ["train_step"] and list(kept.values()) == [timed.group(3)]
    machine.values.pop("train_step")
    again = run_in_process([*without(small_run(tok_path, tmp_path / "b", *common), "--dtype"), "--dtype", "auto"])
    assert "measured on this run's shape" not in capsys.readouterr().out
    assert machine.how["train_step"] == "measured earlier" and again["train_args"]["dtype"] == timed.group(3)
    machine.pin("train_step=bf16+compile")  # the pin gives bf16; --compile off still wins
    pinned = run_in_process([*without(small_run(tok_path, tmp_path / "c", *common), "--dtype"), "--dtype", "auto"])
    assert (pinned["train_args"]["dtype"], pinned["train_args"]["compile"]) == ("bf16", "off")


def test_gradient_accumulation_equals_big_batch(tok_path, tmp_path):
    four_by_two = run_in_process(small_run(tok_path, tmp_path / "a", "--max-steps", "2", "--micro-batch", "2",
                                           "--tokens-per-step", "512"))
    one_by_eight = run_in_process(small_run(tok_path, tmp_path / "b", "--max-steps", "2", "--micro-batch", "8",
                                            "--tokens-per-step", "512"))
    assert_same_run(four_by_two, one_by_eight, atol=2e-5)


def run_in_subprocess(argv):
    done = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return load_checkpoint(Path(argv[argv.index("--out-dir") + 1]) / "run" / "last.ckpt")


def tiny_recipe(argv: list[str]) -> list[str]:
    """small_run with tiny's own optimizer and schedule (Muon + WSD), as `make train` runs them."""
    return without(without(argv, "--optimizer"), "--schedule")


LEVERS = ["--qk-norm", "--zero-init", "--value-residual", "--logit-softcap", "15", "--mlp", "relu2", "--unet-skips"]


@pytest.mark.parametrize("recipe", ["adamw+cosine", "tiny's muon+wsd", "bf16, every lever, ramp, doc chunks"])
def test_resume_is_exact(tok_path, tmp_path, recipe):
    """Stopped at step 3 in one process and resumed in another, a run equals one straight through, bit for bit
    (Newton-Schulz pinned to fp32 in both, so no process times its own choice), also in bf16 with every config
    lever, a batch ramp across the stop and windows within documents."""
    def argv(out_dir, *extra):
        run = small_run(tok_path, out_dir, "--max-steps", "6", "--micro-batch", "4", "--tokens-per-step", "256",
                        "--save-every", "100", *extra)
        if recipe == "adamw+cosine":
            return run
        if recipe == "tiny's muon+wsd":
            return tiny_recipe(run)
        return [*without(tiny_recipe(run), "--dtype"), "--dtype", "bf16", "--micro-batch", "2", "--batch-ramp", "4",
                "--doc-chunks", *LEVERS]

    straight = run_in_process(argv(tmp_path / "straight"))
    stopped = run_in_subprocess(argv(tmp_path / "split", "--stop-at", "3"))
    assert stopped["step"] == 3
    resumed = run_in_subprocess(argv(tmp_path / "split", "--resume"))
    assert_same_run(straight, resumed, atol=0)
    assert_same_optimizer_state(straight, resumed, atol=0)
    assert straight["train_args"]["optimizer"] == ("adamw" if recipe == "adamw+cosine" else "muon")
    # One flag trains further from a finished run, at the final (minimum) learning rate.
    more = run_in_process(argv(tmp_path / "split", "--resume", "--more-steps", "2"))
    assert more["step"] == 8 and more["train_args"]["decay_steps"] == 6


def test_every_flag_that_changes_the_model_or_optimizer_is_refused_on_resume(tok_path, tmp_path, capsys):
    """Each model-config flag (from the parser, so a new field is covered too), --preset and --optimizer, set
    to another value on --resume, is a usage error naming it; the checkpoint is left as it was."""
    argv = small_run(tok_path, tmp_path, "--max-steps", "1", "--micro-batch", "4", "--tokens-per-step", "256")
    saved = run_in_process(argv)
    before = (tmp_path / "run" / "last.ckpt").read_bytes()
    changes = {"preset": ["--preset", "slm-40m"], "optimizer": ["--optimizer", "muon"]}
    for name, value in saved["config"].items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            changes[name] = [flag if not value else "--no-" + flag[2:]]
        elif isinstance(value, str):  # a choice: another of them
            changes[name] = [flag, next(c for c in MLPS if c != value)]
        else:
            changes[name] = [flag, str(value * 2 if value else 0.5)]
    assert set(changes) == {f.dest for f in train.build_parser()._actions if f.dest in saved["config"]} | \
        {"preset", "optimizer"}
    for name, flags in changes.items():
        with pytest.raises(SystemExit) as e:
            train.main([*argv, "--resume", "--more-steps", "1", *flags])
        assert e.value.code == 2, name
        assert f"({name} differ)" in capsys.readouterr().err, name
    assert (tmp_path / "run" / "last.ckpt").read_bytes() == before
    # The same values again are no change: the run goes on.
    assert run_in_process([*argv, "--resume", "--more-steps", "1"])["step"] == 2


def test_best_ckpt_holds_the_best_validation_loss(tok_path, tmp_path, monkeypatch):
    """Validation losses scripted as 3, 2, 2.5, 1.5, 1.8: best.ckpt is step 4's, last.ckpt step 5's."""
    losses = iter([3.0, 2.0, 2.5, 1.5, 1.8])
    monkeypatch.setattr(train, "evaluate", lambda *args: (next(losses), 0.0))
    last = run_in_process(small_run(tok_path, tmp_path, "--max-steps", "5", "--micro-batch", "4",
                                    "--tokens-per-step", "256", "--eval-every", "1"))
    best = load_checkpoint(tmp_path / "run" / "best.ckpt")
    assert best["step"] == 4 and best["best_val"] == 1.5 and best["history"]["val"][-1] == (4, 1.5)
    assert last["step"] == 5 and last["best_val"] == 1.5


def test_an_infinite_gradient_with_a_finite_loss_stops_the_run(tok_path, tmp_path, monkeypatch, capsys):
    """A gradient made infinite in step 3's backward (the loss stays finite): the run stops with an error, and
    last.ckpt keeps step 2, whose weights the bad step never touched."""
    build = train.build_model_and_optimizer
    backwards = {"n": 0}

    def poison_third_step(grad):
        backwards["n"] += 1
        return torch.full_like(grad, math.inf) if backwards["n"] == 3 else grad

    def build_and_hook(*args):
        raw_model, model, opt = build(*args)
        raw_model.layers[0].mlp.down_proj.weight.register_hook(poison_third_step)
        return raw_model, model, opt

    monkeypatch.setattr(train, "build_model_and_optimizer", build_and_hook)
    argv = small_run(tok_path, tmp_path, "--max-steps", "5", "--micro-batch", "4", "--tokens-per-step", "256",
                     "--save-every", "1")
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 1 and "non-finite loss or gradient at step 3" in capsys.readouterr().err
    last = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert last["step"] == 2 and [step for step, _ in last["history"]["train"]] == [1, 2]
    assert all(torch.isfinite(t).all() for t in last["model"].values())


def test_make_train_runs_tiny_from_nothing_and_leaves_the_tree_clean(tmp_path):
    """The commands of `make train` (read from the Makefile), run in an empty folder that has only the corpus:
    tiny's defaults train a tokenizer, then Muon + WSD for a short budget, stopped at step 2 and resumed in a
    new process; inference.py then writes samples. Everything lands in the gitignored data/ and checkpoints/."""
    from inference import SEED_PROMPTS

    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^train: .*\n((?:\t.*\n)+)", makefile, re.M).group(1).strip().splitlines()
    assert [line.split()[1] for line in recipe] == ["train.py", "inference.py"]
    train_cmd, inference_cmd = ([sys.executable, str(ROOT / line.split()[1]), *line.split()[2:], "--device", "cpu"]
                                for line in recipe)
    train_cmd = [arg.replace("$(BUDGET)", "0.1") for arg in train_cmd]  # minutes
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shakespeare").symlink_to(ROOT / "data" / "shakespeare")  # fetched by conftest
    for cmd in (train_cmd + ["--stop-at", "2"], train_cmd + ["--resume"], inference_cmd):
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "data" / "shakespeare-bpe4096.json").is_file()
    run_dir = tmp_path / "checkpoints" / "tiny"
    last = load_checkpoint(run_dir / "last.ckpt")
    assert last["config"] == recipe_config("tiny").to_dict() != get_config("tiny").to_dict() and last["step"] > 2
    assert (last["train_args"]["optimizer"], last["train_args"]["schedule"]) == ("muon", "wsd")
    assert last["history"]["lr"][-1][1] == last["train_args"]["min_lr"]  # the budget's end came, then stopped
    samples = (run_dir / "samples.md").read_text()
    assert samples.count("### ") == len(SEED_PROMPTS)
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")}
    assert written == {"data", "checkpoints"}
    ignored = subprocess.run(["git", "check-ignore", "data/x", "checkpoints/tiny/samples.md"], cwd=ROOT,
                             capture_output=True, text=True)
    assert ignored.stdout.split() == ["data/x", "checkpoints/tiny/samples.md"]


def without(argv: list[str], flag: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_time_budget_is_spent_even_when_the_first_steps_are_slow(tok_path, tmp_path, monkeypatch, schedule):
    """The clock is driven, not waited for: each training forward advances it by 0.1 s, the first 8 by 0.75 s
    (as on a machine that is busy at start-up). A 15 s budget run must end at its budget, to within one step,
    with its last step at min_lr and one decay; stopped at step 20 and resumed, it continues its clock."""
    clock = {"now": 1000.0, "forwards": 0}
    forward = GPT.forward

    def driven(self, *args, **kwargs):
        if self.training:
            clock["forwards"] += 1
            clock["now"] += 0.75 if clock["forwards"] <= 8 else 0.1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", driven)
    monkeypatch.setattr(time, "perf_counter", lambda: clock["now"])
    budget_s = 15
    argv = without(small_run(tok_path, tmp_path, "--time-budget", str(budget_s / 60), "--micro-batch", "4",
                             "--tokens-per-step", "256", "--save-every", "10", "--schedule", schedule,
                             "--peak-flops", "1e15"), "--warmup-steps")
    stopped = run_in_process([*argv, "--stop-at", "20"])
    assert stopped["step"] == 20 and stopped["elapsed_s"] == pytest.approx(8 * 0.75 + 12 * 0.1)
    done = run_in_process([*argv, "--resume"])
    assert budget_s - 0.1 <= done["elapsed_s"] <= budget_s + 0.1  # the budget, to within one step
    assert done["step"] == 20 + round((done["elapsed_s"] - stopped["elapsed_s"]) / 0.1)  # the clock went on
    lrs = [lr for _, lr in done["history"]["lr"]]
    assert len(lrs) == done["step"]
    assert lrs[-1] == done["train_args"]["min_lr"] and max(lrs) == pytest.approx(3e-3, rel=0.05)
    peak = lrs.index(max(lrs))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # one decay, across the resume too
    if schedule == "wsd":  # flat at the peak from the warmup's end (5%) until the last 30% of the budget
        assert lrs.count(max(lrs)) > 0.5 * len(lrs)


def test_the_peak_is_the_fastest_of_its_timings(monkeypatch):
    """MFU's denominator: 2 n^3 over the fastest of the timed matmuls (after a warm-up that is not timed), so a
    slow moment cannot lower it. The clock is scripted: the timed calls take 0.5, 0.2 and 0.3 s."""
    ticks = iter([0.0, 0.5, 10.0, 10.2, 20.0, 20.3])
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    assert peak_matmul_flops(torch.device("cpu"), torch.float32, n=64, repeats=3) == pytest.approx(2 * 64 ** 3 / 0.2)


def test_a_step_faster_than_the_peak_makes_it_timed_again(tok_path, tmp_path, capsys):
    """A peak that is far too low (as if timed while the machine was busy) is re-measured, and said so."""
    argv = small_run(tok_path, tmp_path, "--max-steps", "3", "--micro-batch", "4", "--tokens-per-step", "256",
                     "--log-every", "1")
    run_in_process([*without(argv, "--peak-flops"), "--peak-flops", "1000"])
    out = capsys.readouterr().out
    mfus = [float(m) for m in re.findall(r"MFU ([\d.]+)%", out)]
    assert len(mfus) == 3 and all(0 < m <= 100 for m in mfus), out
    assert "re-measured" in out


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
    """Tied, the embedding matrix is the head's (its matmul counts once); untied, its lookup costs nothing."""
    for tied in (True, False):
        cfg = get_config("tiny", tie_embeddings=tied)
        n = GPT(cfg).num_params()
        lookup = 0 if tied else cfg.vocab_size * cfg.d_model
        assert training.flops_per_token(cfg, 256, n) == 6 * (n - lookup) + 12 * cfg.n_layer * cfg.d_model * 256
    assert math.isfinite(peak_matmul_flops(torch.device("cpu"), torch.float32))


def test_hiding_the_gpus_changes_nothing(tok_path, tmp_path):
    """With --device cpu, CUDA_VISIBLE_DEVICES="" (no GPU to see) gives the same run, bit for bit."""
    runs = []
    for name, hidden in (("seen", None), ("hidden", "")):
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
        if hidden is not None:
            env["CUDA_VISIBLE_DEVICES"] = hidden
        done = subprocess.run([sys.executable, "train.py", *small_run(tok_path, tmp_path / name, "--max-steps", "2",
                               "--micro-batch", "4", "--tokens-per-step", "256")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(load_checkpoint(tmp_path / name / "run" / "last.ckpt"))
    assert_same_run(*runs, atol=0)
