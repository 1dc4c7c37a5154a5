"""evaluate.py: bits per byte against an independent count."""
import math

import numpy as np
import pytest
import torch

import data
from config import get_config
from evaluate import evaluate
from model import GPT


def test_evaluate_bits_per_byte_against_an_independent_count(small_tokenizer, shakespeare_dir):
    """evaluate() batches chunks and counts bytes with a per-token table. The reference scores one window at a
    time in float64 and counts the bytes of the targets decoded back to text by the tokenizer."""
    tok, seq = small_tokenizer, 64
    text = (shakespeare_dir / "tempest_gut.txt").read_text()[:20000]
    ids = np.array([tok.eos_id] + tok.encode(text), dtype=np.uint16)
    chunks = data.Chunks([ids], seq)
    torch.manual_seed(0)
    model = GPT(get_config("tiny", vocab_size=512, n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=128,
                           max_seq_len=seq))
    loss, bpb = evaluate(model, chunks, data.token_byte_lengths(tok), 8)
    nats = 0.0
    with torch.no_grad():
        for c in range(len(chunks)):
            window = torch.from_numpy(ids[c * seq: (c + 1) * seq + 1].astype(np.int64))
            log_probs = model(window[None, :-1])[0][0].double().log_softmax(-1)
            nats -= log_probs.gather(-1, window[1:, None]).sum().item()
    targets = ids[1: len(chunks) * seq + 1].tolist()  # the windows' targets, end to end
    n_bytes = len(tok.hf.decode(targets, skip_special_tokens=True).encode("utf-8"))
    assert loss == pytest.approx(nats / len(targets), rel=1e-5)
    assert bpb == pytest.approx(nats / math.log(2) / n_bytes, rel=2e-4)
