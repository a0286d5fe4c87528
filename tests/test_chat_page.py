"""The chat page at `/`, in headless Chromium (Playwright driving Debian's `chromium` package)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from _serving import live_server, save_tiny_checkpoint
from levante.infer.batch import Engine
from levante.infer.engine import SamplingParams
from levante.infer.load import load_for_inference
from levante.tokenizer.chat import render_chat

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _browser_or_skip():
    if CHROMIUM is None:
        if os.environ.get("LEVANTE_REQUIRE_BROWSER"):  # CI installs chromium: never skip there
            pytest.fail("LEVANTE_REQUIRE_BROWSER is set but no chromium is installed")
        pytest.skip("no chromium on PATH (apt-get install chromium) to load the chat page in")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e .[dev])")
    return sync_playwright


def test_chat_page_streams_an_answer(tmp_path_factory, tiny_workspace):
    sync_playwright = _browser_or_skip()
    run = save_tiny_checkpoint(tmp_path_factory.mktemp("page"), tiny_workspace)
    model, tok, _ = load_for_inference(run, device="cpu")
    message = "Bonjour, comment ça va ?"
    ids = render_chat(tok, [{"role": "user", "content": message}])
    req = Engine(model, tok).submit(ids, SamplingParams(max_new_tokens=12, temperature=0),
                                    stop_ids={tok.end_id, tok.eos_id})
    expected = req.result()
    assert expected  # a non-empty greedy answer to look for

    from levante.infer.server import create_app

    engine = Engine(model, tok, max_batch=2)
    decode = engine._decode

    def paced_decode(reqs):  # tokens 50 ms apart, so the page gets them as separate events
        time.sleep(0.05)
        decode(reqs)

    engine._decode = paced_decode
    engine.start()
    artifacts = Path(os.environ.get("LEVANTE_TEST_ARTIFACTS", tmp_path_factory.mktemp("artifacts")))
    artifacts.mkdir(parents=True, exist_ok=True)
    try:
        with live_server(create_app(engine, "tiny", api_key="page-key")) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(url + "/?key=page-key")
            page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
            # count how often the answer's text changes: streaming shows it piece by piece
            page.evaluate("""() => { window.updates = 0;
                new MutationObserver(() => { window.updates += 1; })
                  .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
            }""")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "12")
            page.fill("#prompt", message)
            page.press("#prompt", "Enter")
            page.wait_for_selector(".assistant[data-done='true']", timeout=120_000)
            page.screenshot(path=str(artifacts / "chat_page.png"), full_page=True)
            answer = page.inner_text(".assistant")
            stats = page.inner_text("#stats")
            updates = page.evaluate("window.updates")
            user = page.inner_text(".user")
            browser.close()
    finally:
        engine.stop()
    assert user == message
    assert answer.strip() == expected.strip()  # innerText trims layout whitespace
    assert stats.startswith(f"{len(req.output_ids)} tokens, ") and stats.endswith(" tokens/s")  # from usage
    assert updates > 2  # the user bubble, the empty answer, then more than one streamed piece
    assert (artifacts / "chat_page.png").stat().st_size > 0
