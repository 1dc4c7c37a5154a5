"""Structured output: a JSON schema compiled by llguidance into a matcher that says, token by token, which tokens
may come next. The engine's sampling step masks the rest for each constrained row, so constrained and free
requests share a batch. JSON is written compact (no free whitespace), so that a small model cannot spend its
tokens on blanks; `maxLength`, `maxItems`, `minimum` and `maximum` are enforced, so that an answer with bounded
fields always ends."""
from __future__ import annotations

import numpy as np
import torch


class GrammarError(ValueError):
    """A schema the grammar engine cannot compile; the message says why."""


class JsonGrammars:
    """Compiles JSON schemas for one tokenizer and model vocabulary (llguidance's tokenizer is built once)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_id: int):
        from llguidance import LLTokenizer

        self.tokenizer = LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_id)
        self.vocab_size = vocab_size

    def compile(self, schema: dict) -> str:
        """The grammar for a schema (any JSON object for {"type": "object"}), checked; GrammarError if not."""
        from llguidance import LLMatcher

        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except ValueError as e:
            raise GrammarError(str(e)) from None
        error = LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise GrammarError(error)
        return grammar

    def constraint(self, grammar: str) -> JsonConstraint:
        from llguidance import LLMatcher

        return JsonConstraint(LLMatcher(self.tokenizer, grammar), self.vocab_size)


class JsonConstraint:
    """One request's place in its grammar: the tokens allowed next (end-of-text once the JSON is whole)."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: True where a token may come next."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool))

    def copy(self) -> JsonConstraint:
        """A matcher of its own in the same place (for the other choices of a request)."""
        return JsonConstraint(self.matcher.deep_copy(), self.vocab_size)

    def take(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The JSON is whole and nothing may follow but the end of text."""
        return self.matcher.is_stopped()
