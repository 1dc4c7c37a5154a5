"""lm-evaluation-harness, the real one from PyPI, scores a trained checkpoint through serve.py: a multiple-choice
task on local files ("which line comes next", from the corpus), run with `lm_eval --model local-completions`.
Its per-choice loglikelihoods and its accuracy must equal a direct full forward of the same text."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convert
import train
from checkpoint import load_model
from data import shakespeare_split
from tests.test_serve import start_server
from tests.test_train import small_run

ROOT = Path(__file__).resolve().parent.parent
TASK = """task: next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""


def next_line_docs(shakespeare_dir: Path, count: int, seed: int = 0) -> list[dict]:
    """Pairs of consecutive lines from a held-out play: the true next line among 3 others, at a random place."""
    _, val = shakespeare_split(shakespeare_dir)
    lines = [line.strip() for line in Path(val[0]).read_text(encoding="utf-8").splitlines()
             if 20 < len(line.strip()) < 60]
    rng, docs = random.Random(seed), []
    for i in rng.sample(range(len(lines) - 1), count):
        choices = [lines[i + 1], *rng.sample(lines, 3)]
        rng.shuffle(choices)
        docs.append({"context": lines[i], "choices": choices, "gold": choices.index(lines[i + 1])})
    return docs


def loglikelihood(model, tok, context: str, continuation: str) -> float:
    """The continuation's log-probability after the context, from one forward of the whole text, split where
    lm-eval splits it (trailing spaces of the context move to the continuation; the context's own tokens)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    with torch.no_grad():
        logits, _ = model(torch.tensor([whole]))
    logprobs = logits[0, :-1].float().log_softmax(dim=-1)
    return sum(logprobs[j - 1, whole[j]].item() for j in range(len(ctx), len(whole)))


def test_lm_eval_scores_a_checkpoint_through_the_server(tok_path, shakespeare_dir, tmp_path):
    train.main(small_run(tok_path, tmp_path, "--max-steps", "30", "--micro-batch", "4", "--tokens-per-step", "512",
                         "--max-seq-len", "128"))
    run = tmp_path / "run"
    convert.main(["to-hf", str(run), "--out", str(tmp_path / "hf")])  # lm-eval's tokenizer: ours, as transformers'
    docs = next_line_docs(shakespeare_dir, 12)
    (tmp_path / "next_line.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "next_line.yaml").write_text(TASK.format(data=tmp_path / "next_line.jsonl"))
    proc, url = start_server(run, "--batch-size", "4")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
             f"model=run,base_url={url}/v1/completions,tokenizer={tmp_path / 'hf'},tokenizer_backend=huggingface,"
             f"tokenized_requests=True,num_concurrent=1,max_retries=1,max_length=128",
             "--tasks", "next_line", "--include_path", str(tmp_path / "tasks"), "--output_path", str(tmp_path / "out"),
             "--log_samples"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
            env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert done.returncode == 0, done.stderr[-4000:]
    samples = [json.loads(line) for path in (tmp_path / "out").rglob("samples_next_line_*.jsonl")
               for line in path.read_text().splitlines()]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["next_line"]
    assert len(samples) == len(docs)
    model, tok = load_model(str(run), "cpu")
    correct = 0
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = docs[sample["doc_id"]]
        theirs = [float(resp[0][0]) for resp in sample["resps"]]  # logged as text
        ours = [loglikelihood(model, tok, sample["arguments"][f"gen_args_{c}"]["arg_0"],
                              sample["arguments"][f"gen_args_{c}"]["arg_1"]) for c in range(len(doc["choices"]))]
        assert theirs == pytest.approx(ours, abs=1e-4), sample["doc_id"]
        correct += max(range(len(ours)), key=ours.__getitem__) == doc["gold"]
        assert sample["acc"] == float(max(range(len(ours)), key=ours.__getitem__) == doc["gold"])
    assert results["acc,none"] == pytest.approx(correct / len(docs))
