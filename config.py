"""Model configuration: one dataclass, a few named presets, and the CLI helper every script shares."""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, fields, replace

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the names every script takes
STEPS = ("auto", "fused", "eager", "compiled")  # how the engine runs a pass (runner.py)
KV_CACHE_DTYPES = ("auto", "int8")  # auto: the model's dtype; int8: 8 bits a value and a scale a slot (step.cpp)
QUANTIZE = ("auto", "none", "int8", "int4")     # load-time weight formats (checkpoint.load_model)
MLPS = ("swiglu", "relu2")
LEVERS = ("qk_norm", "value_residual", "logit_softcap", "mlp", "unet_skips")  # zero_init is an init: still Llama


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2         # < n_head gives grouped-query attention; == n_head is plain MHA
    d_model: int = 256
    ffn_hidden: int = 704      # SwiGLU inner size
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    # Small-model levers (modded-nanogpt's speedrun found them at this scale), measured side by side in
    # `python -m bench --only recipes`. All off is exactly Llama, as SmolLM2 and GGUF/HF Llama files are.
    qk_norm: bool = False          # RMSNorm on each head's q and k before RoPE (as Qwen3 and OLMo2)
    zero_init: bool = False        # the output projections (o_proj, down_proj) start at zero
    value_residual: bool = False   # each layer's values mix in the first layer's, by a learned weight (ResFormer)
    logit_softcap: float = 0.0     # > 0: logits = cap * tanh(logits / cap) (as Gemma 2)
    mlp: str = "swiglu"            # or "relu2": down(relu(up(x))^2), two matrices instead of three
    unet_skips: bool = False       # the last half of the layers add the first half's outputs back, learned weights

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "ffn_hidden", "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive (got {getattr(self, name)})")
        if not problems:
            if self.d_model % self.n_head:
                problems.append(f"d_model {self.d_model} must be divisible by n_head {self.n_head}")
            elif (self.d_model // self.n_head) % 2:
                problems.append(f"head_dim {self.d_model // self.n_head} must be even for RoPE")
            if self.n_head % self.n_kv_head:
                problems.append(f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")
        if self.mlp not in MLPS:
            problems.append(f"mlp must be one of {', '.join(MLPS)} (got {self.mlp!r})")
        if self.logit_softcap < 0:
            problems.append(f"logit_softcap must be >= 0, 0 for none (got {self.logit_softcap})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout})")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def levers(self) -> list[str]:
        """The levers this config's forward has: none is plain Llama (what step.cpp, GGUF and HF Llama hold)."""
        plain = ModelConfig()
        return [name for name in LEVERS if getattr(self, name) != getattr(plain, name)]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, ModelConfig] = {
    # Trains on a 2-core laptop CPU in about ten minutes (see README for the bits per byte it reaches). A
    # 128-token context and an untied head won 3-minute screening runs against 256 and tied (README).
    "tiny": ModelConfig(max_seq_len=128, tie_embeddings=False),
    # The first seed's TinyStories-style model: 39,987,840 parameters.
    "slm-40m": ModelConfig(vocab_size=4096, n_layer=8, n_head=8, n_kv_head=4, d_model=640,
                           ffn_hidden=1792, max_seq_len=512),
    # Exactly HuggingFaceTB/SmolLM2-135M: 134,515,008 parameters with the tied matrix counted once.
    "smollm2-135m": ModelConfig(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576,
                                ffn_hidden=1536, max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5,
                                tie_embeddings=True, init_std=0.041666666666666664),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """Return preset `name` with `overrides` applied; unknown names and fields raise a clear ValueError."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")
    return replace(PRESETS[name], **overrides)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for every script: a usage error is one line on stderr and exit code 2."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def exit_with_error(error: Exception, debug: bool) -> None:
    """The end of every script's error path: one line on stderr and exit 1 (--debug: the traceback)."""
    if debug:
        raise error
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


def positive(kind: type, zero: bool = False):
    """An argparse type: int or float that must be > 0 (or >= 0, with zero=True)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'>=' if zero else '>'} 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def device(text: str) -> str:
    """An argparse type for --device: cpu, cuda or cuda:N, where that device exists."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown --device {text!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported --device {text!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"--device {text} but no CUDA GPU is visible; use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"--device {text} but only {torch.cuda.device_count()} GPU(s) are "
                                         f"visible; use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return text


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """--device (the one default: cuda where a GPU is visible, else cpu) and --machine (pin machine.py's choices)."""
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda where a GPU is visible, else cpu)")
    parser.add_argument("--machine", default="", metavar="NAME=VALUE,...",
                        help="pin per-machine choices instead of measuring them (see machine.py), "
                             "e.g. bf16_gemms_in_fp32=0,dense_min_rows=8")


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """How inference.py, serve.py and app.py run a checkpoint. The defaults are the fastest path that keeps the
    checkpoint's own numbers; what changes them (re-quantizing, bf16) is opt-in."""
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="bf16/fp16 change the numbers")
    parser.add_argument("--quantize", choices=QUANTIZE, default="auto",
                        help="auto: the GGUF's own int8/int4 blocks where the checkpoint kept them (its exact "
                             "numbers), else its fp32 weights; int8/int4: re-quantize fp32 weights (changes the "
                             "numbers, see the README's quality table); none: fp32")
    parser.add_argument("--step", choices=STEPS, default="auto",
                        help="auto: the fused C++ step where it runs (CPU; fp32 or int8/int4 weights), else eager; "
                             "compiled: torch.compile of the decode step (minutes to compile the first time)")
    parser.add_argument("--speculate", choices=("none", "ngram"), default="none",
                        help="ngram: draft tokens by finding the last few tokens earlier in the prompt and text, and "
                             "verify them in the same pass (same output; faster where the text repeats its input)")
    parser.add_argument("--draft-tokens", type=positive(int), default=8, help="--speculate ngram: tokens per draft")
    parser.add_argument("--prefix-cache-mb", type=positive(int, zero=True), default=256,
                        help="keep the KV blocks of prompts (up to this many MiB) for later prompts that begin the "
                             "same way, e.g. a shared system prompt; 0: off")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                        help="int8: keep K and V in 8 bits (a quarter of fp32's memory; fused step only; changes the "
                             "numbers slightly, see the README)")
    add_runtime_args(parser)


def add_model_args(parser: argparse.ArgumentParser, default_preset: str = "tiny") -> None:
    """Add --preset and one --field-name override per ModelConfig field (None means 'keep the preset's')."""
    group = parser.add_argument_group("model config (preset plus overrides)")
    group.add_argument("--preset", default=default_preset, choices=list(PRESETS), help="named configuration")
    for f in fields(ModelConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif f.type == "str":
            group.add_argument(flag, dest=f.name, choices=MLPS, default=None)
        else:
            kind = {"int": positive(int), "float": float}[f.type]
            group.add_argument(flag, dest=f.name, type=kind, default=None)


def model_overrides(args: argparse.Namespace) -> dict:
    """The config fields the user set on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(ModelConfig) if getattr(args, f.name, None) is not None}


def config_from_args(args: argparse.Namespace) -> ModelConfig:
    return get_config(args.preset, **model_overrides(args))
