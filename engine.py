"""Generation: one engine with continuous batching, used by every script (inference, serve, app, bench, train).

Each step is schedule -> run -> retire: the scheduler (scheduler.py) admits waiting requests into free cache
rows and cuts the step's prompt chunks; the runner (runner.py) runs them and a decode token for every running
row in one pass, and samples; the engine then retires rows that hit end-of-text, a stop string or
max_new_tokens, which frees them for the next admission. Each request has its own sampling settings and
random generator, so what it generates does not depend on what else is in the batch, or when it was admitted.
With a prefix cache (prefix_cache.py), a prompt's rows start from the kept KV blocks of the prompts before it.

  rows, stats = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=20)      # a list of prompts
  engine = Engine(model, rows=32, max_len=512, tokenizer=tok)                 # or requests as they come
  for request in engine.run(Request(ids, 64) for ids in prompts): ...
"""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator

import torch

from model import GPT
from prefix_cache import PrefixCache
from runner import ModelRunner
from scheduler import LengthError, Request, Scheduler, Sequence, check_lengths
from tokenizer import StreamDecoder, Tokenizer


class Engine:
    def __init__(self, model: GPT, *, rows: int, max_len: int, tokenizer: Tokenizer | None = None,
                 eos_id: int | None = None, step: str = "auto", batching: str = "continuous",
                 prefill_tokens: int = 256, use_cache: bool = True, prefix_cache_mb: int = 0,
                 kv_cache_dtype: str = "auto"):
        """rows: sequences generated at once. max_len: the longest prompt + new tokens of any request.
        step: how the runner runs a pass (runner.py): auto (fused where it runs), fused, eager or compiled.
        use_cache=False recomputes every sequence whole at every step (for comparison only). prefix_cache_mb:
        keep the KV blocks of prompts, up to this many MiB, for later prompts that begin the same way.
        kv_cache_dtype int8: K and V in 8 bits (fused step only; runner.py)."""
        self.scheduler = Scheduler(rows, max_len, batching, prefill_tokens, whole_prompts=not use_cache)
        self.runner = ModelRunner(model, rows, max_len, step, use_cache, kv_cache_dtype)
        self.prefix = PrefixCache(prefix_cache_mb << 20) if prefix_cache_mb > 0 and use_cache else None
        self.model, self.tok, self.max_len, self.batching = model, tokenizer, max_len, batching
        self.eos_id = tokenizer.eos_id if eos_id is None and tokenizer is not None else eos_id
        # prefill_s: whole steps (schedule, pass, sampling, detokenizing) with prompt chunks only; decode_s: steps
        # that made tokens (chunks may ride along); compile_s: torch.compile's time in them, left out of both
        # drafted / accepted: speculative draft tokens verified, and those kept; finished: requests by reason
        self.stats = {"prefill_tokens": 0, "prefill_s": 0.0, "new_tokens": 0, "decode_s": 0.0, "steps": 0,
                      "decode_steps": 0, "decoded_row_steps": 0, "compile_s": 0.0, "drafted": 0, "accepted": 0,
                      "finished": Counter()}

    # --- the public surface ------------------------------------------------------------------------
    def add(self, request: Request) -> Request:
        """Queue a request (any thread). One that cannot fit is refused here, with the reason."""
        if request.stop and self.tok is None:
            raise ValueError("stop strings need the engine's tokenizer")
        self.scheduler.add(request)
        return request

    @property
    def rows(self) -> int:
        return len(self.scheduler.running)

    def active(self) -> int:
        return self.scheduler.active()

    def queued(self) -> int:
        return self.scheduler.queued()

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One iteration: schedule, run, retire. Returns the requests that finished in it."""
        t0 = time.perf_counter()
        finished: list[Request] = []
        for seq in self.scheduler.cancelled():
            self._finish(seq, "cancelled", finished)
        admitted, given_up = self.scheduler.admit()
        for request in given_up:
            request.finish_reason, request.finished_at = "cancelled", time.perf_counter()
            self.stats["finished"]["cancelled"] += 1
            finished.append(request)
        for seq in admitted:
            seq.decoder = StreamDecoder(self.tok) if self.tok is not None else None
            if self.prefix is not None and not seq.request.echo:  # its prefill starts after the blocks kept
                seq.filled = self.prefix.reuse(seq.request.prompt, self.runner.kv_cache, seq.row)
        batch = self.scheduler.schedule()
        if batch is not None:
            compiling = self.runner.compile_seconds
            logits = self.runner.forward(batch, self.scheduler.running)
            running = self.scheduler.running
            for b, part in logits.scored.items():  # the logits at prompt token j score prompt token j + 1
                row, start, chunk = batch.chunks[b]
                r = running[row].request
                r.token_logprobs += [None] if start == 0 else []
                r.token_logprobs += [logprob(part[j], r.prompt[start + j + 1], r.logprobs)
                                     for j in range(len(chunk)) if start + j + 1 < len(r.prompt)]
            done = self.scheduler.advance(batch)
            prompted = [running[batch.chunks[b][0]] for b in done]
            if self.prefix is not None:
                for seq in prompted:
                    self.prefix.keep(seq.request.prompt, self.runner.kv_cache, seq.row)
            prompt_ends = logits.chunks[done] if done else None  # the logits each finished prompt ends on
            first = self.runner.sample(prompted, prompt_ends) if done else []
            live = [running[row] for row in batch.sampled]
            taken = [[t] for t in self.runner.sample(live, logits.decode)] if live else []
            verified = [running[row] for row, _, _ in batch.verify]
            for seq, (_, _, tokens), verify_logits in zip(verified, batch.verify, logits.verify):
                taken.append(self.runner.accept(seq, tokens[1:], verify_logits))
                kept = len(taken[-1]) - 1
                self.stats["drafted"] += len(tokens) - 1
                self.stats["accepted"] += kept
                # The next draft: twice as long after a whole draft was kept, one past what was kept otherwise,
                # so that a row whose drafts keep failing verifies few tokens (each costs a row of the pass).
                seq.draft_len = min(seq.request.speculate, 2 * seq.draft_len if kept == len(tokens) - 1 else kept + 1)
            # each token with the logits it was drawn from (for its log-probability)
            drawn_from = [*(logits.decode[i:i + 1] for i in range(len(live))), *logits.verify,
                          *(prompt_ends[i:i + 1] for i in range(len(prompted)))]
            for seq, tokens, rows in zip(live + verified + prompted, taken + [[t] for t in first], drawn_from):
                for token, row in zip(tokens, rows):  # a draft's tokens, in order, until one retires the row
                    if seq.request.finish_reason is None:
                        self._take(seq, token, finished, row)
            compiled = self.runner.compile_seconds - compiling
            self.stats["compile_s"] += compiled
            self.stats["decode_s" if live or verified else "prefill_s"] += time.perf_counter() - t0 - compiled
            self.stats["prefill_tokens"] += sum(len(c) for _, _, c in batch.chunks)
            if live or verified:
                self.stats["decode_steps"] += 1
                self.stats["decoded_row_steps"] += len(live) + len(verified)
        self.stats["steps"] += 1
        return finished

    def run(self, requests: Iterable[Request]) -> Iterator[Request]:
        """Generate for requests as they come, pulling the next ones only as rows free up (so an endless
        stream runs in bounded memory). Yields each request when it finishes, in finishing order."""
        pending = iter(requests)
        exhausted = False
        while True:
            while not exhausted and self.queued() < self.scheduler.free_rows():
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
        for seq in self.scheduler.running:
            if seq is not None:
                seq.request.error = error
                self._finish(seq, "error", finished)
        return finished

    def summary(self) -> dict:
        """The stats, with the slot utilisation (generated tokens / (decode steps x rows))."""
        s = dict(self.stats)
        s["slot_utilisation"] = s["decoded_row_steps"] / max(1, s["decode_steps"] * self.rows)
        s["prefix_cache"] = self.prefix.summary() if self.prefix is not None else None
        return s

    # --- retiring -------------------------------------------------------------------------------------
    def _take(self, seq: Sequence, token: int, finished: list[Request], logits: torch.Tensor) -> None:
        """A new token for a sequence (drawn from `logits`): end-of-text, a stop string or the length limit
        retire it."""
        r = seq.request
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
            if r.on_first_token is not None:
                r.on_first_token(r)
        if token == self.eos_id and not r.ignore_eos:
            return self._finish(seq, "stop", finished)
        if r.constraint is not None:
            r.constraint.take(token)
        r.tokens.append(token)
        if r.logprobs is not None:
            r.token_logprobs.append(logprob(logits, token, r.logprobs))
        seq.next_token = token
        self.stats["new_tokens"] += 1
        if seq.decoder is not None:
            seq.text += seq.decoder.push(token)
            if self._stream(seq):
                return self._finish(seq, "stop", finished)
        if r.constraint is not None and r.constraint.done:  # the JSON is whole: nothing else may come
            return self._finish(seq, "stop", finished)
        if len(r.tokens) == r.max_new_tokens:
            self._finish(seq, "length", finished)

    def _stream(self, seq: Sequence) -> bool:
        """Send on_text what is certain: not a possible start of a stop string. True when a stop string is in."""
        r = seq.request
        hits = [j for j in (seq.text.find(s) for s in r.stop) if j >= 0]
        if hits:
            seq.text = seq.text[:min(hits)]
        held = 0 if hits else max((n for s in r.stop for n in range(1, len(s)) if seq.text.endswith(s[:n])),
                                  default=0)
        if r.on_text is not None and len(seq.text) - held > seq.sent:
            r.on_text(seq.text[seq.sent:len(seq.text) - held])
        seq.sent = max(seq.sent, len(seq.text) - held)
        return bool(hits)

    def _finish(self, seq: Sequence, reason: str, finished: list[Request]) -> None:
        r = seq.request
        if seq.decoder is not None:  # the whole decode, as the tokenizer gives it, cut before a stop string
            text = self.tok.decode(r.tokens)
            r.text = text[:min([j for j in (text.find(s) for s in r.stop) if j >= 0], default=len(text))]
            if r.on_text is not None and r.text.startswith(seq.text[:seq.sent]) and len(r.text) > seq.sent:
                r.on_text(r.text[seq.sent:])
        r.finish_reason, r.finished_at = reason, time.perf_counter()
        self.stats["finished"][reason] += 1
        self.scheduler.free(seq)
        finished.append(r)


def logprob(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """A token's log-probability under the model's own distribution (before temperature or top-k/p), and the
    `top` most likely (id, log-probability) pairs."""
    logprobs = logits.float().log_softmax(dim=-1)
    best = logprobs.topk(top) if top else None
    return logprobs[token].item(), list(zip(best.indices.tolist(), best.values.tolist())) if top else []


class EngineLoop:
    """An engine that steps whenever it has work, for servers: submit() from any thread; each request streams
    through its on_text and ends with its on_done. A step that raises fails the requests in it, not the loop.
    Run it in the process's main thread (run_forever) and serve HTTP from another: the step's threads spin at
    their barriers only while no other thread has threads of its own, and a second team of threads (an engine
    stepping in another thread, with the main thread's team idle) made the fused step 2x slower here."""

    def __init__(self, engine: Engine):
        self.engine, self.wake = engine, threading.Event()

    def submit(self, request: Request) -> Request:
        self.engine.add(request)
        self.wake.set()
        return request

    def start(self) -> EngineLoop:
        """Step in a background thread instead (tests, notebooks)."""
        threading.Thread(target=self.run_forever, daemon=True, name="engine").start()
        return self

    def run_forever(self) -> None:
        while True:
            if not self.engine.has_work():
                self.wake.wait(timeout=0.5)  # with a timeout: Ctrl-C reaches the main thread
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
             batch_size: int | None = None, step: str = "auto") -> tuple[list[list[int]], dict]:
    """New token ids for each prompt, in input order, and the engine's stats: a thin call into Engine.
    A row stops at eos_id (not returned) or after max_new_tokens. Prompt i samples with seed + i."""
    if not prompts:
        raise ValueError("no prompts to generate for")
    longest = max(len(p) for p in prompts) + max_new_tokens
    for p in prompts:
        check_lengths(len(p), max_new_tokens, model.config.max_seq_len)
    engine = Engine(model, rows=batch_size or len(prompts), max_len=longest, eos_id=eos_id, step=step)
    requests = [Request(p, max_new_tokens, temperature, top_k, top_p, None if seed is None else seed + i)
                for i, p in enumerate(prompts)]
    for _ in engine.run(requests):
        pass
    return [r.tokens for r in requests], engine.summary()


def encode_prompts(tok: Tokenizer, prompts: list[str], max_new_tokens: int, context: int,
                   chat: bool = False, truncate: bool = False) -> list[list[int]]:
    """Token ids per prompt (wrapped in the chat template with chat=True), each checked to fit the context
    with its new tokens. An empty prompt is an error; so is an over-long one, unless truncate=True keeps its
    last tokens. Errors name the prompt (1-based), not a flag."""
    for i, text in enumerate(prompts):
        if not text:
            raise ValueError(f"prompt {i + 1} is empty; give at least one character of text")
    if chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": text}]) for text in prompts]
    check_lengths(1, max_new_tokens, context)
    encoded = []
    for i, ids in enumerate(tok.encode_batch(prompts)):
        room = context - max_new_tokens
        if len(ids) > room and truncate:
            print(f"warning: prompt {i + 1} has {len(ids)} tokens; keeping the last {room} so that "
                  f"{max_new_tokens} new tokens fit the {context}-token context", file=sys.stderr)
            ids = ids[-room:]
        try:
            check_lengths(len(ids), max_new_tokens, context)
        except LengthError as e:
            raise LengthError(f"prompt {i + 1}: {e}", e.prompt_too_long) from None
        encoded.append(ids)
    return encoded
