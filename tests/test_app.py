"""app.py in a real browser (Debian's headless Chromium, driven by Playwright) against the app on localhost,
and its responder in-process for the cases a browser cannot reach."""
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gradio as gr
import pytest
import torch
from playwright.sync_api import expect, sync_playwright

import app
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from config import get_config
from engine import Engine, EngineLoop, generate
from model import GPT

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]
PROMPT = "To be, or not to be"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(small_tokenizer, tmp_path_factory):
    """A random model whose greedy text varies (untied head) with margins far above float rounding."""
    torch.manual_seed(0)
    cfg = get_config("tiny", vocab_size=512, n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=128,
                     max_seq_len=128, init_std=0.2, tie_embeddings=False)
    path = tmp_path_factory.mktemp("app") / "run"
    save_checkpoint(path / "last.ckpt", {"model": GPT(cfg).state_dict(), "config": cfg.to_dict(),
                                         "tokenizer": small_tokenizer.to_str()})
    return path


@pytest.fixture(scope="module")
def app_port(checkpoint, tmp_path_factory):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--checkpoint", str(checkpoint), "--port", str(port),
                             "--device", "cpu"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={"GRADIO_ANALYTICS_ENABLED": "False", "PATH": "/usr/bin:/bin",
                                 "HOME": str(tmp_path_factory.mktemp("home"))})
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def test_greedy_completion_in_headless_chromium_equals_generate(app_port, checkpoint):
    model, tok = model_from_checkpoint(load_checkpoint(checkpoint))
    want = tok.decode(generate(model, [tok.encode(PROMPT)], 24, eos_id=tok.eos_id)[0][0])
    assert want.strip()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(f"http://127.0.0.1:{app_port}/")
        prompt = page.locator("#prompt textarea")
        assert prompt.get_attribute("maxlength") == str(app.MAX_PROMPT_CHARS)
        for slider, value in (("#temperature", "0"), ("#max_new", "24")):
            number = page.locator(f"{slider} input[type=number]")
            number.fill(value)
            number.press("Enter")
        prompt.fill(PROMPT)
        page.locator("#generate").click()
        expect(page.locator("#speed")).to_contain_text("tokens/s", timeout=60_000)
        assert page.locator("#completion textarea").input_value() == want
        out = ROOT / "generated_texts" / "app_screenshot.png"
        out.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        # An error shows in the UI, and the app keeps serving afterwards.
        prompt.fill("")
        page.locator("#generate").click()
        expect(page.get_by_text("prompt 1 is empty").first).to_be_visible(timeout=30_000)
        prompt.fill(PROMPT)
        page.locator("#generate").click()
        expect(page.locator("#speed")).to_contain_text("tokens/s", timeout=60_000)
        expect(page.locator("#completion textarea")).to_have_value(want, timeout=10_000)
        browser.close()


def test_binds_to_loopback_by_default(app_port):
    """The app was started without --host: its listening socket is on 127.0.0.1 only (/proc/net/tcp)."""
    listening = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                 if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == app_port]
    assert listening == [f"0100007F:{app_port:04X}"]


@pytest.fixture
def responder(checkpoint):
    model, tok = model_from_checkpoint(load_checkpoint(checkpoint))
    engine = Engine(model, rows=2, max_len=128, tokenizer=tok)
    return engine, app.make_responder(EngineLoop(engine).start(), tok, chat=False)


def test_prompt_over_the_cap_is_refused(responder):
    _, respond = responder
    with pytest.raises(gr.Error, match="prompt is 4001 characters; the limit is 4000"):
        list(respond("x" * 4001, 8, 0.0, 0, 1.0))


def test_failed_generation_shows_an_error_and_the_app_keeps_serving(responder):
    """A pass that raises: the UI shows the error, and the next generation works."""
    engine, respond = responder
    forward, calls = engine.runner.forward, []

    def failing_once(*args):
        calls.append(1)
        if len(calls) == 2:  # the first pass prefills; the second also decodes
            raise RuntimeError("simulated kernel failure")
        return forward(*args)
    engine.runner.forward = failing_once
    with pytest.raises(gr.Error, match="generation failed: RuntimeError: simulated kernel failure"):
        list(respond(PROMPT, 8, 0.0, 0, 1.0))
    text, status = list(respond(PROMPT, 8, 0.0, 0, 1.0))[-1]
    assert text and "tokens/s" in status
