"""Run by a peer's own Python (bench/peers.py starts it, in the venv bench/peers.sh made): one fixed batch through
OpenVINO GenAI or vLLM's CPU engine, greedy, every row exactly `new_tokens` long, after a warm-up batch. Prints
one JSON line: the seconds of the timed batch and the token ids of its first row. Imports nothing of ours.

  python bench/peer_run.py openvino|vllm MODEL_DIR PROMPT BATCH NEW_TOKENS THREADS
"""
import json
import sys
import time


def openvino(model_dir: str, prompt: str, batch: int, new_tokens: int, threads: int) -> tuple[float, list[int]]:
    import openvino_genai

    scheduler = openvino_genai.SchedulerConfig()
    scheduler.cache_size = 2  # GB of KV cache
    scheduler.max_num_seqs = max(batch, 1)
    pipe = openvino_genai.LLMPipeline(model_dir, "CPU", scheduler_config=scheduler, INFERENCE_NUM_THREADS=threads)
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = config.min_new_tokens = new_tokens
    config.ignore_eos, config.do_sample = True, False
    pipe.generate([prompt] * batch, config)
    t0 = time.perf_counter()
    pipe.generate([prompt] * batch, config)
    seconds = time.perf_counter() - t0
    one = pipe.generate(pipe.get_tokenizer().encode(prompt), config)  # token ids in, token ids out
    return seconds, [int(t) for t in one.tokens[0]]


def vllm(model_dir: str, prompt: str, batch: int, new_tokens: int, threads: int) -> tuple[float, list[int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="bfloat16", max_num_seqs=batch, max_model_len=1024, seed=0)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    llm.generate([prompt] * batch, params, use_tqdm=False)
    t0 = time.perf_counter()
    outputs = llm.generate([prompt] * batch, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    return seconds, list(outputs[0].outputs[0].token_ids)


if __name__ == "__main__":
    engine, model_dir, prompt, batch, new_tokens, threads = sys.argv[1:7]
    run = {"openvino": openvino, "vllm": vllm}[engine]
    seconds, first_row = run(model_dir, prompt, int(batch), int(new_tokens), int(threads))
    print(json.dumps({"seconds": seconds, "first_row": first_row}))
