"""Generation: one engine with continuous batching, used by every script (inference, serve, app, bench, train).

The engine owns `rows` rows of the model's KV cache. Every step it
  1. admits waiting requests into free rows (with --batching static: only once every row is free),
  2. prefills their prompts, a chunk of at most `prefill_tokens` tokens per step in all, so that a long prompt
     does not stall the rows that are generating,
  3. runs one decode step over all rows at once (static shapes, so torch.compile and CUDA graphs apply),
  4. retires rows that hit end-of-text, a stop string or max_new_tokens, which frees them for step 1.
Each request has its own sampling settings and random generator, so what it generates does not depend on
what else is in the batch, or on when it was admitted.

  rows, stats = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=20)      # a list of prompts
  engine = Engine(model, rows=32, max_len=512, tokenizer=tok)                 # or requests as they come
  for request in engine.run(Request(ids, 64) for ids in prompts): ...
"""
from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from kernels import compile_decode_step, quantize_model
from model import GPT
from tokenizer import StreamDecoder, Tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model(checkpoint: str, device: str, dtype: str, quantize: str | None = None) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer of a checkpoint; quantize: int8 or int4 weights (a load-time choice)."""
    ckpt = load_checkpoint(checkpoint)
    model, tok = model_from_checkpoint(ckpt, device)
    model = model.to(DTYPES[dtype])
    if quantize:
        quantize_model(model, quantize, ckpt.get("gguf_blocks"))
    return model, tok


def encode_prompts(tok: Tokenizer, prompts: list[str], max_new_tokens: int, context: int,
                   chat: bool = False, truncate: bool = False) -> list[list[int]]:
    """Token ids per prompt (wrapped in the chat template with chat=True). An empty prompt is an error;
    an over-long one is an error too, unless truncate=True keeps its last tokens."""
    for i, text in enumerate(prompts):
        if not text:
            raise ValueError(f"prompt {i + 1} is empty; give at least one character of text")
    if chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": text}]) for text in prompts]
    if max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the "
                         f"{context}-token context window; use at most {context - 1}")
    room = context - max_new_tokens
    encoded = []
    for i, ids in enumerate(tok.encode_batch(prompts)):
        if len(ids) > room:
            if not truncate:
                raise ValueError(f"prompt {i + 1} has {len(ids)} tokens but only {room} fit before "
                                 f"{max_new_tokens} new tokens in the {context}-token context; shorten it, "
                                 f"lower --max-new-tokens, or pass --truncate to keep its end")
            print(f"warning: prompt {i + 1} has {len(ids)} tokens; keeping the last {room} so that "
                  f"{max_new_tokens} new tokens fit the {context}-token context", file=sys.stderr)
            ids = ids[-room:]
        encoded.append(ids)
    return encoded


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy; top-p keeps the smallest set of most
    likely tokens whose probability mass reaches p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # drop a token once the ones before it reach p
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
    on_text: Callable[[str], None] | None = None  # streamed text pieces, whole characters, stop strings held back
    on_done: Callable[[Request], None] | None = None  # called by EngineThread when it finishes
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


class Row:
    """A request in a cache row: how much of its prompt is in the cache, and the token waiting to go in."""

    def __init__(self, request: Request, tok: Tokenizer | None, device: torch.device):
        self.request, self.filled, self.next_token = request, 0, None
        self.generator = None if request.seed is None else torch.Generator(device).manual_seed(request.seed)
        self.decoder = StreamDecoder(tok) if tok is not None else None
        self.text, self.sent = "", 0  # decoded so far; how much of it on_text has had

    @property
    def position(self) -> int:  # the cache slot of next_token
        return len(self.request.prompt) + len(self.request.tokens) - 1


class Engine:
    def __init__(self, model: GPT, *, rows: int, max_len: int, tokenizer: Tokenizer | None = None,
                 eos_id: int | None = None, compile: bool = False, batching: str = "continuous",
                 prefill_tokens: int = 256, use_cache: bool = True):
        """rows: sequences generated at once. max_len: the longest prompt + new tokens of any request.
        use_cache=False recomputes every sequence whole at every step (for comparison only)."""
        if batching not in ("continuous", "static"):
            raise ValueError(f"batching must be 'continuous' or 'static', not {batching!r}")
        self.model, self.tok, self.batching, self.use_cache = model, tokenizer, batching, use_cache
        self.eos_id = tokenizer.eos_id if eos_id is None and tokenizer is not None else eos_id
        self.device = model.rope_cos.device
        self.max_len, self.prefill_tokens = max_len, prefill_tokens
        self.rows: list[Row | None] = [None] * rows
        if use_cache:
            model.setup_kv_cache(rows, max_len)
        self.decode = compile_decode_step(model) if compile and use_cache else model.decode_step
        self.compiled = compile and use_cache
        self.waiting: deque[Request] = deque()
        self.lock = threading.Lock()  # add() may come from other threads
        # prefill_s: passes with prompt chunks only; decode_s: passes that made tokens (chunks may ride along);
        # compile_s: torch.compile's time in them, left out of both
        self.stats = {"prefill_tokens": 0, "prefill_s": 0.0, "new_tokens": 0, "decode_s": 0.0, "steps": 0,
                      "decode_steps": 0, "decoded_row_steps": 0, "compile_s": 0.0}

    # --- the public surface ------------------------------------------------------------------------
    def add(self, request: Request) -> Request:
        """Queue a request (any thread). A prompt that cannot fit is refused here, with the reason."""
        if not request.prompt:
            raise ValueError("every prompt needs at least one token")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1 (got {request.max_new_tokens})")
        if len(request.prompt) + request.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({len(request.prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) "
                             f"exceeds the engine's {self.max_len}-token rows")
        if request.stop and self.tok is None:
            raise ValueError("stop strings need the engine's tokenizer")
        request.submitted = time.perf_counter()
        with self.lock:
            self.waiting.append(request)
        return request

    def active(self) -> int:
        return sum(row is not None for row in self.rows)

    def queued(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.active() > 0

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One scheduler iteration; returns the requests that finished in it."""
        finished: list[Request] = []
        for i, row in enumerate(self.rows):
            if row is not None and row.request.cancelled:
                self._finish(i, "cancelled", finished)
        self._admit(finished)
        chunks = self._chunks()
        live = [i for i, row in enumerate(self.rows) if row is not None and row.next_token is not None]
        if chunks or live:
            self._forward(chunks, live, finished)
        self.stats["steps"] += 1
        return finished

    def run(self, requests: Iterable[Request]) -> Iterator[Request]:
        """Generate for requests as they come, pulling the next ones only as rows free up (so an endless
        stream runs in bounded memory). Yields each request when it finishes, in finishing order."""
        pending = iter(requests)
        exhausted = False
        while True:
            while not exhausted and self.queued() < self.rows.count(None):
                request = next(pending, None)
                if request is None:
                    exhausted = True
                else:
                    self.add(request)
            if not self.has_work():
                return
            yield from self.step()

    def abort(self, error: str) -> list[Request]:
        """Fail every request in a row (after a step raised), freeing the rows; queued ones stay queued."""
        finished: list[Request] = []
        for i, row in enumerate(self.rows):
            if row is not None:
                row.request.error = error
                self._finish(i, "error", finished)
        return finished

    def summary(self) -> dict:
        """The stats, with the rates and the slot utilisation (generated tokens / (decode steps x rows))."""
        s = dict(self.stats)
        s["slot_utilisation"] = s["decoded_row_steps"] / max(1, s["decode_steps"] * len(self.rows))
        return s

    # --- the scheduler -------------------------------------------------------------------------------
    def _admit(self, finished: list[Request]) -> None:
        free = [i for i, row in enumerate(self.rows) if row is None]
        if self.batching == "static" and len(free) < len(self.rows):
            return  # a static batch admits only when every row of the last one is done
        with self.lock:  # the lowest rows first: a decode step spans rows up to the highest one in use
            while free and self.waiting:
                self.rows[free[0]] = Row(self.waiting.popleft(), self.tok, self.device)
                if self.rows[free[0]].request.cancelled:  # given up while it waited
                    self._finish(free[0], "cancelled", finished)
                else:
                    free.pop(0)

    def _chunks(self) -> list[tuple[int, int, list[int]]]:
        """(row, first slot, tokens) of the next chunk of every prompt still going in: at most prefill_tokens
        tokens in all (at least one chunk), or whole prompts without the cache."""
        chunks, budget = [], self.prefill_tokens
        for i, row in enumerate(self.rows):
            left = 0 if row is None else len(row.request.prompt) - row.filled
            if left > 0 and (budget > 0 or not chunks):
                take = left if not self.use_cache else min(left, max(budget, 1))
                chunks.append((i, row.filled, row.request.prompt[row.filled:row.filled + take]))
                budget -= take
        return chunks

    def _forward(self, chunks: list[tuple[int, int, list[int]]], live: list[int], finished: list[Request]) -> None:
        """One pass for the step: the prompt chunks and a token for every row that has one waiting share the
        read of the weights. The decode part spans the rows up to the highest one in use (all rows when
        compiled: static shapes); a row there without a token writes a slot that is written again before it is
        read: a free row its slot 0, a prompt still going in the slot after its chunk. The compiled decode step
        takes the decode part alone, after the chunks."""
        t0, compiling = time.perf_counter(), getattr(self.model, "compile_seconds", 0.0)
        ahead = {i: len(c) for i, _, c in chunks}
        decode = prefill = decode_logits = prefill_logits = None
        if chunks:
            prefill = ([c for _, _, c in chunks], [i for i, _, _ in chunks], [s for _, s, _ in chunks])
        if not self.use_cache:
            if prefill:
                prefill_logits = self._logits_without_cache([self.rows[i].request.prompt for i in prefill[1]])
            if live:
                decode_logits = torch.zeros(len(self.rows), self.model.config.vocab_size, device=self.device)
                decode_logits[live] = self._logits_without_cache(
                    [self.rows[i].request.prompt + self.rows[i].request.tokens for i in live])
        else:
            span = len(self.rows) if self.compiled else 1 + max(i for i, row in enumerate(self.rows) if row)
            if live:
                rows = self.rows[:span]
                tokens = [0 if row is None or row.next_token is None else row.next_token for row in rows]
                positions = [0 if row is None else row.position if row.next_token is not None else
                             row.filled + ahead.get(i, 0) for i, row in enumerate(rows)]
                decode = (torch.tensor(tokens, device=self.device), torch.tensor(positions, device=self.device))
            need = max([row.filled + ahead.get(i, 0) for i, row in enumerate(self.rows) if row is not None] +
                       [row.position + 1 for row in self.rows if row is not None and row.next_token is not None])
            length = self.max_len if self.compiled else min(self.max_len, -(-need // 64) * 64)
            kv = self.model.kv_cache if length == self.max_len and span == len(self.rows) else \
                [(k[:span, :, :length], v[:span, :, :length]) for k, v in self.model.kv_cache]
            if self.compiled:
                if prefill:
                    prefill_logits = self.model.step(kv, prefill=prefill)[1]
                if decode:
                    decode_logits = self.decode(*decode, kv)
            else:
                decode_logits, prefill_logits = self.model.step(kv, decode, prefill)
        done = []
        for b, (i, start, chunk) in enumerate(chunks):
            self.rows[i].filled = start + len(chunk)
            if self.rows[i].filled == len(self.rows[i].request.prompt):
                done.append(b)
        first = self._sample([chunks[b][0] for b in done], prefill_logits[done]) if done else []
        nexts = self._sample(live, decode_logits[live]) if live else []
        compiled = getattr(self.model, "compile_seconds", 0.0) - compiling
        self.stats["compile_s"] += compiled
        self.stats["decode_s" if live else "prefill_s"] += time.perf_counter() - t0 - compiled
        self.stats["prefill_tokens"] += sum(len(c) for _, _, c in chunks)
        if live:
            self.stats["decode_steps"] += 1
            self.stats["decoded_row_steps"] += len(live)
        for i, token in zip(live, nexts):
            self._take(i, token, finished)
        for b, token in zip(done, first):
            self._take(chunks[b][0], token, finished)

    def _logits_without_cache(self, sequences: list[list[int]]) -> torch.Tensor:
        """Next-token logits of whole sequences, recomputed from scratch (right padding is causal-safe)."""
        width = max(len(s) for s in sequences)
        idx = torch.tensor([s + [0] * (width - len(s)) for s in sequences], device=self.device)
        logits, _ = self.model(idx)
        return logits[torch.arange(len(sequences)), torch.tensor([len(s) - 1 for s in sequences])]

    def _sample(self, indices: list[int], logits: torch.Tensor) -> list[int]:
        """Next token of each of these rows (logits (n, vocab)): the greedy ones from one argmax, the others
        each with its own settings and generator. Reading them back waits for the device."""
        greedy = logits.argmax(dim=-1).tolist()
        tokens = []
        for b, i in enumerate(indices):
            r, generator = self.rows[i].request, self.rows[i].generator
            tokens.append(greedy[b] if r.temperature == 0 else
                          int(sample_next(logits[b:b + 1], r.temperature, r.top_k, r.top_p, generator)[0]))
        return tokens

    def _take(self, i: int, token: int, finished: list[Request]) -> None:
        """A new token for row i: end-of-text, a stop string or the length limit retire the row."""
        row = self.rows[i]
        r = row.request
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        if token == self.eos_id and not r.ignore_eos:
            return self._finish(i, "stop", finished)
        r.tokens.append(token)
        row.next_token = token
        self.stats["new_tokens"] += 1
        if row.decoder is not None:
            row.text += row.decoder.push(token)
            if self._stream(row):
                return self._finish(i, "stop", finished)
        if len(r.tokens) == r.max_new_tokens:
            self._finish(i, "length", finished)

    def _stream(self, row: Row) -> bool:
        """Send on_text what is certain: not a possible start of a stop string. True when a stop string is in."""
        r = row.request
        hits = [j for j in (row.text.find(s) for s in r.stop) if j >= 0]
        if hits:
            row.text = row.text[:min(hits)]
        held = 0 if hits else max((n for s in r.stop for n in range(1, len(s)) if row.text.endswith(s[:n])),
                                  default=0)
        if r.on_text is not None and len(row.text) - held > row.sent:
            r.on_text(row.text[row.sent:len(row.text) - held])
        row.sent = max(row.sent, len(row.text) - held)
        return bool(hits)

    def _finish(self, i: int, reason: str, finished: list[Request]) -> None:
        row = self.rows[i]
        r = row.request
        if row.decoder is not None:  # the whole decode, as the tokenizer gives it, cut before a stop string
            text = self.tok.decode(r.tokens)
            r.text = text[:min([j for j in (text.find(s) for s in r.stop) if j >= 0], default=len(text))]
            if r.on_text is not None and r.text.startswith(row.text[:row.sent]) and len(r.text) > row.sent:
                r.on_text(r.text[row.sent:])
        r.finish_reason, r.finished_at = reason, time.perf_counter()
        self.rows[i] = None
        finished.append(r)


class EngineThread:
    """An engine stepping in a background thread, for servers: submit() from any thread; each request streams
    through its on_text and ends with its on_done. A step that raises fails the requests in it, not the thread."""

    def __init__(self, engine: Engine):
        self.engine, self.wake = engine, threading.Event()
        threading.Thread(target=self._loop, daemon=True, name="engine").start()

    def submit(self, request: Request) -> Request:
        self.engine.add(request)
        self.wake.set()
        return request

    def _loop(self) -> None:
        while True:
            if not self.engine.has_work():
                self.wake.wait()
                self.wake.clear()
                continue
            try:
                finished = self.engine.step()
            except Exception as e:  # noqa: BLE001 - reported to each request's caller
                finished = self.engine.abort(f"{type(e).__name__}: {e}")
            for request in finished:
                if request.on_done is not None:
                    request.on_done(request)


def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float = 1.0, eos_id: int | None = None, seed: int | None = None,
             batch_size: int | None = None, compile: bool = False, use_cache: bool = True,
             batching: str = "continuous") -> tuple[list[list[int]], dict]:
    """New token ids for each prompt, in input order, and the engine's stats: a thin call into Engine.
    A row stops at eos_id (not returned) or after max_new_tokens. Prompt i samples with seed + i."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > model.config.max_seq_len:
        raise ValueError(f"prompt ({longest - max_new_tokens}) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"context window of {model.config.max_seq_len} tokens")
    engine = Engine(model, rows=batch_size or len(prompts), max_len=longest, eos_id=eos_id, compile=compile,
                    use_cache=use_cache, batching=batching)
    requests = [Request(p, max_new_tokens, temperature, top_k, top_p, None if seed is None else seed + i)
                for i, p in enumerate(prompts)]
    for _ in engine.run(requests):
        pass
    return [r.tokens for r in requests], engine.summary()
