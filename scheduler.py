"""The scheduler: which request runs in which cache row, and what each step feeds the model. Plain Python, no tensors.

Every step it
  1. admits waiting requests into free rows, the lowest first (with batching="static": only once every row is
     free), so that an eager step spans as few rows as possible;
  2. cuts the next chunk of each prompt still going in: at most prefill_tokens tokens per step in all, so that a
     long prompt never stalls the rows that are generating;
  3. lists the token waiting in every running row, for the decode part of the same pass; a row that speculates
     instead sends its token with a draft of the tokens that may follow (n-gram lookup in its own prompt and
     text, no draft model), for the runner to verify in the same pass.
runner.py turns the resulting Batch into tensors; engine.py retires the rows that finish.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Request:
    """One prompt to complete, with its own settings. The engine fills in the fields below the line."""
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None                # its own generator; None draws from torch's global one
    stop: tuple[str, ...] = ()             # stop strings (need the engine's tokenizer); not part of the text
    ignore_eos: bool = False
    speculate: int = 0                     # draft tokens per step from n-gram lookup (0: none); same output
    logprobs: int | None = None            # each new token's log-probability and its `logprobs` best alternatives
    echo: bool = False                     # with logprobs: the prompt's tokens' too (its whole prompt is run)
    constraint: object = None              # grammar.JsonConstraint: sampling takes only the tokens it allows
    on_text: Callable[[str], None] | None = None  # streamed text pieces, whole characters, stop strings held back
    on_done: Callable[[Request], None] | None = None  # called by EngineLoop when it finishes
    on_first_token: Callable[[Request], None] | None = None  # called by the engine: its prompt has been run
    id: object = None                      # the caller's own handle
    cancelled: bool = False                # set from any thread: the row is freed at the next step
    # ---
    tokens: list[int] = field(default_factory=list)  # generated ids (end-of-text not included)
    text: str = ""                         # the completion's text, cut before a stop string
    finish_reason: str | None = None       # "stop" (end-of-text or a stop string), "length", "cancelled", "error"
    error: str | None = None               # what failed, with finish_reason "error"
    submitted: float = 0.0                 # time.perf_counter() when added, at its first token, when finished
    first_token_at: float | None = None
    finished_at: float | None = None
    # with logprobs, per token (the prompt's first, with echo, then the new ones): (its log-probability, the
    # best (id, log-probability) pairs); the prompt's first token has None, as nothing comes before it
    token_logprobs: list[tuple[float, list[tuple[int, float]]] | None] = field(default_factory=list)


class LengthError(ValueError):
    """A prompt and its new tokens that do not fit; prompt_too_long tells the two fixes apart (a shorter prompt,
    or fewer new tokens)."""

    def __init__(self, message: str, prompt_too_long: bool):
        super().__init__(message)
        self.prompt_too_long = prompt_too_long


def check_lengths(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    """The one length check, for every caller: a prompt plus its new tokens must fit the context. The message
    names no flag; a script adds its own fix."""
    if prompt_tokens < 1:
        raise LengthError("the prompt is empty; give at least one token", False)
    if max_new_tokens < 1:
        raise LengthError(f"max new tokens must be at least 1 (got {max_new_tokens})", False)
    if max_new_tokens >= context:
        raise LengthError(f"{max_new_tokens} new tokens leave no room for a prompt in the {context}-token "
                          f"context", False)
    if prompt_tokens + max_new_tokens > context:
        raise LengthError(f"the prompt has {prompt_tokens} tokens but only {context - max_new_tokens} fit before "
                          f"{max_new_tokens} new tokens in the {context}-token context", True)


class Sequence:
    """A request in cache row `row`: how much of its prompt is in the cache, the token waiting to go in, and
    what the engine has streamed of its text."""

    def __init__(self, request: Request, row: int):
        self.request, self.row, self.filled, self.next_token = request, row, 0, None
        self.generator = None  # the runner's sampling state, made at the first sampled token
        self.draft_len = request.speculate  # how many tokens its next draft may have (engine.py adapts it)
        self.decoder = None    # the engine's StreamDecoder, where it has a tokenizer
        self.text, self.sent = "", 0  # decoded so far; how much of it on_text has had

    @property
    def position(self) -> int:  # the cache slot of next_token
        return len(self.request.prompt) + len(self.request.tokens) - 1


@dataclass
class Batch:
    """What one step feeds the model."""
    chunks: list[tuple[int, int, list[int]]]  # (row, first slot, prompt tokens) going into the cache
    decode: list[tuple[int, int]]  # (token, slot) of each row below span, when any row has a token waiting
    sampled: list[int]             # the rows of `decode` whose token is real: their logits give the next token
    span: int                      # cache rows in use: 1 + the highest running row
    length: int                    # cache slots in use after this step: the longest row
    verify: list[tuple[int, int, list[int]]] = field(default_factory=list)  # (row, slot, [token, *draft])
    scored: list[bool] = field(default_factory=list)  # per chunk: logits at every token, not the last only (echo)


class Scheduler:
    def __init__(self, rows: int, max_len: int, batching: str = "continuous", prefill_tokens: int = 256,
                 whole_prompts: bool = False):
        """rows: sequences at once. max_len: the longest prompt + new tokens of any request. whole_prompts: a
        prompt goes in whole (no chunks), for the runner that keeps no cache."""
        if batching not in ("continuous", "static"):
            raise ValueError(f"batching must be 'continuous' or 'static', not {batching!r}")
        self.max_len, self.batching = max_len, batching
        self.prefill_tokens, self.whole_prompts = prefill_tokens, whole_prompts
        self.running: list[Sequence | None] = [None] * rows  # by cache row
        self.waiting: deque[Request] = deque()
        self.lock = threading.Lock()  # add() may come from other threads

    def add(self, request: Request) -> None:
        """Queue a request (any thread). One that cannot fit is refused here, with the reason."""
        check_lengths(len(request.prompt), request.max_new_tokens, self.max_len)
        request.submitted = time.perf_counter()
        with self.lock:
            self.waiting.append(request)

    def active(self) -> int:
        return sum(seq is not None for seq in self.running)

    def queued(self) -> int:
        return len(self.waiting)

    def free_rows(self) -> int:
        return self.running.count(None)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.active() > 0

    def cancelled(self) -> list[Sequence]:
        return [seq for seq in self.running if seq is not None and seq.request.cancelled]

    def admit(self) -> tuple[list[Sequence], list[Request]]:
        """Waiting requests into the free rows, the lowest first. Returns the new sequences, and the requests
        that were given up while they waited (they take no row; the engine retires them)."""
        free = [i for i, seq in enumerate(self.running) if seq is None]
        if self.batching == "static" and len(free) < len(self.running):
            return [], []  # a static batch admits only when every row of the last one is done
        admitted, given_up = [], []
        with self.lock:
            while free and self.waiting:
                request = self.waiting.popleft()
                if request.cancelled:
                    given_up.append(request)
                    continue
                row = free.pop(0)
                self.running[row] = Sequence(request, row)
                admitted.append(self.running[row])
        return admitted, given_up

    def schedule(self) -> Batch | None:
        """The next chunk of every prompt still going in, at most prefill_tokens tokens in all (at least one
        chunk; whole prompts with whole_prompts), and the waiting token of every running row. A row of the
        decode part without a token writes a slot that is written again before it is read: a free row its slot
        0, a prompt still going in the slot after this step's chunk."""
        chunks, budget = [], self.prefill_tokens
        for seq in self.running:
            left = 0 if seq is None else len(seq.request.prompt) - seq.filled
            if left > 0 and (budget > 0 or not chunks):
                take = left if self.whole_prompts else min(left, max(budget, 1))
                chunks.append((seq.row, seq.filled, seq.request.prompt[seq.filled:seq.filled + take]))
                budget -= take
        live = [seq for seq in self.running if seq is not None and seq.next_token is not None]
        drafts = {seq.row: draft(seq, self.max_len) for seq in live if seq.request.speculate}
        verify = [(seq.row, seq.position, [seq.next_token, *drafts[seq.row]]) for seq in live if drafts.get(seq.row)]
        sampled = [seq.row for seq in live if not drafts.get(seq.row)]
        if not chunks and not live:
            return None
        ahead = {row: len(c) for row, _, c in chunks}
        span = 1 + max(seq.row for seq in self.running if seq is not None)
        decode = []
        if sampled:  # a verified row's slot here is written again by its draft's pass, before it is read
            for seq in self.running[:span]:
                if seq is None:
                    decode.append((0, 0))
                elif seq.next_token is None:
                    decode.append((0, seq.filled + ahead.get(seq.row, 0)))
                else:
                    decode.append((0 if drafts.get(seq.row) else seq.next_token, seq.position))
        length = max([seq.filled + ahead.get(seq.row, 0) for seq in self.running if seq is not None] +
                     [seq.position + 1 + len(drafts.get(seq.row, ())) for seq in live])
        scored = [self.running[row].request.echo for row, _, _ in chunks]
        return Batch(chunks, decode, sampled, span, length, verify, scored)

    def advance(self, batch: Batch) -> list[int]:
        """Record the batch's chunks as in the cache. Returns the indices of the chunks that completed a prompt."""
        done = []
        for b, (row, start, chunk) in enumerate(batch.chunks):
            seq = self.running[row]
            seq.filled = start + len(chunk)
            if seq.filled == len(seq.request.prompt):
                done.append(b)
        return done

    def free(self, seq: Sequence) -> None:
        self.running[seq.row] = None


def draft(seq: Sequence, max_len: int, longest: int = 3) -> list[int]:
    """Up to request.speculate tokens that may follow: those that followed the latest earlier occurrence of the
    sequence's last n tokens (n from `longest` down to 1) in its prompt and text so far. No more than the tokens
    it may still make, or the cache still holds."""
    r = seq.request
    tokens = r.prompt + r.tokens
    room = min(seq.draft_len, r.max_new_tokens - len(r.tokens) - 1, max_len - len(tokens))
    for n in range(min(longest, len(tokens) - 1), 0, -1) if room > 0 else ():
        key = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == key:
                return tokens[start + n:start + n + room]
    return []
