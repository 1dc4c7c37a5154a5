"""An OpenAI-compatible HTTP server over one engine (engine.py): each request joins the running batch as soon
as a row frees up. The engine runs in a background thread; the event loop never waits on the model.

  python serve.py --checkpoint checkpoints/smollm2-135m-instruct            # http://127.0.0.1:8000/v1
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi!"}]}'

Endpoints: GET /health, GET /metrics (Prometheus), GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (stream or not). One access-log line per request on stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from dataclasses import replace
from itertools import accumulate
from pathlib import Path

import uvicorn
from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from checkpoint import CheckpointError, describe_weights, load_model
from config import ArgumentParser, add_inference_args, positive
from engine import Engine, EngineLoop, LengthError, Request, check_lengths
from grammar import GrammarError, JsonGrammars
from machine import MACHINE, prepare_process
from metrics import Metrics
from tokenizer import Tokenizer

MAX_BODY_BYTES = 1 << 20     # a request body larger than this is refused (413)
MAX_PROMPT_CHARS = 100_000   # and so is a prompt (or all messages) longer than this (400)
MAX_CHOICES = 16             # the most completions of one prompt a request may ask for ('n')
UNSUPPORTED = ("suffix", "tools", "functions", "best_of")
MAX_LOGPROBS = 20            # the most alternatives a token's logprobs may list


class APIError(Exception):
    """Answered as OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(e: APIError) -> JSONResponse:
    kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error",
            500: "server_error"}.get(e.status, "invalid_request_error")
    return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}},
                        status_code=e.status, headers=e.headers)


def number(body: dict, name: str, default, low: float, high: float, integer: bool = False, open_low: bool = False):
    """body[name] (or the default) checked to be a number in [low, high] ((low, high] with open_low)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, not {value!r}", name)
    if value < low or value > high or (open_low and value == low):
        raise APIError(400, f"'{name}' must be in {'(' if open_low else '['}{low}, {high}], not {value}", name)
    return value


def create_app(engine: EngineLoop, tok: Tokenizer, model_name: str, api_key: str | None = None,
               max_queue: int = 256, speculate: bool = False, draft_tokens: int = 8,
               metrics: bool = True) -> FastAPI:
    """The API over an engine thread; speculate: n-gram drafts of draft_tokens for requests that do not say
    ("speculate": "ngram" or "none" in the body); metrics: serve /metrics."""
    async def check_key_and_size(request: HTTPRequest):
        # a dependency, not an @app.middleware: that wrapper hides a client's disconnect from the handler
        if api_key is not None and request.url.path.startswith("/v1/") and \
                request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")

    app = FastAPI(title="slm", docs_url=None, redoc_url=None, dependencies=[Depends(check_key_and_size)])
    created = int(time.time())
    max_len = engine.engine.max_len
    grammars: dict[str, str] = {}  # schema (as JSON text) -> compiled grammar, for the schemas clients repeat
    compiler: list[JsonGrammars] = []  # built at the first request that asks for structured output

    def constraint(body: dict):
        """The JSON grammar response_format asks for (None for plain text), compiled once per schema."""
        form = body.get("response_format")
        if form is None or form == {"type": "text"}:
            return None
        if not isinstance(form, dict) or form.get("type") not in ("json_object", "json_schema") or \
                form["type"] == "json_schema" and not isinstance((form.get("json_schema") or {}).get("schema"), dict):
            raise APIError(400, "'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                                "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                           "response_format")
        schema = {"type": "object"} if form["type"] == "json_object" else form["json_schema"]["schema"]
        key = json.dumps(schema, sort_keys=True)
        if not compiler:
            compiler.append(JsonGrammars(tok.to_str(), engine.engine.model.config.vocab_size, tok.eos_id))
        if key not in grammars:
            try:
                grammars[key] = compiler[0].compile(schema)
            except GrammarError as e:
                raise APIError(400, f"the 'response_format' schema cannot be compiled: {e}",
                               "response_format") from None
            if len(grammars) > 256:
                grammars.pop(next(iter(grammars)))
        return compiler[0].constraint(grammars[key])
    watch = Metrics(engine.engine)

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, e: APIError):
        watch.answered(request.url.path, e.status)
        return error_response(e)

    if metrics:
        @app.get("/metrics")
        async def scrape():
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
            return Response(generate_latest(watch.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health():
        e = engine.engine
        return {"status": "ok", "active_rows": e.active(), "queued": e.queued(), "rows": e.rows,
                "step": e.runner.step, "generated_tokens": e.stats["new_tokens"], "finished": dict(e.stats["finished"]),
                # the engine's own time in passes that made tokens: against a client's gaps, what HTTP costs
                "decode_steps": e.stats["decode_steps"], "decoded_row_steps": e.stats["decoded_row_steps"],
                "decode_s": e.stats["decode_s"],
                "prefix_cache": e.prefix.summary() if e.prefix is not None else None, "machine": MACHINE.summary()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "slm"}]}

    async def read_body(request: HTTPRequest) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if "model" not in body:
            raise APIError(400, "you must provide a model parameter", "model")
        if body["model"] != model_name:
            raise APIError(404, f"the model '{body['model']}' does not exist; this server has '{model_name}'",
                           "model", "model_not_found")
        for name in UNSUPPORTED:
            if body.get(name) not in (None, False) and not (name == "best_of" and body[name] == 1):
                raise APIError(400, f"'{name}' is not supported by this server", name)
        number(body, "n", 1, 1, MAX_CHOICES, integer=True)
        return body

    def generation(body: dict, prompt: str | list[int], default_max: int | None, chat: bool) -> Request:
        """The engine request for a checked body and one prompt (text, or token ids); refuses what the model or
        the queue cannot take."""
        if len(prompt) > MAX_PROMPT_CHARS:
            raise APIError(400, f"the prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
        if not isinstance(prompt, str) and not all(0 <= i < tok.vocab_size for i in prompt):
            raise APIError(400, f"a prompt token id is outside the vocabulary [0, {tok.vocab_size})", "prompt")
        ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
        room = max_len - len(ids)
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        echo = body.get("echo", False)
        if not isinstance(echo, bool) or (echo and chat):
            raise APIError(400, "'echo' must be true or false (completions only)", "echo")
        # max_tokens 0 with echo scores the prompt alone: one token is generated and not returned
        max_tokens = max(1, number(body, name, default_max or max(room, 1), 0 if echo else 1, 1 << 30, integer=True))
        if chat:
            want = body.get("logprobs", False)
            if not isinstance(want, bool):
                raise APIError(400, f"'logprobs' must be true or false, not {want!r}", "logprobs")
            top = number(body, "top_logprobs", 0, 0, MAX_LOGPROBS, integer=True)
            logprobs = top if want else None
        else:
            logprobs = number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
        if echo and logprobs is None:
            logprobs = 0
        if (logprobs is not None or echo) and body.get("stream"):
            raise APIError(400, "'logprobs' and 'echo' are not supported with 'stream'; drop one or the other",
                           "logprobs")
        try:
            check_lengths(len(ids), max_tokens, max_len)
        except LengthError as e:
            fix = f"ask for at most {room} {name}" if room > 0 else "shorten the prompt"
            raise APIError(400, f"{e} of this server; {fix}", "messages" if room < 1 else name) from None
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, "'stop' must be a string or a list of at most 4 non-empty strings", "stop")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise APIError(400, f"'seed' must be an integer, not {seed!r}", "seed")
        top_k = number(body, "top_k", 0, 0, tok.vocab_size, integer=True)
        ignore_eos = body.get("ignore_eos", False)  # vLLM's extension: always max_tokens (benchmarks)
        if not isinstance(ignore_eos, bool):
            raise APIError(400, f"'ignore_eos' must be true or false, not {ignore_eos!r}", "ignore_eos")
        speculating = body.get("speculate", "ngram" if speculate else "none")
        if speculating not in ("ngram", "none"):
            raise APIError(400, f"'speculate' must be \"ngram\" or \"none\", not {speculating!r}", "speculate")
        if engine.engine.queued() >= max_queue:
            raise APIError(429, f"the queue is full ({max_queue} requests waiting); retry in a second",
                           headers={"Retry-After": "1"})
        grammar = constraint(body)  # a constrained row takes no drafts: they would skip its mask
        return Request(ids, max_tokens, number(body, "temperature", 1.0, 0, 2), top_k or None,
                       number(body, "top_p", 1.0, 0, 1, open_low=True), seed=seed, stop=tuple(stop),
                       speculate=draft_tokens if speculating == "ngram" and grammar is None else 0,
                       ignore_eos=ignore_eos, logprobs=logprobs, echo=echo, constraint=grammar)

    def completion_logprobs(g: Request, scored_only: bool) -> dict:
        """The legacy completions shape: each token's text, log-probability, best alternatives and offset in
        the choice's text; with echo the prompt's tokens come first (the very first has no log-probability)."""
        ids = (g.prompt if g.echo else []) + g.tokens
        entries = g.token_logprobs[:-1] if scored_only else g.token_logprobs
        ids = ids[:len(entries)]
        texts = [tok.decode([i]) for i in ids]
        offsets = [0, *accumulate(len(s) for s in texts)][:len(texts)]  # where each token starts
        return {"tokens": texts, "token_logprobs": [e and e[0] for e in entries],
                "top_logprobs": [e and by_text(e[1]) for e in entries], "text_offset": offsets}

    def by_text(best: list[tuple[int, float]]) -> dict[str, float]:
        """The best alternatives by their text; of two ids with one text (a part of a character), the likelier."""
        out: dict[str, float] = {}
        for i, logprob in best:
            out.setdefault(tok.decode([i]), logprob)
        return out

    def chat_logprobs(g: Request) -> dict:
        def entry(i: int, lp: float) -> dict:
            text = tok.decode([i])
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}
        return {"content": [entry(i, lp) | {"top_logprobs": [entry(j, alt) for j, alt in top]}
                            for i, (lp, top) in zip(g.tokens, g.token_logprobs)]}

    async def respond(request: HTTPRequest, body: dict, firsts: list[Request], chat: bool):
        """Run each prompt's request and its n - 1 copies (copy i samples with seed + i), and answer, streamed
        or whole: choice p * n + i is prompt p's copy i. A prompt's copies start once it has been run, so that
        they take its KV blocks from the prefix cache."""
        loop, pieces, n = asyncio.get_running_loop(), asyncio.Queue(), body.get("n", 1)
        groups = [[first] + [replace(first, seed=None if first.seed is None else first.seed + i, tokens=[],
                                     token_logprobs=[], constraint=first.constraint and first.constraint.copy())
                             for i in range(1, n)] for first in firsts]
        gens = [g for group in groups for g in group]
        for i, g in enumerate(gens):
            if body.get("stream"):
                g.on_text = lambda piece, i=i: loop.call_soon_threadsafe(pieces.put_nowait, (i, piece))
            g.on_done = lambda _, i=i: loop.call_soon_threadsafe(pieces.put_nowait, (i, None))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "created": int(time.time()), "model": model_name}
        endpoint = request.url.path
        scored_only = body.get("echo") and body.get("max_tokens") == 0  # the prompt's logprobs, no new token

        async def start(group: list[Request]) -> None:
            prompted, done = asyncio.Event(), group[0].on_done
            group[0].on_first_token = lambda _: loop.call_soon_threadsafe(prompted.set)
            group[0].on_done = lambda r: (done(r), loop.call_soon_threadsafe(prompted.set))
            engine.submit(group[0])
            if len(group) > 1:
                await prompted.wait()
                for g in group[1:]:
                    engine.submit(g)
        await asyncio.gather(*(start(group) for group in groups))

        def usage() -> dict:
            prompt, new = sum(len(g.prompt) for g in firsts), sum(len(g.tokens) for g in gens)
            new -= len(gens) if scored_only else 0
            return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}

        def choice(i: int, text: str | None, finish: str | None, stream: bool) -> dict:
            if not chat:
                g = gens[i]
                if text is not None and g.echo:
                    text = tok.decode(g.prompt) + ("" if scored_only else text)
                logprobs = completion_logprobs(g, scored_only) if g.logprobs is not None and not stream else None
                return {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            if stream:  # a piece of the answer, or (text None) the last chunk, which only says why it ended
                return {"index": i, "delta": {} if text is None else {"content": text}, "finish_reason": finish}
            logprobs = chat_logprobs(gens[i]) if gens[i].logprobs is not None else None
            return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish}

        if body.get("stream"):
            async def events():
                try:
                    kind = "chat.completion.chunk" if chat else "text_completion"
                    if chat:
                        first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                                 for i in range(len(gens))]
                        yield f"data: {json.dumps(head | {'object': kind, 'choices': first})}\n\n"
                    running = len(gens)
                    while running:
                        i, piece = await pieces.get()
                        running -= piece is None
                        if piece is not None or gens[i].finish_reason != "error":
                            # a piece, or a choice's end; the last end also carries the usage of them all
                            end = {"usage": usage()} if not running else {}
                            out = [choice(i, piece, None if piece is not None else gens[i].finish_reason, True)]
                            yield f"data: {json.dumps(head | {'object': kind, 'choices': out} | end)}\n\n"
                    failed = [g.error for g in gens if g.finish_reason == "error"]
                    if failed:
                        yield f"data: {json.dumps({'error': {'message': failed[0], 'type': 'server_error'}})}\n\n"
                    yield "data: [DONE]\n\n"
                    watch.answered(endpoint, 500 if failed else 200, rid, gens, usage())
                except asyncio.CancelledError:
                    watch.answered(endpoint, 499, rid)
                    raise
                finally:  # the client went away (or we are done): its rows are freed at the next step
                    for g in gens:
                        g.cancelled = True
            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            running = len(gens)
            while running:  # wait for the results, but give up the rows if the client disconnects
                try:
                    await asyncio.wait_for(pieces.get(), timeout=0.5)
                    running -= 1
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        watch.answered(endpoint, 499, rid)
                        return JSONResponse({}, status_code=499)
        finally:
            for g in gens:
                g.cancelled = True
        failed = [g.error for g in gens if g.finish_reason == "error"]
        if failed:
            raise APIError(500, f"generation failed: {failed[0]}")
        watch.answered(endpoint, 200, rid, gens, usage())
        kind = "chat.completion" if chat else "text_completion"
        choices = [choice(i, g.text, g.finish_reason, False) for i, g in enumerate(gens)]
        return head | {"object": kind, "choices": choices, "usage": usage()}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await read_body(request)
        prompt = body.get("prompt")
        # a string, token ids, or a list of either: one choice (n choices) per prompt
        prompts = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
        if not all(isinstance(p, str) and p or isinstance(p, list) and p and all(
                isinstance(i, int) and not isinstance(i, bool) for i in p) for p in prompts) or \
                len(prompts) * body.get("n", 1) > MAX_CHOICES:
            raise APIError(400, f"'prompt' must be a non-empty string, a list of token ids, or a list of up to "
                                f"{MAX_CHOICES} of either", "prompt")
        return await respond(request, body, [generation(body, p, 16, chat=False) for p in prompts], chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await read_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in messages):
            raise APIError(400, "'messages' must be a non-empty list of {role: system|user|assistant, content: "
                                "string}", "messages")
        if not tok.chat_template:
            raise APIError(400, "this model has no chat template; use /v1/completions")
        prompt = tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages])
        return await respond(request, body, [generation(body, prompt, None, chat=True)], chat=True)

    return app


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run directory or .ckpt file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=positive(int), default=8000)
    p.add_argument("--batch-size", type=positive(int), default=32, help="rows: requests generated at once")
    p.add_argument("--max-len", type=positive(int), default=2048, help="longest prompt + completion, in tokens")
    p.add_argument("--max-queue", type=positive(int), default=256, help="waiting requests before 429")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/")
    p.add_argument("--model-name", default=None, help="the model's id (default: the checkpoint's folder name)")
    p.add_argument("--metrics", action=argparse.BooleanOptionalAction, default=True,
                   help="serve Prometheus metrics at GET /metrics")
    add_inference_args(p)
    args = p.parse_args(argv)
    try:
        prepare_process(args.machine)
        model, tok = load_model(args.checkpoint, args.device, args.dtype, args.quantize)
        max_len = min(args.max_len, model.config.max_seq_len)
        engine = EngineLoop(Engine(model, rows=args.batch_size, max_len=max_len, tokenizer=tok, step=args.step,
                                   prefix_cache_mb=args.prefix_cache_mb, kv_cache_dtype=args.kv_cache_dtype))
    except (CheckpointError, ValueError) as e:
        p.exit(1, f"error: {e}\n")
    path = Path(args.checkpoint)
    name = args.model_name or (path.parent.name if path.suffix == ".ckpt" else path.name)
    app = create_app(engine, tok, name, args.api_key, args.max_queue, args.speculate == "ngram", args.draft_tokens,
                     args.metrics)
    # HTTP in a thread of its own; the engine steps in the main thread (see EngineLoop).
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
    http = threading.Thread(target=server.run, daemon=True, name="http")
    http.start()
    while not server.started:
        if not http.is_alive():
            p.exit(1, f"error: could not serve on {args.host}:{args.port}; pick another --port\n")
        time.sleep(0.05)
    print(f"serving {name} ({model.num_params():,} parameters, {args.batch_size} rows of {max_len} tokens, "
          f"{describe_weights(model)}, {engine.engine.runner.step} step) at http://{args.host}:{args.port}/v1",
          flush=True)
    try:
        engine.run_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
