"""Side by side, in one run on one machine: ours against transformers' LlamaForCausalLM (the same weights, from
our to-hf export) and llama.cpp (llama-cpp-python, on the checkpoint's own GGUF, same threads, greedy), where it
is installed (make bench-install; otherwise its cells say "not installed"). Each section writes
generated_texts/bench_<section>.json and .png, with the machine's own matmul and memory rates, which bound
every figure. Compile time is left out of the rates (a warm-up call first) and reported apart.

  python bench.py                                  # decode prefill gemv quality engine serve train
  python bench.py --only decode --batches 1 32     # batch-1 and batch-32 decode: fp32/int8/int4, plain/compiled
  python bench.py --only engine                    # continuous vs static batching on the chat workload
  python bench.py --only serve                     # serve.py vs llama.cpp's server at 1/8/32/64 clients
  python bench.py --only recipes                   # training recipes side by side, 10 min each (tiny)
  python bench.py --only recipes --recipe-preset slm-40m --recipe-minutes 5 --recipes before muon+wsd \
      "--recipe-flags=--tokens-per-step 4096 --seq-len 256"   # the same for slm-40m, CPU-sized steps
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import data
from checkpoint import config_and_tokenizer, load_checkpoint, model_from_checkpoint
from config import ArgumentParser, ModelConfig, get_config
from convert import write_hf
from engine import Engine, Request, generate, load_model
from kernels import bf16_gemms_run_in_fp32, quant_ops, quantize_model, quantize_q4, quantize_q8
from model import GPT
from train import TRAIN_DEFAULTS, evaluate
from train import build_parser as train_parser

PROMPT_TEXT = ("The quick brown fox jumps over the lazy dog while the sun sets behind the hills and the "
               "children walk home from school, talking about")
LLAMA_TRAIN = dict(vocab_size=4096, n_layer=8, n_head=8, n_kv_head=4, d_model=512, ffn_hidden=1376,
                   max_seq_len=256, tie_embeddings=False)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed_interleaved(fns: dict, repeats: int = 3) -> tuple[dict, dict]:
    """Median seconds per call of each fn, and the seconds of its warm-up call (which includes any compile).
    The timed calls take turns (a, b, c, a, b, c, ...), so that a drift in the machine's speed (it is
    shared) hits every contender alike instead of the one that happens to run last."""
    warmups, times = {}, {name: [] for name in fns}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        warmups[name] = time.perf_counter() - t0
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}, warmups


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of fn() after one warm-up call."""
    return timed_interleaved({"fn": fn}, repeats)[0]["fn"]


def machine_facts() -> dict:
    """What bounds the figures: GEMM rate per dtype and the rate of reading memory (256 MB, past any cache)."""
    facts = {"cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                          if line.startswith("model name")), "unknown"), "threads": torch.get_num_threads()}
    for name, dtype in DTYPES.items():
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        facts[f"matmul_gflops_{name}"] = 2 * 2048 ** 3 / timed(lambda: a @ b, 5) / 1e9
    big = torch.ones(64 * 2 ** 20)
    facts["memory_read_gb_s"] = big.numel() * 4 / timed(big.sum, 5) / 1e9
    facts["bf16_gemms_in_fp32"] = bf16_gemms_run_in_fp32()  # model.Linear's choice for this process
    print(", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in facts.items()))
    return facts


FORMATS = {"fp32": None, "int8": "int8", "int4": "int4"}  # ours: --quantize


def llama_cpp(gguf: str | None, threads: int, n_ctx: int = 1024):
    """llama.cpp (llama-cpp-python) on a GGUF file, or None where it is not installed or there is no file."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    if not gguf or not str(gguf).endswith(".gguf") or not Path(gguf).is_file():
        return None
    return Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False,
                 seed=0)


def llama_greedy(llm, prompt: list[int], new_tokens: int) -> list[int]:
    """llama.cpp's greedy continuation (its own sampler at top_k=1, past end-of-text)."""
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        out.append(token)
        if len(out) == new_tokens:
            return out
    return out


def contenders(ckpt_path: str, threads: int):
    """Ours in fp32, int8 and int4 (GGUF blocks as they are where the checkpoint kept them), transformers' fp32
    LlamaForCausalLM from our to-hf export, and llama.cpp on the checkpoint's own GGUF (None if missing)."""
    from transformers import AutoModelForCausalLM

    ckpt = load_checkpoint(ckpt_path)
    ours = {fmt: load_model(ckpt_path, "cpu", "fp32", q)[0] for fmt, q in FORMATS.items()}
    _, tok = config_and_tokenizer(ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        write_hf(ckpt, Path(tmp))
        ref = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    return ours, tok, ref, llama_cpp(ckpt.get("source"), threads)


def row_differences(a: list[list[int]], b: list[list[int]]) -> list[int | None]:
    """Per row, the index of the first generated token where two runs differ; None where they agree."""
    return [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), None) for ra, rb in zip(a, b)]


def first_difference(a: list[list[int]], b: list[list[int]]) -> int | None:
    """Index of the first generated token where two runs differ, in any row; None when they agree."""
    return min((d for d in row_differences(a, b) if d is not None), default=None)


def bench_decode(ckpt_path: str, batches: list[int], new_tokens: int, threads: int) -> list[dict]:
    """Greedy decode of 16-token prompts: ours in fp32/int8/int4, plain and compiled, transformers and llama.cpp
    (batch 1: llama-cpp-python decodes one sequence), timed in turns. Tokens per second count prefill too."""
    ours, tok, ref, llm = contenders(ckpt_path, threads)
    prompt = tok.encode(PROMPT_TEXT)[:16]
    rows = []
    for batch in batches:
        prompts, ids, outputs = [prompt] * batch, torch.tensor([prompt] * batch), {}

        def run_ours(model, compile, name):
            outputs[name] = generate(model, prompts, new_tokens, compile=compile)[0]

        def run_ref():
            with torch.inference_mode():
                ref.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_id)
        fns = {f"ours {fmt}{' compiled' * c}": (lambda m=m, c=c, n=f"{fmt}{c}": run_ours(m, c, n))
               for fmt, m in ours.items() for c in (False, True)}
        fns["transformers fp32"] = run_ref
        if llm is not None and batch == 1:
            fns["llama.cpp Q4_1"] = lambda: outputs.__setitem__("llama.cpp", [llama_greedy(llm, prompt, new_tokens)])
        seconds, warmups = timed_interleaved(fns, 2 if batch >= 32 else 3)
        row = {"batch": batch, "new_tokens": new_tokens, "first_call_s": warmups,
               "tok_s": {k: batch * new_tokens / v for k, v in seconds.items()},
               "llama.cpp": "not installed" if llm is None else
               "measured" if batch == 1 else "no batched decode in llama-cpp-python",
               "compiled_first_difference": {fmt: first_difference(outputs[f"{fmt}True"], outputs[f"{fmt}False"])
                                             for fmt in ours}}
        if "llama.cpp" in outputs:
            row["int4_vs_llama_cpp_first_difference"] = first_difference(outputs["int4True"], outputs["llama.cpp"])
        best = max((k for k in row["tok_s"] if k.startswith("ours")), key=row["tok_s"].get)
        row["best_ours"] = best
        row["best_vs_transformers"] = row["tok_s"][best] / row["tok_s"]["transformers fp32"]
        if "llama.cpp Q4_1" in row["tok_s"]:
            row["best_vs_llama_cpp"] = row["tok_s"][best] / row["tok_s"]["llama.cpp Q4_1"]
        rows.append(row)
        print(f"decode batch {batch}: " + "  ".join(f"{k} {v:.1f}" for k, v in row["tok_s"].items()) +
              f"  | best {best}: x{row['best_vs_transformers']:.2f} transformers" +
              (f", x{row['best_vs_llama_cpp']:.2f} llama.cpp" if "best_vs_llama_cpp" in row else ""))
    return rows


def bench_prefill(ckpt_path: str, threads: int, length: int = 512) -> list[dict]:
    """A 512-token prompt through each model (last-position logits): ours (quantized layers run their GEMM on
    the dequantized weights at this size), transformers, llama.cpp."""
    ours, _, ref, llm = contenders(ckpt_path, threads)
    ids = torch.randint(0, ref.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    fns = {f"ours {fmt}": (lambda m=m: m(ids, last_only=True)) for fmt, m in ours.items()}
    fns["transformers fp32"] = lambda: ref(ids, logits_to_keep=1)
    if llm is not None:
        fns["llama.cpp Q4_1"] = lambda: (llm.reset(), llm.eval(ids[0].tolist()))
    with torch.inference_mode():
        seconds, _ = timed_interleaved(fns)
    row = {"tokens": length, "tok_s": {k: length / v for k, v in seconds.items()},
           "llama.cpp": "not installed" if llm is None else "measured"}
    print(f"prefill 1x{length}: " + "  ".join(f"{k} {v:.0f}" for k, v in row["tok_s"].items()))
    return [row]


def bench_gemv(ckpt_path: str) -> list[dict]:
    """The matmuls of one decode token at batch 1 (all layers and the head, SmolLM2's shapes), one kernel
    after another: fp32, our int4/int8 kernels (AVX2 and the plain fallback) and aten's weight-only kernels
    (int8: _weight_int8pack_mm; int4 group 32: _weight_int4pack_mm_for_cpu), with bf16 or fp32 activations."""
    cfg = ModelConfig(**load_checkpoint(ckpt_path, mmap=True)["config"])
    d, h = cfg.d_model, cfg.n_kv_head * cfg.head_dim
    shapes = [(d, d), (h, d), (h, d), (d, d), (cfg.ffn_hidden, d), (cfg.ffn_hidden, d), (d, cfg.ffn_hidden)]
    shapes, head = shapes * cfg.n_layer, (cfg.vocab_size, d)
    g = torch.Generator().manual_seed(0)
    weights = {s: torch.randn(*s, generator=g) / s[1] ** 0.5 for s in set(shapes) | {head}}
    x = {k: torch.randn(1, k, generator=g) for k in (d, cfg.ffn_hidden)}
    q4, q8 = ({s: make(w) for s, w in weights.items()} for make in (quantize_q4, quantize_q8))
    ops = quant_ops()

    def int4pack(w):  # aten's int4 layout: scales and zero points per group of 32 (w = (q - 8) * s + z)
        groups = w.view(w.size(0), -1, 32)
        low, step = groups.amin(-1), (groups.amax(-1) - groups.amin(-1)) / 15
        q = ((groups - low[..., None]) / step[..., None]).round().clamp(0, 15).to(torch.int32).view_as(w)
        scales_and_zeros = torch.stack([step.t(), (low + 8 * step).t()], -1)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_and_zeros
    packed4 = {s: int4pack(w) for s, w in weights.items() if s != head}
    every = shapes + [head]
    fns = {"fp32": [lambda s=s: torch.nn.functional.linear(x[s[1]], weights[s]) for s in every]}
    for simd in ("", "_plain"):
        fns[f"ours int4{simd or ' AVX2'}"] = [lambda s=s, simd=simd: getattr(ops, f"q4_linear{simd}")(
            x[s[1]], q4[s].qs, q4[s].d, q4[s].m) for s in shapes] + \
            [lambda simd=simd: getattr(ops, f"q8_linear{simd}")(x[d], q8[head].q, q8[head].s)]
        fns[f"ours int8{simd or ' AVX2'}"] = [lambda s=s, simd=simd: getattr(ops, f"q8_linear{simd}")(
            x[s[1]], q8[s].q, q8[s].s) for s in every]
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        fns[f"aten int8pack, {name} x"] = [lambda s=s, t=dtype: torch.ops.aten._weight_int8pack_mm(
            x[s[1]].to(t), q8[s].q, q8[s].s.view(-1).to(t)) for s in every]
        fns[f"aten int4pack, {name} x (head int8)"] = [lambda s=s, t=dtype: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x[s[1]].to(t), packed4[s][0], 32, packed4[s][1].to(t)) for s in shapes] + \
            [lambda t=dtype: torch.ops.aten._weight_int8pack_mm(x[d].to(t), q8[head].q, q8[head].s.view(-1).to(t))]
    seconds, _ = timed_interleaved({k: (lambda calls=calls: [c() for c in calls]) for k, calls in fns.items()})
    row = {"ms_per_token": {k: 1000 * v for k, v in seconds.items()}, "matmuls": len(every)}
    print("gemv ms per token: " + "  ".join(f"{k} {v:.1f}" for k, v in row["ms_per_token"].items()))
    return [row]


def bench_quality(ckpt_paths: list[str], new_tokens: int = 128) -> list[dict]:
    """What quantizing costs: bits per byte on the Shakespeare validation split (hamlet + tempest, evaluate()
    of train.py) and greedy agreement with fp32 over 128 tokens (8 chat prompts, raw text), for int8 and int4
    quantized from the fp32 weights, and int4 from the GGUF's own blocks where the checkpoint kept them."""
    rows = []
    for path in ckpt_paths:
        ckpt = load_checkpoint(path)
        config, tok = config_and_tokenizer(ckpt)
        seq = min(512, config.max_seq_len)
        tokens_dir = Path("data") / f"shakespeare-{data.tokenizer_hash(tok)}"
        meta = data.prepare("shakespeare", tok, tokens_dir, splits=("val",))
        chunks = data.Chunks(data.load_shards(tokens_dir, meta, "val"), seq)
        lengths = data.token_byte_lengths(tok)
        prompts = [tok.encode(t) for t in (Path(__file__).parent / "prompts" / "chat.txt").read_text().splitlines()[:8]]
        variants = {"fp32": {}, "int8": {"mode": "int8"}, "int4": {"mode": "int4"}}
        if ckpt.get("gguf_blocks"):
            variants["int4, GGUF blocks"] = {"mode": "int4", "gguf_blocks": ckpt["gguf_blocks"]}
        greedy, fp32_bpb = {}, None
        for name, how in variants.items():
            model, _ = model_from_checkpoint(ckpt)
            if how:
                quantize_model(model, how["mode"], how.get("gguf_blocks"))
            with torch.inference_mode():
                loss, bpb = evaluate(model, chunks, lengths, 8, contextlib.nullcontext(), 0, 1, torch.device("cpu"))
            greedy[name] = generate(model, prompts, new_tokens, batch_size=8)[0]
            same = [new_tokens if d is None else d for d in row_differences(greedy[name], greedy["fp32"])]
            row = {"checkpoint": str(path), "variant": name, "val_loss": loss, "val_bpb": bpb,
                   "greedy_agreement": sum(same) / len(same) / new_tokens}
            fp32_bpb = fp32_bpb or bpb  # the first variant is fp32
            row["bpb_vs_fp32"] = bpb / fp32_bpb
            rows.append(row)
            print(f"quality {Path(path).name} {name:18}: val bits/byte {bpb:.4f} (x{row['bpb_vs_fp32']:.4f} fp32), "
                  f"greedy tokens the same as fp32 for {row['greedy_agreement']:.0%} of {new_tokens}")
    return rows


def train_step(model: torch.nn.Module, vocab: int, batch: int, seq: int, hf: bool, dtype: str,
               compile: bool = False):
    """A whole AdamW step (forward, backward, update) at batch x seq, as a function to time."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, vocab, (batch, seq))
    forward = torch.compile(model) if compile else model

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = forward(input_ids=x, labels=x).loss if hf else forward(x, x)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # a second warm-up: the first step of a compiled model compiles forward, the second backward
    return step


def train_rates(steps: dict, tokens: int) -> dict:
    seconds, _ = timed_interleaved(steps)
    return {f"{name}_tok_s": tokens / s for name, s in seconds.items()}


def bench_train(batch: int = 8, seq: int = 256) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    rows = []
    for name in ("tiny", "slm-40m"):
        cfg = get_config(name, max_seq_len=max(seq, get_config(name).max_seq_len))
        row = {"config": name, "dtype": "bf16", **train_rates(
            {"ours": train_step(GPT(cfg), cfg.vocab_size, batch, seq, False, "bf16"),
             "ours_compiled": train_step(GPT(cfg), cfg.vocab_size, batch, seq, False, "bf16", True)}, batch * seq)}
        rows.append(row)
        print(f"train {name} bf16: ours {row['ours_tok_s']:6.0f}  compiled {row['ours_compiled_tok_s']:6.0f} tok/s")
    cfg = get_config("tiny", **LLAMA_TRAIN)
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
                         num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                         num_key_value_heads=cfg.n_kv_head, max_position_embeddings=seq, tie_word_embeddings=False)
    # bf16 autocast is the workload; fp32 is what train.py picks on a CPU (--dtype auto).
    for dname in ("bf16", "fp32"):
        row = {"config": "llama-512x8", "dtype": dname, **train_rates(
            {"ours": train_step(GPT(cfg), cfg.vocab_size, batch, seq, False, dname),
             "ours_compiled": train_step(GPT(cfg), cfg.vocab_size, batch, seq, False, dname, True),
             "ref": train_step(LlamaForCausalLM(hf_cfg), cfg.vocab_size, batch, seq, True, dname)}, batch * seq)}
        row["ratio"] = row["ours_compiled_tok_s"] / row["ref_tok_s"]
        rows.append(row)
        print(f"train llama-512x8 {dname}: ours {row['ours_tok_s']:6.0f}  compiled {row['ours_compiled_tok_s']:6.0f}"
              f" tok/s  transformers {row['ref_tok_s']:6.0f}  x{row['ratio']:.2f}")
    return rows


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def bench_engine(ckpt_path: str, rows: int = 32, new_tokens: int = 256) -> list[dict]:
    """The chat workload (prompts/chat.txt: 256 questions, lists and stories, whose answers stop at very
    different lengths), greedy, through 32 rows: continuous against static batching, one after the other.
    Latency counts from the start of the run, when every request is waiting."""
    model, tok = model_from_checkpoint(load_checkpoint(ckpt_path))
    texts = (Path(__file__).parent / "prompts" / "chat.txt").read_text().splitlines()
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}])) for t in texts]
    tokens, out = {}, []
    for mode in ("static", "continuous"):
        engine = Engine(model, rows=rows, max_len=max(map(len, prompts)) + new_tokens, tokenizer=tok,
                        batching=mode)
        requests = [Request(p, new_tokens) for p in prompts]
        t0 = time.perf_counter()
        for _ in engine.run(requests):
            pass
        wall = time.perf_counter() - t0
        latency = [r.finished_at - t0 for r in requests]
        s = engine.summary()
        tokens[mode] = [r.tokens for r in requests]
        row = {"batching": mode, "rows": rows, "requests": len(requests), "new_tokens": s["new_tokens"],
               "wall_s": wall, "tok_s": s["new_tokens"] / wall, "slot_utilisation": s["slot_utilisation"],
               "decode_steps": s["decode_steps"], "latency_p50_s": percentile(latency, 0.5),
               "latency_p99_s": percentile(latency, 0.99), "latencies_s": sorted(latency)}
        out.append(row)
        print(f"engine {mode:10}: {row['tok_s']:6.1f} tok/s, slot utilisation {row['slot_utilisation']:.0%}, "
              f"latency p50 {row['latency_p50_s']:.1f} s p99 {row['latency_p99_s']:.1f} s, "
              f"{s['new_tokens']} tokens in {wall:.0f} s")
    static, continuous = out
    continuous["speedup"] = continuous["tok_s"] / static["tok_s"]
    continuous["same_tokens"] = tokens["static"] == tokens["continuous"]
    print(f"continuous / static: x{continuous['speedup']:.2f}, same tokens: {continuous['same_tokens']}")
    return out


async def load_test(url: str, bodies: list[dict], clients: int) -> dict:
    """`clients` concurrent streaming clients work through the requests in order, each taking the next as soon as
    its last one is done. Per request: start, the arrival time of each text chunk, the text and any error."""
    import asyncio

    import httpx

    todo, done = list(enumerate(bodies))[::-1], []

    async def client(http: httpx.AsyncClient) -> None:
        while todo:
            i, body = todo.pop()
            start, stamps, text, error = time.perf_counter(), [], [], None
            try:
                async with http.stream("POST", url, json=body) as r:
                    if r.status_code != 200:
                        error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            piece = json.loads(line[6:])["choices"][0].get("delta", {}).get("content")
                            if piece:
                                stamps.append(time.perf_counter())
                                text.append(piece)
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}"
            done.append({"i": i, "start": start, "stamps": stamps, "text": "".join(text), "error": error})

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=clients)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return {"wall_s": time.perf_counter() - t0, "requests": sorted(done, key=lambda d: d["i"])}


def start_server(command: list[str], health_url: str, log: Path, threads: int) -> subprocess.Popen:
    """A server process on `threads` threads, once health_url answers 200 (its log in `log`)."""
    import httpx

    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                              env=os.environ | {"OMP_NUM_THREADS": str(threads)})
    deadline = time.time() + 900
    while time.time() < deadline and server.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(health_url, timeout=5).status_code == 200:
                return server
        time.sleep(1)
    server.kill()
    raise RuntimeError(f"{command[1]} did not start; see {log}")


def bench_serve(ckpt_path: str, threads: int, levels: list[int], requests: int = 64, max_tokens: int = 128,
                rows: int = 32) -> list[dict]:
    """Load on an OpenAI-compatible server over loopback: `requests` chat prompts (every 4th of prompts/chat.txt:
    questions, lists and stories), greedy, streamed, at 1/8/32/64 concurrent clients. Ours (serve.py, int4,
    32 rows) and llama.cpp's server (python -m llama_cpp.server, the same GGUF and threads) in the same run.
    Tokens are counted by re-encoding each answer with the model's tokenizer, the same for both."""
    import asyncio

    import httpx

    ckpt = load_checkpoint(ckpt_path, mmap=True)
    _, tok = config_and_tokenizer(ckpt)  # the tokenizer alone: the servers load the model
    texts = (Path(__file__).parent / "prompts" / "chat.txt").read_text().splitlines()[::4][:requests]
    bodies = [{"messages": [{"role": "user", "content": t}], "max_tokens": max_tokens,
               "temperature": 0, "stream": True} for t in texts]
    servers = {"ours (serve.py, int4)": [sys.executable, "serve.py", "--checkpoint", ckpt_path,
                                         "--port", "8931", "--quantize", "int4", "--batch-size", str(rows)]}
    gguf = ckpt.get("source")
    if gguf and Path(gguf).is_file() and all(map(importlib.util.find_spec, ("llama_cpp", "sse_starlette"))):
        servers["llama.cpp (llama_cpp.server)"] = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", "8932",
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "2048",
            "--interrupt_requests", "False"]  # its default drops a running stream when the next request comes
    else:
        print("serve: llama.cpp's server is not installed (make bench-install); ours alone")
    out = []
    for name, command in servers.items():
        port = command[command.index("--port") + 1]
        server = start_server(command, f"http://127.0.0.1:{port}/v1/models",
                              Path(tempfile.gettempdir()) / f"bench_serve_{port}.log", threads)
        try:
            model = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
            bodies = [b | {"model": model} for b in bodies]
            asyncio.run(load_test(f"http://127.0.0.1:{port}/v1/chat/completions", bodies[:2], 1))  # warm-up
            for clients in levels:
                run = asyncio.run(load_test(f"http://127.0.0.1:{port}/v1/chat/completions", bodies, clients))
                done = run["requests"]
                ttft = [d["stamps"][0] - d["start"] for d in done if d["stamps"]] or [float("nan")]
                itl = [b - a for d in done for a, b in zip(d["stamps"], d["stamps"][1:])] or [float("nan")]
                tokens = sum(len(tok.encode(d["text"])) for d in done)
                errors = [d["error"] or "no text" for d in done if d["error"] or not d["text"]]
                row = {"server": name, "clients": clients, "requests": len(done), "errors": len(errors),
                       "error_examples": errors[:3], "wall_s": run["wall_s"], "req_s": len(done) / run["wall_s"],
                       "tok_s": tokens / run["wall_s"], "completion_tokens": tokens,
                       "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
                       "itl_p50_ms": 1e3 * percentile(itl, 0.5), "itl_p99_ms": 1e3 * percentile(itl, 0.99)}
                out.append(row)
                print(f"serve {name:30} {clients:3} clients: {row['req_s']:5.2f} req/s {row['tok_s']:6.1f} tok/s, "
                      f"TTFT p50 {row['ttft_p50_s']:.2f} p99 {row['ttft_p99_s']:.2f} s, ITL p50 "
                      f"{row['itl_p50_ms']:.0f} p99 {row['itl_p99_ms']:.0f} ms, {row['errors']} errors")
        finally:
            server.terminate()
            server.wait(timeout=60)
    return out


# The recipe before issue 17, pinned, and one rung per change, each keeping the rungs above it; the last is
# `make train` now (tiny's defaults). 3-minute screening runs chose each value (README). The older rungs keep
# tiny's old shape (a 256-token context, the head tied to the embedding); other presets keep their own.
BEFORE = {"optimizer": "adamw", "schedule": "cosine", "lr": 1e-3, "tokens_per_step": 8192}
RECIPES = {"before": BEFORE, "muon+wsd": BEFORE | {"optimizer": "muon", "schedule": "wsd", "lr": 4e-3},
           "now": TRAIN_DEFAULTS["tiny"]}
TINY_BEFORE = ["--max-seq-len", "256", "--tie-embeddings"]
EVAL_TOKENS = 409_600  # every recipe evaluates after the same number of tokens, so evaluation costs each alike


def bench_recipes(preset: str, minutes: float, names: list[str], extra: list[str], repeats: int = 1) -> list[dict]:
    """Each recipe trains `preset` from scratch for the same wall-clock budget on this machine, taking turns
    (before, ..., now, before, ...), with the same evaluation code (train.evaluate: bits per byte over the whole
    validation split, tested against an independent count). `extra` flags go last, so they win. A sample
    (temperature 0.8, seed 0, as inference.py gives) of each is kept."""
    out = []
    for repeat in range(repeats):
        for name in names:
            run = f"{preset}-{name}-{repeat}"
            flags = [f for key, value in RECIPES[name].items() for f in (f"--{key.replace('_', '-')}", str(value))]
            flags += (TINY_BEFORE if preset == "tiny" and name != "now" else []) + extra
            tokens_per_step = train_parser().parse_args(flags).tokens_per_step
            command = [sys.executable, "train.py", "--preset", preset, "--time-budget", str(minutes), "--run-name",
                       run, "--out-dir", "checkpoints/recipes", "--eval-every",
                       str(max(1, EVAL_TOKENS // tokens_per_step)), *flags]
            print(f"recipes: {' '.join(command[1:])}", flush=True)
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            ckpt = load_checkpoint(f"checkpoints/recipes/{run}/last.ckpt")
            model, tok = model_from_checkpoint(ckpt)
            prompt = tok.encode("ROMEO.")
            sample = tok.decode(prompt + generate(model, [prompt], 100, temperature=0.8, seed=0)[0][0])
            h, args = ckpt["history"], ckpt["train_args"]
            row = {"recipe": name, "preset": preset, "repeat": repeat, "minutes": minutes, "flags": flags,
                   "optimizer": args["optimizer"], "schedule": args["schedule"], "lr": args["lr"],
                   "muon_lr": args.get("muon_lr"), "tokens_per_step": args["tokens_per_step"],
                   "config": ckpt["config"], "params": model.num_params(), "steps": ckpt["step"],
                   "elapsed_s": ckpt["elapsed_s"], "tokens": ckpt["step"] * args["tokens_per_step"],
                   "val_bpb": h["val_bpb"][-1][1],
                   "curve": [(t, b) for (_, t), (_, b) in zip(h["val_elapsed_s"], h["val_bpb"])],
                   "sample": sample}
            out.append(row)
            print(f"recipes: {name}: val bits/byte {row['val_bpb']:.4f} after {row['steps']} steps, "
                  f"{row['tokens']:,} tokens in {row['elapsed_s'] / 60:.1f} min", flush=True)
    for name in names:
        mine = [r["val_bpb"] for r in out if r["recipe"] == name]
        print(f"recipes: {name}: median val bits/byte {sorted(mine)[len(mine) // 2]:.4f} over {len(mine)} runs")
    return out


SERIES = (("ours_tok_s", "ours"), ("ours_compiled_tok_s", "ours compiled"), ("ref_tok_s", "transformers"))


def bars(ax, rows: list[dict], labels: list[str]) -> None:
    """Grouped bars: ours, ours compiled and transformers for each row (a missing figure: no bar)."""
    width = 0.27
    for i, (key, name) in enumerate(SERIES):
        xs = [x + (i - 1) * width for x, r in enumerate(rows) if key in r]
        ax.bar(xs, [r[key] for r in rows if key in r], width, label=name)
    ax.set_xticks(list(range(len(rows))), labels)
    ax.grid(alpha=0.3, axis="y")


def named_bars(ax, values: dict, unit: str) -> None:
    """One bar per contender, ours in one colour, the peers in another, each with its figure."""
    names = list(values)
    colours = ["tab:blue" if n.startswith("ours") else "tab:orange" for n in names]
    ax.bar(range(len(names)), [values[n] for n in names], color=colours)
    ax.set_xticks(range(len(names)), [n.replace(" ", "\n", 2) for n in names], fontsize=7)
    for i, n in enumerate(names):
        ax.text(i, values[n], f"{values[n]:.1f}" if values[n] < 100 else f"{values[n]:.0f}", ha="center",
                va="bottom", fontsize=7)
    ax.set_ylabel(unit)
    ax.grid(alpha=0.3, axis="y")


def plot_decode(rows: list[dict], ax_grid):
    fig, axes = ax_grid(1, len(rows), figsize=(6 * len(rows), 4.5), squeeze=False)
    for ax, row in zip(axes[0], rows):
        named_bars(ax, row["tok_s"], "generated tokens/s")
        ax.set_title(f"SmolLM2-135M, greedy, batch {row['batch']}, {row['new_tokens']} new tokens")
    return fig


def plot_prefill(rows: list[dict], ax_grid):
    fig, ax = ax_grid(figsize=(8, 4))
    named_bars(ax, rows[0]["tok_s"], "prompt tokens/s")
    ax.set_title(f"Prefill of a {rows[0]['tokens']}-token prompt (SmolLM2-135M)")
    return fig


def plot_gemv(rows: list[dict], ax_grid):
    fig, ax = ax_grid(figsize=(10, 4))
    named_bars(ax, rows[0]["ms_per_token"], "ms per token")
    ax.set_title(f"The {rows[0]['matmuls']} matmuls of one SmolLM2 token at batch 1, by kernel (lower is better)")
    return fig


def plot_quality(rows: list[dict], ax_grid):
    fig, ax = ax_grid(figsize=(8, 4))
    named_bars(ax, {f"{Path(r['checkpoint']).name}\n{r['variant']}": r["val_bpb"] for r in rows}, "val bits/byte")
    ax.set_title("Validation bits per byte (Shakespeare: hamlet + tempest)")
    return fig


def plot_serve(rows: list[dict], ax_grid):
    fig, (left, mid, right) = ax_grid(1, 3, figsize=(16, 4))
    for name in dict.fromkeys(r["server"] for r in rows):
        mine = [r for r in rows if r["server"] == name]
        clients = [r["clients"] for r in mine]
        left.plot(clients, [r["tok_s"] for r in mine], "o-", label=name)
        for ax, key, unit in ((mid, "ttft", "_s"), (right, "itl", "_ms")):
            ax.plot(clients, [r[f"{key}_p50{unit}"] for r in mine], "o-", label=f"{name} p50")
            ax.plot(clients, [r[f"{key}_p99{unit}"] for r in mine], "o--", label=f"{name} p99")
    left.set(ylabel="generated tokens/s", title="Throughput (SmolLM2-135M chat, greedy, streamed)")
    mid.set(ylabel="seconds", yscale="log", title="Time to first token")
    right.set(ylabel="ms", yscale="log", title="Inter-token latency")
    for ax in (left, mid, right):
        ax.set(xlabel="concurrent clients", xscale="log")
        ax.set_xticks([r["clients"] for r in rows], [str(r["clients"]) for r in rows])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def plot_recipes(rows: list[dict], ax_grid):
    fig, ax = ax_grid(figsize=(8, 4.5))
    for row in rows:
        before = row["recipe"] == "before"
        ax.plot([t / 60 for t, _ in row["curve"]], [b for _, b in row["curve"]], "s--" if before else "o-",
                alpha=0.8, label=f"{row['recipe']} ({row['optimizer']}, {row['schedule']}, lr {row['lr']:g}, "
                f"{row['tokens_per_step']} tok/step): {row['val_bpb']:.3f}")
    ax.set(xlim=(0, rows[0]["minutes"] * 1.05), xlabel="wall-clock minutes", ylabel="validation bits per byte",
           title=f"{rows[0]['preset']}: the training recipes side by side, {rows[0]['minutes']:g} min each on "
                 "this machine")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_train(rows: list[dict], ax_grid):
    fig, ax = ax_grid(figsize=(9, 4))
    bars(ax, rows, [f"train {r['config']}\n{r['dtype']}" for r in rows])
    ax.set(ylabel="tokens/s", yscale="log", title="Training steps (batch 8 x 256)")
    ax.legend()
    return fig


def plot_engine(rows: list[dict], ax_grid):
    fig, (left, right) = ax_grid(1, 2, figsize=(11, 4))
    for row in rows:
        lat = row["latencies_s"]
        right.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))],
                   label=f"{row['batching']}: {row['tok_s']:.0f} tok/s")
    left.bar([r["batching"] for r in rows], [r["slot_utilisation"] for r in rows])
    left.set(ylabel="slot utilisation (tokens / (steps x rows))", ylim=(0, 1),
             title="256 chat prompts, greedy, 32 rows")
    right.set(xlabel="seconds from the start until the request is done", ylabel="share of requests done",
              title="Per-request latency")
    right.grid(alpha=0.3)
    right.legend()
    return fig


SECTIONS = {  # name: (run it, plot it)
    "decode": (lambda a: bench_decode(a.checkpoint, a.batches, a.new_tokens, a.threads), plot_decode),
    "prefill": (lambda a: bench_prefill(a.checkpoint, a.threads), plot_prefill),
    "gemv": (lambda a: bench_gemv(a.checkpoint), plot_gemv),
    "quality": (lambda a: bench_quality([a.checkpoint] + [c for c in a.also_checkpoint if Path(c).exists()]),
                plot_quality),
    "engine": (lambda a: bench_engine(a.checkpoint), plot_engine),
    "serve": (lambda a: bench_serve(a.checkpoint, a.threads, a.clients), plot_serve),
    "train": (lambda a: bench_train(), plot_train),
    "recipes": (lambda a: bench_recipes(a.recipe_preset, a.recipe_minutes, a.recipes, a.recipe_flags.split(),
                                        a.recipe_repeats), plot_recipes),
}


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", default="checkpoints/smollm2-135m-instruct",
                   help="real SmolLM2 weights (python convert.py smollm2)")
    p.add_argument("--only", choices=list(SECTIONS), nargs="+", default=[s for s in SECTIONS if s != "recipes"])
    p.add_argument("--also-checkpoint", nargs="*", default=["checkpoints/tiny"],
                   help="more checkpoints for --only quality (fp32 weights of our own, where they exist)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64], help="concurrency levels (serve)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--recipe-preset", default="tiny", help="recipes: the model to train")
    p.add_argument("--recipe-minutes", type=float, default=10, help="recipes: wall-clock budget of each run")
    p.add_argument("--recipe-repeats", type=int, default=1, help="recipes: turns of each recipe")
    p.add_argument("--recipes", choices=list(RECIPES), nargs="+", default=list(RECIPES), help="recipes: which")
    p.add_argument("--recipe-flags", default="", help="recipes: train.py flags added to every recipe")
    p.add_argument("--out", default="generated_texts")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    facts = machine_facts()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only:  # each section writes its own JSON and plot, so one can be run again alone
        run, draw = SECTIONS[name]
        rows = run(args)
        name += f"_{args.recipe_preset}" if name == "recipes" else ""
        (out / f"bench_{name}.json").write_text(json.dumps({"torch": torch.__version__, "machine": facts,
                                                            "rows": rows}, indent=1))
        draw(rows, plt.subplots).savefig(out / f"bench_{name}.png", dpi=100, bbox_inches="tight")
        plt.close("all")
        print(f"wrote {out}/bench_{name}.json and .png")


if __name__ == "__main__":
    main()
