"""The bad-input matrix: every CLI, every case exits non-zero (2 for usage errors) with one line on stderr that
names the problem and the fix, shows no traceback, and leaves every file already written as it was."""
import hashlib
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint
from config import get_config
from model import GPT
from tests.test_train import small_run

ROOT = Path(__file__).resolve().parent.parent


def write_q2k_gguf(path: Path) -> None:
    """A minimal llama GGUF whose one tensor is Q2_K, a type we do not dequantize."""
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    for key, value in [("block_count", 1), ("embedding_length", 256), ("feed_forward_length", 256),
                       ("context_length", 64), ("attention.head_count", 2)]:
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((1, 84), dtype=np.uint8),
                      raw_dtype=GGMLQuantizationType.Q2_K)  # one Q2_K block of 256 weights
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def ws(small_tokenizer, tmp_path_factory):
    """A workspace of good and bad files."""
    root = tmp_path_factory.mktemp("ws")
    small_tokenizer.save(root / "tok.json")
    cfg = get_config("tiny", vocab_size=512, n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=128,
                     max_seq_len=64)
    good = {"model": GPT(cfg).state_dict(), "config": cfg.to_dict(), "tokenizer": small_tokenizer.to_str()}
    save_checkpoint(root / "good" / "last.ckpt", good)
    relu2 = get_config("tiny", vocab_size=512, n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=128,
                       max_seq_len=64, mlp="relu2", qk_norm=True)
    save_checkpoint(root / "relu2.ckpt", {"model": GPT(relu2).state_dict(), "config": relu2.to_dict(),
                                          "tokenizer": small_tokenizer.to_str()})
    small = get_config("tiny", vocab_size=300, n_layer=1, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=128)
    save_checkpoint(root / "mismatch.ckpt", {"model": GPT(small).state_dict(), "config": small.to_dict(),
                                             "tokenizer": small_tokenizer.to_str()})
    blob = (root / "good" / "last.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(blob[: len(blob) // 2])
    (root / "corrupt.ckpt").write_bytes(bytes(range(256)) * 64)
    (root / "latin1").mkdir()
    (root / "latin1" / "a.txt").write_bytes("café au lait, " .encode("latin-1") * 50)
    (root / "empty").mkdir()
    (root / "empty" / "a.txt").write_text("")
    (root / "empty" / "b.txt").write_text("")
    (root / "small").mkdir()
    for i in range(3):
        (root / "small" / f"{i}.txt").write_text("To be or not to be. " * 3)
    write_q2k_gguf(root / "q2k.gguf")
    # A finished training run to resume from: a real last.ckpt of train.py.
    done = subprocess.run([sys.executable, "train.py", *small_run(root / "tok.json", root / "runs", "--max-steps",
                          "1", "--micro-batch", "4", "--tokens-per-step", "256")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return root


def limit_file_size(max_bytes: int):
    """A full disk, simulated: writes past max_bytes fail with EFBIG (Python ignores SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))


TRN = "train.py"
INF = "inference.py"
CNV = "convert.py"
TOK = "tokenizer.py"
SRV = "serve.py"
TRAIN_SMALL = ["--tokenizer", "{ws}/tok.json", "--vocab-size", "512", "--n-layer", "1", "--d-model", "64",
               "--n-head", "4", "--n-kv-head", "2", "--ffn-hidden", "128", "--max-seq-len", "64",
               "--out-dir", "{ws}/new", "--data-dir", "{ws}/data", "--max-steps", "3", "--peak-flops", "1e12",
               "--device", "cpu"]
RESUME = ["--out-dir", "{ws}/runs", "--run-name", "run", "--resume"]

CASES = [
    # (id, script, args, exit code, text on stderr)
    ("unknown preset", TRN, ["--preset", "gpt5"], 2, "invalid choice: 'gpt5'"),
    ("unknown dtype", TRN, ["--dtype", "fp8"], 2, "argument --dtype: invalid choice"),
    ("negative steps", TRN, ["--max-steps", "-3"], 2, "must be > 0"),
    ("bad config", TRN, ["--n-head", "5"], 2, "d_model 256 must be divisible by n_head 5"),
    ("seq len over context", TRN, [*TRAIN_SMALL, "--seq-len", "128"], 2, "exceeds the model's max_seq_len 64"),
    ("unknown optimizer", TRN, ["--optimizer", "sgd"], 2, "invalid choice: 'sgd'"),
    ("decay fraction above one", TRN, [*TRAIN_SMALL, "--schedule", "wsd", "--decay-frac", "1.5"], 2,
     "--decay-frac must be in (0, 1]"),
    ("fp16 on cpu", TRN, [*TRAIN_SMALL, "--dtype", "fp16"], 2, "needs a CUDA GPU"),
    ("tokenizer bigger than vocab", TRN, [*TRAIN_SMALL[:2], "--vocab-size", "300", *TRAIN_SMALL[4:]], 2,
     "tokenizer has 512 tokens but the model's vocab_size is 300"),
    ("resume missing", TRN, ["--out-dir", "{ws}/nothing", "--resume"], 1, "no last.ckpt or last.dcp in"),
    ("resume other preset", TRN, [*RESUME, "--preset", "slm-40m"], 2, "was trained with another model config"),
    ("resume other optimizer", TRN, [*RESUME, "--optimizer", "muon"], 2, "or optimizer (optimizer differ)"),
    ("non-utf8 corpus", TRN, [*TRAIN_SMALL, "--data", "{ws}/latin1"], 1, "is not valid UTF-8"),
    ("empty corpus", TRN, [*TRAIN_SMALL, "--data", "{ws}/empty"], 1, "has no non-empty documents"),
    ("corpus smaller than a batch", TRN, [*TRAIN_SMALL, "--data", "{ws}/small", "--val-docs", "1"], 1,
     "but one step needs"),
    ("nan loss", TRN, [*TRAIN_SMALL, "--lr", "1e30", "--max-steps", "20", "--save-every", "1", "--run-name", "nan",
                     "--dtype", "fp32"], 1, "keeps the last good state"),
    ("disk full during save", TRN, [*RESUME, "--more-steps", "1"], 1, "could not write"),
    ("missing checkpoint", INF, ["--checkpoint", "{ws}/nope.ckpt"], 1, "checkpoint not found"),
    ("corrupt checkpoint", INF, ["--checkpoint", "{ws}/corrupt.ckpt"], 1, "is corrupt or truncated"),
    ("truncated checkpoint", INF, ["--checkpoint", "{ws}/truncated.ckpt"], 1, "is corrupt or truncated"),
    ("tokenizer/model mismatch", INF, ["--checkpoint", "{ws}/mismatch.ckpt"], 1, "tokenizer has 512 tokens"),
    ("empty prompt", INF, ["--checkpoint", "{ws}/good", "--prompt", "", "--max-new-tokens", "8"], 1,
     "prompt 1 is empty"),
    ("prompt over context", INF, ["--checkpoint", "{ws}/good", "--prompt", "words " * 200, "--max-new-tokens", "8"],
     1, "pass --truncate"),
    ("zero new tokens", INF, ["--checkpoint", "{ws}/good", "--max-new-tokens", "0"], 2, "must be at least 1"),
    ("negative new tokens", INF, ["--checkpoint", "{ws}/good", "--max-new-tokens", "-5"], 2, "must be at least 1"),
    ("top-p zero", INF, ["--checkpoint", "{ws}/good", "--top-p", "0"], 2, "--top-p must be in (0, 1]"),
    ("top-p above one", INF, ["--checkpoint", "{ws}/good", "--top-p", "1.2"], 2, "--top-p must be in (0, 1]"),
    ("unknown device", INF, ["--checkpoint", "{ws}/good", "--device", "tpu"], 2, "unknown --device 'tpu'"),
    ("unknown training device", TRN, ["--device", "gpu0"], 2, "unknown --device 'gpu0'"),
    ("a GPU that is not there", TRN, ["--device", "cuda:99"], 2, "--device cuda:99 but"),
    ("unknown inference dtype", INF, ["--checkpoint", "{ws}/good", "--dtype", "int3"], 2, "invalid choice"),
    ("int8 KV cache off the fused step", INF, ["--checkpoint", "{ws}/relu2.ckpt", "--kv-cache-dtype", "int8"], 1,
     "an int8 KV cache runs in the fused step only"),
    ("int8 KV cache off the fused step, served", SRV, ["--checkpoint", "{ws}/relu2.ckpt", "--kv-cache-dtype", "int8"],
     1, "an int8 KV cache runs in the fused step only"),
    ("negative prefix cache", INF, ["--checkpoint", "{ws}/good", "--prefix-cache-mb", "-1"], 2, "must be >= 0"),
    ("missing prompts file", INF, ["--checkpoint", "{ws}/good", "--prompts-file", "{ws}/none.txt"], 1,
     "prompts file not found"),
    ("unsupported gguf quantization", CNV, ["from-gguf", "{ws}/q2k.gguf", "--out", "{ws}/q2k"], 1,
     "quantization type Q2_K"),
    ("missing gguf", CNV, ["from-gguf", "{ws}/none.gguf", "--out", "{ws}/x"], 1, "GGUF file not found"),
    ("one-file checkpoint as sharded", CNV, ["from-dcp", "{ws}/good", "--out", "{ws}/x"], 1,
     "is not a sharded checkpoint"),
    ("ReLU² to Hugging Face", CNV, ["to-hf", "{ws}/relu2.ckpt", "--out", "{ws}/hf"], 1,
     "no Hugging Face architecture has mlp"),
    ("QK-norm to GGUF", CNV, ["to-gguf", "{ws}/relu2.ckpt", "--out", "{ws}/m.gguf"], 1,
     "llama.cpp's llama architecture has no place for"),
    ("unknown mlp", TRN, ["--mlp", "gelu"], 2, "argument --mlp: invalid choice"),
    ("batch ramp without micro-steps", TRN, [*TRAIN_SMALL, "--micro-batch", "4", "--tokens-per-step", "256",
                                            "--batch-ramp", "5"], 2, "--batch-ramp halves a step's micro-steps"),
    ("nonsense train_step pin", TRN, [*TRAIN_SMALL, "--machine", "train_step=fp8"], 2,
     "train_step=fp8 is not fp32, bf16"),
    ("export of a corrupt checkpoint", CNV, ["to-hf", "{ws}/corrupt.ckpt", "--out", "{ws}/hf"], 1, "is corrupt"),
    ("tokenizer input missing", TOK, ["train", "--input", "{ws}/none.txt"], 2, "input file(s) not found"),
    ("tokenizer vocab too small", TOK, ["train", "--input", "{ws}/small/0.txt", "--vocab-size", "10"], 2,
     "at least 258"),
]


def assert_one_error_line(stderr: str, message: str) -> None:
    """The contract: exactly one `error:` line (ours, or argparse's `prog: error:`), naming the problem, and no
    traceback. Progress bars and warnings may come before it, as many as the machine's speed makes."""
    errors = [line for line in re.split(r"[\r\n]", stderr) if re.match(r"^(\S+: )?error: ", line)]
    assert len(errors) == 1 and message in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr


def snapshot(root: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, ws):
    name, script, args, code, message = case
    args = [a.replace("{ws}", str(ws)) for a in args]
    before = snapshot(ws)
    limit = limit_file_size(100_000) if name == "disk full during save" else None
    done = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit)
    assert done.returncode == code, done.stderr[-2000:]
    assert_one_error_line(done.stderr, message)
    after = snapshot(ws)
    changed = [p for p, digest in before.items() if after.get(p) != digest]
    # A run that got as far as an evaluation may redraw its loss plot, whole; nothing else may change.
    redrawn = [p for p in changed if p.name == "loss.png" and p.read_bytes()[-8:-4] == b"IEND"]
    assert changed == redrawn, changed
    if name == "nan loss":
        ckpt = load_checkpoint(ws / "new" / "nan" / "last.ckpt")
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
        assert ckpt["step"] >= 1


def test_debug_shows_the_traceback(ws):
    done = subprocess.run([sys.executable, "inference.py", "--checkpoint", str(ws / "corrupt.ckpt"), "--debug"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" in done.stderr
