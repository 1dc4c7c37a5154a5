"""A Gradio web UI over any checkpoint: the trained tiny model or the converted SmolLM2.

  python app.py --checkpoint checkpoints/tiny                 # http://127.0.0.1:7860
  python app.py --checkpoint checkpoints/smollm2-135m-instruct --chat --host 0.0.0.0 --port 8080
"""
from __future__ import annotations

import queue
import threading
import time

import gradio as gr
import torch

from checkpoint import CheckpointError
from config import ArgumentParser, positive
from inference import encode_prompts, load_model
from model import GPT, generate
from tokenizer import StreamDecoder, Tokenizer

MAX_PROMPT_CHARS = 4000


def stream_generation(model: GPT, tok: Tokenizer, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                      top_k: int | None, top_p: float, seed: int | None = None):
    """Yield text pieces as the shared generate loop produces them (it runs in a worker thread), then the
    generate() stats dict as the last item."""
    pieces: queue.Queue = queue.Queue()
    decoder = StreamDecoder(tok)

    def on_token(step, next_ids):
        token = int(next_ids[0])
        if token != tok.eos_id:
            pieces.put(decoder.push(token))

    def work():
        try:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            _, stats = generate(model, [prompt_ids], max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, eos_id=tok.eos_id, pad_id=tok.pad_id, generator=generator,
                                on_token=on_token)
            pieces.put(decoder.flush())
            pieces.put(stats)
        except Exception as e:  # reported in the UI; the app keeps serving
            pieces.put(e)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = pieces.get()
        if isinstance(item, Exception):
            raise item
        yield item
        if isinstance(item, dict):
            return


def build_app(model: GPT, tok: Tokenizer, max_new_cap: int, chat: bool, title: str) -> gr.Blocks:
    context = model.config.max_seq_len
    max_new_cap = min(max_new_cap, context - 1)
    lock = threading.Lock()  # one generation at a time: the model's KV cache is shared

    def respond(prompt: str, max_new_tokens: float, temperature: float, top_k: float, top_p: float):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise gr.Error(f"prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
        try:  # the prompt must leave room for at least one new token
            ids = encode_prompts(tok, [prompt], 1, context, chat=chat)[0]
        except ValueError as e:
            raise gr.Error(str(e).replace("--max-new-tokens", "max new tokens").split("; shorten")[0]) from None
        max_new = min(int(max_new_tokens), context - len(ids))
        text, t0 = "", time.perf_counter()
        with lock:
            try:
                for item in stream_generation(model, tok, ids, max_new, temperature, int(top_k) or None, top_p):
                    if isinstance(item, dict):
                        wall = time.perf_counter() - t0
                        yield text, (f"{item['new_tokens']} tokens in {wall:.2f} s = "
                                     f"**{item['new_tokens'] / wall:.1f} tokens/s** "
                                     f"(prefill {item['prefill_tokens']} tokens)")
                    else:
                        text += item
                        yield text, "generating…"
            except Exception as e:
                raise gr.Error(f"generation failed: {e}") from None

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"## {title}\n{model.num_params():,} parameters, {context}-token context")
        prompt = gr.Textbox(label="Prompt", lines=3, max_length=MAX_PROMPT_CHARS, elem_id="prompt",
                            value="" if chat else "ROMEO.\n")
        with gr.Row():
            max_new = gr.Slider(1, max_new_cap, value=min(128, max_new_cap), step=1, label="Max new tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="Temperature (0 = greedy)")
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
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    args = p.parse_args(argv)
    try:
        model, tok = load_model(args.checkpoint, "cpu" if not torch.cuda.is_available() else "cuda", args.dtype)
    except CheckpointError as e:
        p.exit(1, f"error: {e}\n")
    if args.chat and not tok.chat_template:
        p.error("--chat: this checkpoint has no chat template")
    app = build_app(model, tok, args.max_new_tokens, args.chat, title=f"slm · {args.checkpoint}")
    app.queue().launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
