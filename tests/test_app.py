"""app.py in a real browser: Debian's headless Chromium, driven by Playwright, against the app on localhost."""
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from checkpoint import save_checkpoint
from config import get_config
from model import GPT

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(small_tokenizer, tmp_path_factory):
    cfg = get_config("tiny", vocab_size=512, n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_hidden=128,
                     max_seq_len=128, init_std=0.1)
    ckpt = tmp_path_factory.mktemp("app") / "run"
    save_checkpoint(ckpt / "last.ckpt", {"model": GPT(cfg).state_dict(), "config": cfg.to_dict(),
                                         "tokenizer": small_tokenizer.to_str()})
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--checkpoint", str(ckpt), "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={"GRADIO_ANALYTICS_ENABLED": "False", "PATH": "/usr/bin:/bin",
                                 "HOME": str(tmp_path_factory.mktemp("home"))})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_generate_in_headless_chromium(app_url):
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(app_url)
        prompt = page.locator("#prompt textarea")
        prompt.fill("To be, or not to be")
        page.locator("#generate").click()
        completion = page.locator("#completion textarea")
        expect(completion).not_to_have_value("", timeout=60_000)
        expect(page.locator("#speed")).to_contain_text("tokens/s", timeout=60_000)
        assert len(completion.input_value()) > 0
        out = ROOT / "generated_texts" / "app_screenshot.png"
        out.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        # An error shows in the UI, and the app keeps serving afterwards.
        prompt.fill("")
        page.locator("#generate").click()
        expect(page.get_by_text("prompt 1 is empty").first).to_be_visible(timeout=30_000)
        prompt.fill("Once upon a time")
        page.locator("#generate").click()
        expect(page.locator("#speed")).to_contain_text("tokens/s", timeout=60_000)
        browser.close()
    assert urllib.request.urlopen(app_url, timeout=5).status == 200
