"""serve.py: a real server process on a free loopback port, called with the official openai client and httpx."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from checkpoint import load_model, save_checkpoint
from config import get_config
from engine import Engine, Request
from model import GPT

ROOT = Path(__file__).resolve().parent.parent
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QUESTIONS = ["To be, or not to be", "O Romeo, Romeo", "Friends, Romans, countrymen", "Now is the winter"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(small_tokenizer, tmp_path_factory):
    """A random model whose greedy text varies (untied head), with a ChatML template, as tiny-chat."""
    torch.manual_seed(0)
    cfg = get_config("tiny", vocab_size=512, n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=128,
                     max_seq_len=256, init_std=0.2, tie_embeddings=False)
    path = tmp_path_factory.mktemp("serve") / "tiny-chat"
    save_checkpoint(path / "last.ckpt", {"model": GPT(cfg).state_dict(), "config": cfg.to_dict(),
                                         "tokenizer": small_tokenizer.to_str(), "chat_template": CHATML})
    return path


def start_server(checkpoint, *flags):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", str(checkpoint), "--port", str(port),
                             "--device", "cpu", *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        try:
            httpx.get(f"{url}/health", timeout=2)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)


@pytest.fixture(scope="module")
def server(checkpoint):
    proc, url = start_server(checkpoint, "--batch-size", "8")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def cli_completion(checkpoint, prompt: str, max_new: int, chat: bool) -> str:
    """What inference.py writes for the same prompt, greedy."""
    out = checkpoint / f"cli-{abs(hash((prompt, chat)))}.jsonl"
    done = subprocess.run([sys.executable, "inference.py", "--checkpoint", str(checkpoint), "--prompt", prompt,
                           "--temperature", "0", "--max-new-tokens", str(max_new), "--output", str(out),
                           *(["--chat"] if chat else [])], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())["completion"]


def test_completions_equal_inference_py(client, checkpoint):
    want = cli_completion(checkpoint, QUESTIONS[0], 24, chat=False)
    got = client.completions.create(model="tiny-chat", prompt=QUESTIONS[0], max_tokens=24, temperature=0)
    assert got.choices[0].text == want and got.choices[0].finish_reason in ("stop", "length")
    assert got.usage.completion_tokens <= 24 and got.usage.total_tokens == got.usage.prompt_tokens + \
        got.usage.completion_tokens
    chunks = list(client.completions.create(model="tiny-chat", prompt=QUESTIONS[0], max_tokens=24, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want and len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason


def test_chat_equals_inference_py_chat(client, checkpoint):
    want = cli_completion(checkpoint, QUESTIONS[1], 24, chat=True)
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    got = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=24, temperature=0)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=24, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason


def test_stop_strings_and_seed(client):
    free = client.completions.create(model="tiny-chat", prompt=QUESTIONS[2], max_tokens=32, temperature=0)
    text = free.choices[0].text
    stop = text[5:8]
    cut = client.completions.create(model="tiny-chat", prompt=QUESTIONS[2], max_tokens=32, temperature=0,
                                    stop=[stop, "zzz"])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model="tiny-chat", prompt=QUESTIONS[2], max_tokens=16, temperature=1,
                                         seed=seed).choices[0].text for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


def solo_answers(checkpoint, n: int) -> list[str]:
    """Each chat prompt generated alone (one row), greedy, as the reference for the concurrent test."""
    model, tok = load_model(str(checkpoint), "cpu", "fp32")
    answers = []
    for i in range(n):
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": f"{QUESTIONS[i % 4]} {i}"}]))
        request = Request(ids, 20 + i % 12)
        for _ in Engine(model, rows=1, max_len=256, tokenizer=tok).run([request]):
            pass
        answers.append(request.text)
    return answers


def test_32_concurrent_streams_each_equal_its_solo_answer(client, checkpoint):
    """32 streaming clients at once through 8 rows: requests queue, join as rows free, and each answer is
    complete and equal to the same prompt generated alone."""
    got = [None] * 32

    def ask(i):
        stream = client.chat.completions.create(model="tiny-chat", stream=True, temperature=0,
                                                max_tokens=20 + i % 12,
                                                messages=[{"role": "user", "content": f"{QUESTIONS[i % 4]} {i}"}])
        got[i] = "".join(c.choices[0].delta.content or "" for c in stream)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert got == solo_answers(checkpoint, 32)


def wait_for_idle(url: str, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while (health := httpx.get(f"{url}/health").json())["active_rows"] or health["queued"]:
        assert time.time() < deadline, health
        time.sleep(0.05)
    return health


def test_clients_that_disconnect_mid_stream_free_their_rows(server, client):
    body = {"model": "tiny-chat", "prompt": QUESTIONS[3], "max_tokens": 200, "temperature": 0, "stream": True}
    for _ in range(20):
        with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as response:
            assert response.status_code == 200
            for n, _ in enumerate(response.iter_lines()):
                if n == 4:
                    break  # leave after a few chunks, long before 200 tokens
    assert wait_for_idle(server)["rows"] == 8
    assert client.completions.create(model="tiny-chat", prompt="O", max_tokens=5, temperature=0).choices[0].text


BAD = [  # (json body or raw bytes, status, text in the message)
    (b"{not json", 400, "not valid JSON"),
    ({"prompt": "hi"}, 400, "must provide a model"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
    ({"model": "tiny-chat"}, 400, "'prompt' must be a non-empty string"),
    ({"model": "tiny-chat", "prompt": ""}, 400, "'prompt' must be a non-empty string"),
    ({"model": "tiny-chat", "prompt": "hi", "max_tokens": 5000}, 400,
     "5000 new tokens leave no room for a prompt in the 256-token context of this server"),
    ({"model": "tiny-chat", "prompt": "to be " * 300}, 400,
     "fit before 16 new tokens in the 256-token context of this server"),
    ({"model": "tiny-chat", "prompt": "hi", "temperature": -1}, 400, "'temperature' must be in [0, 2]"),
    ({"model": "tiny-chat", "prompt": "hi", "top_p": 0}, 400, "'top_p' must be in (0, 1]"),
    ({"model": "tiny-chat", "prompt": "hi", "max_tokens": "ten"}, 400, "'max_tokens' must be an integer"),
    ({"model": "tiny-chat", "prompt": "hi", "n": 2}, 400, "'n' must be 1"),
    ({"model": "tiny-chat", "prompt": "hi", "logprobs": 3}, 400, "'logprobs' is not supported"),
    ({"model": "tiny-chat", "prompt": "hi", "stop": [""]}, 400, "'stop' must be"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[str(b[2]) for b in BAD])
def test_bad_requests_get_their_status_and_the_next_request_is_served(server, client, body, status, message):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(f"{server}/v1/completions", headers={"Content-Type": "application/json"}, timeout=30,
                          **kwargs)
    assert response.status_code == status
    assert message in response.json()["error"]["message"]
    assert client.completions.create(model="tiny-chat", prompt="O", max_tokens=3, temperature=0).choices[0].text


def test_bad_chat_requests_through_the_client(client):
    with pytest.raises(openai.BadRequestError, match="'messages' must be a non-empty list"):
        client.chat.completions.create(model="tiny-chat", messages=[])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert client.models.list().data[0].id == "tiny-chat"


def test_api_key_and_a_full_queue(checkpoint):
    """--api-key: 401 without or with a wrong key. --max-queue 1 with one row: a burst gets 429 + Retry-After."""
    proc, url = start_server(checkpoint, "--api-key", "sekrit", "--batch-size", "1", "--max-queue", "1")
    try:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            response = httpx.post(f"{url}/v1/completions", json={"model": "tiny-chat", "prompt": "hi"},
                                  headers=headers)
            assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0, timeout=60)
        statuses, retry_after = [], []

        def ask():
            response = httpx.post(f"{url}/v1/completions", headers={"Authorization": "Bearer sekrit"},
                                  json={"model": "tiny-chat", "prompt": "to be", "max_tokens": 200,
                                        "temperature": 0}, timeout=120)
            statuses.append(response.status_code)
            retry_after.append(response.headers.get("retry-after"))
        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert statuses.count(200) >= 2 and 429 in statuses
        assert all(r == "1" for s, r in zip(statuses, retry_after) if s == 429)
        wait_for_idle(url)
        assert good.completions.create(model="tiny-chat", prompt="O", max_tokens=3, temperature=0).choices[0].text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
