"""What only a CUDA GPU can run: nccl DDP, bf16 autocast training, CUDA-graph decode, the engine on CUDA. Marked
`gpu`: they run where a GPU is visible and must pass there; elsewhere they are deselected (conftest.py)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from config import get_config
from engine import Engine
from model import GPT
from runner import allocate_kv_cache, compile_decode_step
from tests.test_engine import ragged_requests, run
from tests.test_train import assert_same_run, free_port, run_in_process, small_run

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parent.parent


def on(device: str, argv: list[str]) -> list[str]:
    i = argv.index("--device")
    return argv[:i + 1] + [device] + argv[i + 2:]


def test_nccl_ddp_equals_one_gpu(tok_path, tmp_path):
    """Ranks over nccl (as many GPUs as there are, up to 2) against one process on one GPU, with accumulation."""
    ranks = min(2, torch.cuda.device_count())
    common = ["--max-steps", "3", "--micro-batch", "2", "--tokens-per-step", "512"]
    single = run_in_process(on("cuda", small_run(tok_path, tmp_path / "single", *common)))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                           "--master-port", str(free_port()), "train.py",
                           *on("cuda", small_run(tok_path, tmp_path / "ddp", *common))],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from checkpoint import load_checkpoint
    assert_same_run(single, load_checkpoint(tmp_path / "ddp" / "run" / "last.ckpt"), atol=1e-4)


def test_bf16_autocast_training_follows_fp32(tok_path, tmp_path):
    """bf16 autocast on the GPU: the same losses as fp32 on the CPU to bf16 precision, and they fall."""
    common = ["--max-steps", "6", "--micro-batch", "4", "--tokens-per-step", "256"]
    cpu = run_in_process(small_run(tok_path, tmp_path / "cpu", *common))
    argv = on("cuda", small_run(tok_path, tmp_path / "gpu", *common))
    gpu = run_in_process(argv[:argv.index("--dtype") + 1] + ["bf16"] + argv[argv.index("--dtype") + 2:])
    a, b = ([loss for _, loss in run["history"]["train"]] for run in (cpu, gpu))
    assert b == pytest.approx(a, rel=2e-2) and b[-1] < b[0]


def test_cuda_graph_decode_step_equals_eager():
    torch.manual_seed(0)
    model = GPT(get_config("tiny", vocab_size=128, n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=96,
                           max_seq_len=32, init_std=0.2)).cuda().eval()
    kv = allocate_kv_cache(model, rows=4, slots=32)
    tokens, positions = torch.tensor([3, 5, 7, 9], device="cuda"), torch.tensor([0, 0, 0, 0], device="cuda")
    with torch.no_grad():
        want = model.decode_step(tokens, positions, kv)
        for _ in range(3):  # CUDA graphs record after a warm-up, then replay
            got = compile_decode_step(model)(tokens, positions, kv)
    assert torch.allclose(got, want, atol=1e-4, rtol=0)


def test_the_engine_on_cuda_gives_the_cpu_engines_greedy_tokens():
    torch.manual_seed(0)
    cfg = get_config("tiny", vocab_size=512, n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=128,
                     max_seq_len=128, init_std=0.2, tie_embeddings=False)
    cpu = GPT(cfg).eval()
    gpu = GPT(cfg).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    want = run(Engine(cpu, rows=3, max_len=64, step="eager"), ragged_requests())
    engine = Engine(gpu, rows=3, max_len=64)
    assert engine.runner.step == "eager"  # the fused step is CPU-only
    assert run(engine, ragged_requests()) == want
