"""Byte-level BPE tokenizer over Hugging Face `tokenizers`, saved as a standard tokenizer.json.

python tokenizer.py train --input FILE... --vocab-size 4096 --out data/tokenizer.json
"""
from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from config import ArgumentParser

EOT = "<|endoftext|>"  # separates documents; also the end-of-sequence token for generation
PAD = "<|pad|>"
# Other names an existing tokenizer.json may use for end-of-text / padding (SmolLM2, Llama, GPT-2).
EOS_CANDIDATES = (EOT, "</s>", "<|im_end|>", "<eos>")
PAD_CANDIDATES = (PAD, "<pad>", "[PAD]")


class Tokenizer:
    """Thin wrapper: encode/decode without adding special tokens, plus the special ids."""

    def __init__(self, hf: HFTokenizer, eos_token: str | None = None, chat_template: str | None = None):
        self.hf = hf
        self.chat_template = chat_template
        self.eos_id = self._first_id(([eos_token] if eos_token else []) + list(EOS_CANDIDATES))
        if self.eos_id is None:
            raise ValueError(f"tokenizer has none of the end-of-text tokens {EOS_CANDIDATES}")
        pad = self._first_id(PAD_CANDIDATES)
        self.pad_id = self.eos_id if pad is None else pad  # padding is masked, so any id works

    def _first_id(self, names: Iterable[str]) -> int | None:
        for name in names:
            token_id = self.hf.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path} (train one with `python tokenizer.py train`)")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # the tokenizers error is a bare string from Rust
            raise ValueError(f"cannot read tokenizer {path}: {e}") from None

    @classmethod
    def from_str(cls, json_text: str, eos_token: str | None = None, chat_template: str | None = None) -> Tokenizer:
        return cls(HFTokenizer.from_str(json_text), eos_token, chat_template)

    @classmethod
    def train(cls, texts: Iterable[str] | None = None, files: list[str] | None = None,
              vocab_size: int = 4096, show_progress: bool = True) -> Tokenizer:
        """Train a byte-level BPE on `files` or on an iterator of `texts`."""
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOT, PAD], show_progress=show_progress,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes: any string encodes
        if files is not None:
            hf.train([str(f) for f in files], trainer)
        else:
            hf.train_from_iterator(texts, trainer)
        tok = cls(hf)
        if tok.vocab_size != vocab_size:
            print(f"warning: corpus too small for {vocab_size} tokens; got {tok.vocab_size}", file=sys.stderr)
        return tok

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path))

    def to_str(self) -> str:
        return self.hf.to_str()

    def apply_chat_template(self, messages: list[dict]) -> str:
        """Render a conversation with the model's Jinja chat template, ending with the assistant's turn."""
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat template; drop --chat or use an instruct model")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        eos = self.hf.id_to_token(self.eos_id)
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=True,
                                                          eos_token=eos, bos_token="")

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], batch: int = 256) -> list[list[int]]:
        """Ids of each text, encoded in parallel `batch` at a time (an Encoding holds far more than its ids)."""
        return [e.ids for i in range(0, len(texts), batch)
                for e in self.hf.encode_batch(texts[i:i + batch], add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        # Keep special tokens so that decode(encode(s)) == s even when s contains "<|endoftext|>".
        return self.hf.decode(list(ids), skip_special_tokens=False)


class StreamDecoder:
    """Turns ids that arrive one at a time into text pieces, holding back an incomplete UTF-8 character."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids, self.printed, self.held = tok, [], "", 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        # A character needs at most 4 bytes: wait up to 3 more tokens for its rest, then show it as is.
        if text.endswith("\ufffd") and self.held < 3:
            self.held += 1
            return ""
        self.held = 0
        return self.flush()

    def flush(self) -> str:
        """Whatever is still held back (call at the end of a stream)."""
        text = self.tok.decode(self.ids)
        piece, self.printed = text[len(self.printed):], text
        return piece


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train_p = sub.add_parser("train", help="train a byte-level BPE tokenizer")
    train_p.add_argument("--input", nargs="+", required=True, help="text files to train on")
    train_p.add_argument("--vocab-size", type=int, default=4096, help="tokens, at least 258")
    train_p.add_argument("--out", default="data/tokenizer.json")
    args = parser.parse_args(argv)
    missing = [f for f in args.input if not Path(f).is_file()]
    if missing:
        parser.error(f"input file(s) not found: {', '.join(missing)}")
    if args.vocab_size < 258:
        parser.error("--vocab-size must be at least 258 (256 bytes + 2 special tokens)")
    tok = Tokenizer.train(files=args.input, vocab_size=args.vocab_size)
    tok.save(args.out)
    print(f"saved {tok.vocab_size}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
