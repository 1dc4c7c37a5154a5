"""GGUF, llama.cpp's file format, in and out: a llama GGUF as our checkpoint dict (its quantized blocks kept on
request), and any of our checkpoints as a llama GGUF (F32, F16, Q8_0, Q4_0) that llama.cpp, ollama and
transformers load, with its byte-level BPE tokenizer."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from config import ModelConfig
from quantize import GGUF_BLOCK_BYTES

SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
KEPT_GGUF_TYPES = tuple(GGUF_BLOCK_BYTES)  # what the quantized layers run as they are (--keep-quantized)
WRITTEN_GGUF_TYPES = ("F32", "F16", "Q8_0", "Q4_0")


class GGUFError(ValueError):
    """The message names the file, the problem and the fix."""


# ours are HF Llama's names without the leading "model."
GGUF_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
              "output.weight": "lm_head.weight"}
GGUF_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj"}


# --- in ---------------------------------------------------------------------------------------------
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
        raise GGUFError(f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2')")
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
        raise GGUFError(f"GGUF pre-tokenizer {pre!r} is not supported; known: "
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
        raise GGUFError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise GGUFError(f"{path} is not a readable GGUF file ({e})") from None
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r} is not supported; only 'llama' (Llama, SmolLM2)")
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_GGUF_TYPES:
            raise GGUFError(f"{path}: tensor {t.name} has quantization type {t.tensor_type.name}, which is not "
                               f"supported; supported: {', '.join(SUPPORTED_GGUF_TYPES)}; re-quantize it to one")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFError(f"{path} holds no tokenizer (tokenizer.ggml.tokens); it cannot be used alone")
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




# --- out -----------------------------------------------------------------------------------------------
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7}  # llama.cpp's LLAMA_FTYPE_ALL_F32, MOSTLY_F16, ...


def write_gguf(ckpt: dict, path: Path, weight_type: str = "F16") -> None:
    """Write a checkpoint dict as a llama GGUF: the matrices in weight_type (norms stay F32), q and k rows in
    llama.cpp's interleaved RoPE order, the tokenizer as byte-level BPE with its pre-tokenizer's llama.cpp
    name. Written to a temp file and renamed, so a failed export leaves no torn file."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    if weight_type not in WRITTEN_GGUF_TYPES:
        raise GGUFError(f"GGUF weight type {weight_type!r} cannot be written; choose {', '.join(WRITTEN_GGUF_TYPES)}")
    config = ModelConfig(**ckpt["config"])
    if config.levers:
        raise GGUFError(f"this model has {', '.join(config.levers)}, which llama.cpp's llama architecture has no "
                        f"place for; export it with to-hf, or train without those config levers")
    qtype = GGMLQuantizationType[weight_type]
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(tmp), "llama")
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.ffn_hidden)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(FILE_TYPES[weight_type])
    add_tokenizer(writer, ckpt, config.vocab_size)
    ours_to_gguf = {ours: name for name, ours in GGUF_NAMES.items()}
    layer_part = {hf: part for part, hf in GGUF_LAYER_NAMES.items()}
    for ours, tensor in ckpt["model"].items():
        if ours == "lm_head.weight" and config.tie_embeddings:
            continue  # llama.cpp ties the head to token_embd when output.weight is absent
        w = tensor.float().numpy()
        if ours.startswith("layers."):
            _, layer, rest = ours.split(".", 2)
            module, suffix = rest.rsplit(".", 1)
            part = layer_part[module]
            name = f"blk.{layer}.{part}.{suffix}"
            heads = {"attn_q": config.n_head, "attn_k": config.n_kv_head}.get(part)
            if heads:
                w = permute_rope(w, heads)
        else:
            name = ours_to_gguf[ours]
        if w.ndim == 1 or weight_type == "F32":
            writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
        elif weight_type == "F16":
            writer.add_tensor(name, w.astype(np.float16))
        else:
            if w.shape[-1] % 32:
                raise GGUFError(f"{name} has rows of {w.shape[-1]} values, not a multiple of 32, which {weight_type} "
                                f"blocks need; export as F16 or F32")
            writer.add_tensor(name, quantize(w, qtype), raw_dtype=qtype)  # shape: from the bytes per row
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise GGUFError(f"could not write {path}: {e.strerror}; free disk space and retry") from None


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved ones (what unpermute_rope undoes)."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_tokenizer(writer, ckpt: dict, vocab_size: int) -> None:
    """The tokenizer.json's byte-level BPE as GGUF metadata: tokens by id (padded to the model's vocabulary with
    unused ones), their types, the merges, the pre-tokenizer's llama.cpp name, end of text, chat template."""
    spec = json.loads(ckpt["tokenizer"])
    model = spec["model"]
    if model.get("type") != "BPE":
        raise GGUFError(f"the tokenizer is {model.get('type')}, not byte-level BPE; GGUF export needs BPE")
    vocab = dict(model["vocab"]) | {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # UNUSED, for ids the tokenizer never makes
    for token, i in vocab.items():
        tokens[i], types[i] = token, 3 if token in special else 1  # CONTROL or NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer") or {}))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    writer.add_add_bos_token(False)  # our models train without a start token
    if ckpt.get("eos_token") in vocab:
        writer.add_eos_token_id(vocab[ckpt["eos_token"]])
    if ckpt.get("chat_template"):
        writer.add_chat_template(ckpt["chat_template"])


def pre_tokenizer_name(pre: dict) -> str:
    """The llama.cpp pre-tokenizer that splits text as this tokenizer.json does (what gguf_tokenizer_json reads)."""
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    raise GGUFError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) has no llama.cpp equivalent; "
                    f"GGUF export supports GPT-2's, SmolLM2's and Llama 3's")
