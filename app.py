"""A Gradio web UI over any checkpoint: the trained tiny model or the converted SmolLM2.

  python app.py --checkpoint checkpoints/tiny                 # http://127.0.0.1:7860
  python app.py --checkpoint checkpoints/smollm2-135m-instruct --chat --host 0.0.0.0 --port 8080

Every browser tab's request joins one engine (engine.py) running in a background thread, so several people
are served at once, in one batch.
"""
from __future__ import annotations

import queue
import time

import gradio as gr

from checkpoint import CheckpointError, load_model
from config import ArgumentParser, add_inference_args, positive
from engine import Engine, EngineLoop, Request, encode_prompts
from machine import prepare_process
from tokenizer import Tokenizer

MAX_PROMPT_CHARS = 4000


def make_responder(engine: EngineLoop, tok: Tokenizer, chat: bool):
    """respond(prompt, max_new_tokens, temperature, top_k, top_p) for the UI: yields (completion so far, status
    line) as the text streams in. Bad input and failed generations raise gr.Error, which the UI shows."""
    max_len = engine.engine.max_len

    def respond(prompt: str, max_new_tokens: float, temperature: float, top_k: float, top_p: float):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise gr.Error(f"prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
        try:  # the prompt must leave room for at least one new token
            ids = encode_prompts(tok, [prompt], 1, max_len, chat=chat)[0]
        except ValueError as e:
            raise gr.Error(str(e)) from None
        events: queue.Queue = queue.Queue()
        request = Request(ids, min(int(max_new_tokens), max_len - len(ids)), temperature, int(top_k) or None, top_p,
                          on_text=lambda piece: events.put(piece), on_done=lambda r: events.put(None))
        t0 = time.perf_counter()
        engine.submit(request)
        text = ""
        try:
            while (piece := events.get()) is not None:
                text += piece
                yield text, "generating…"
        finally:
            request.cancelled = True  # a closed tab frees its row; a no-op once the request is done
        if request.finish_reason == "error":
            raise gr.Error(f"generation failed: {request.error}")
        wall = time.perf_counter() - t0
        yield request.text, (f"{len(request.tokens)} tokens in {wall:.2f} s = "
                             f"**{len(request.tokens) / wall:.1f} tokens/s** (prefill {len(ids)} tokens)")
    return respond


def build_app(engine: EngineLoop, tok: Tokenizer, max_new_cap: int, chat: bool, title: str) -> gr.Blocks:
    model = engine.engine.model
    max_new_cap = min(max_new_cap, engine.engine.max_len - 1)
    respond = make_responder(engine, tok, chat)
    with gr.Blocks(title=title) as app:
        gr.Markdown(f"## {title}\n{model.num_params():,} parameters, {model.config.max_seq_len}-token context")
        prompt = gr.Textbox(label="Prompt", lines=3, max_length=MAX_PROMPT_CHARS, elem_id="prompt",
                            value="" if chat else "ROMEO.\n")
        with gr.Row():
            max_new = gr.Slider(1, max_new_cap, value=min(128, max_new_cap), step=1, label="Max new tokens",
                                elem_id="max_new")
            temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="Temperature (0 = greedy)",
                                    elem_id="temperature")
            top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k (0 = off)")
            top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        output = gr.Textbox(label="Completion", lines=10, elem_id="completion")
        speed = gr.Markdown(elem_id="speed")
        inputs = [prompt, max_new, temperature, top_k, top_p]
        button.click(respond, inputs, [output, speed])
        prompt.submit(respond, inputs, [output, speed])
    return app


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run directory or .ckpt file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=positive(int), default=7860)
    p.add_argument("--max-new-tokens", type=positive(int), default=512, help="cap for the slider")
    p.add_argument("--batch-size", type=positive(int), default=4, help="requests generated at once")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    add_inference_args(p)
    args = p.parse_args(argv)
    try:
        prepare_process(args.machine)
        model, tok = load_model(args.checkpoint, args.device, args.dtype, args.quantize)
        # Rows as long as a capped prompt (~1 token per 4 characters) plus the new tokens, within the context.
        max_len = min(model.config.max_seq_len, MAX_PROMPT_CHARS // 2 + args.max_new_tokens)
        engine = EngineLoop(Engine(model, rows=args.batch_size, max_len=max_len, tokenizer=tok, step=args.step,
                                   prefix_cache_mb=args.prefix_cache_mb, kv_cache_dtype=args.kv_cache_dtype))
    except (CheckpointError, ValueError) as e:
        p.exit(1, f"error: {e}\n")
    if args.chat and not tok.chat_template:
        p.error("--chat: this checkpoint has no chat template")
    app = build_app(engine, tok, args.max_new_tokens, args.chat, title=f"slm · {args.checkpoint}")
    app.queue().launch(server_name=args.host, server_port=args.port, show_error=True, prevent_thread_lock=True)
    try:
        engine.run_forever()  # in the main thread (see EngineLoop); the app serves from its own threads
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
