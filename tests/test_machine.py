"""machine.py: choices decided once, pinned by flag or environment, and the same on every DDP rank."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import layers
import machine
from machine import ENV, MACHINE, Machine
from tests.test_train import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_a_choice_is_measured_once_then_kept_for_later_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "measured_path", lambda: tmp_path / "m.json")
    m, calls = Machine(), []
    m.pins_read = True
    assert m.decide("dense_min_rows", lambda: calls.append(1) or 16) == 16
    assert m.decide("dense_min_rows", lambda: calls.append(1) or 4) == 16 and calls == [1]
    assert m.summary() == {"choices": {"dense_min_rows": 16}, "how": {"dense_min_rows": "measured"}}
    later = Machine()  # another process on this machine
    later.pins_read = True
    assert later.decide("dense_min_rows", lambda: calls.append(1) or 4) == 16 and calls == [1]
    assert later.how == {"dense_min_rows": "measured earlier"}


def test_pins_parse_and_bad_pins_say_what_is_known():
    m = Machine()
    m.pin("bf16_gemms_in_fp32=0, dense_min_rows=8,quant_kernel=plain")
    assert m.values == {"bf16_gemms_in_fp32": False, "dense_min_rows": 8, "quant_kernel": "plain"}
    assert m.decide("dense_min_rows", lambda: pytest.fail("a pinned choice is never measured")) == 8
    with pytest.raises(ValueError, match="'fast=1' is not name=value with a name among bf16_gemms_in_fp32"):
        m.pin("fast=1")
    with pytest.raises(ValueError, match="dense_min_rows takes a int, not 'many'"):
        m.pin("dense_min_rows=many")


def test_a_pin_for_a_block_is_undone_after_it_even_on_an_error():
    m = Machine()
    m.pin("quant_kernel=plain")
    with pytest.raises(KeyError), m.pinned("quant_kernel=plain-int8,int16_rows=0"):
        assert m.values == {"quant_kernel": "plain-int8", "int16_rows": 0}
        raise KeyError
    assert m.values == {"quant_kernel": "plain"} and m.how == {"quant_kernel": "pinned"}


def test_the_flag_wins_over_the_environment_and_the_stats_say_so(tmp_path):
    """A real process: SLM_MACHINE and --machine both pin; the stats JSON of inference.py reports the choices."""
    code = ("import sys; from machine import MACHINE, prepare_process; prepare_process(sys.argv[1]); "
            "import json; print(json.dumps(MACHINE.summary()))")
    env = {**os.environ, ENV: "dense_min_rows=4,quant_kernel=plain"}
    done = subprocess.run([sys.executable, "-c", code, "dense_min_rows=32"], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True)
    assert json.loads(done.stdout) == {"choices": {"dense_min_rows": 32, "quant_kernel": "plain"},
                                       "how": {"dense_min_rows": "pinned", "quant_kernel": "pinned"}}


def ranks_decide(rank: int, port: int, results, kept: str) -> None:
    """One gloo rank whose own measurement of the bf16 route disagrees with the other rank's."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    machine.measured_path = lambda: Path(kept) / f"rank{rank}.json"  # no choice measured earlier
    layers.cpu_bf16_gemm_is_slow = lambda: rank == 1  # a busy moment on rank 1, say
    if rank == 0:
        layers.bf16_gemms_run_in_fp32()
    MACHINE.share()
    results.put((rank, layers.bf16_gemms_run_in_fp32(), MACHINE.how["bf16_gemms_in_fp32"]))
    dist.destroy_process_group()


def test_ddp_ranks_take_rank_0s_choices(tmp_path):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=ranks_decide, args=(rank, port, results, str(tmp_path))) for rank in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got == [(0, False, "measured"), (1, False, "shared")]


def test_importing_does_no_work():
    """No module writes the environment, calls the allocator or times anything at import: every choice is
    still undecided, and the environment is as it was."""
    modules = [p.stem for p in ROOT.glob("*.py")] + [f"bench.{p.stem}" for p in (ROOT / "bench").glob("*.py")
                                                      if p.stem != "__main__"]
    code = ("import os, importlib, json, sys; before = dict(os.environ); "
            f"[importlib.import_module(m) for m in {sorted(modules)!r}]; from machine import MACHINE; "
            "print(json.dumps([MACHINE.values, dict(os.environ) == before]))")
    env = {k: v for k, v in os.environ.items() if k != ENV and k != "TORCHINDUCTOR_CACHE_DIR"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [{}, True]
