"""The app in a real browser: Playwright driving Debian's Chromium (no browser download).

PHISUM_BROWSER_PROFILE=embedded runs it on the embedded model; PHISUM_SCREENSHOTS=DIR keeps the
screenshots (the README's come from `PHISUM_BROWSER_PROFILE=embedded PHISUM_SCREENSHOTS=assets/screenshots`).
"""

import os
import shutil
from pathlib import Path

import pytest

from phisum.ui.summarize_tab import PENDING
from tests.app_server import serve

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def backend(tiny_adapters):
    from phisum.backends import load_backend

    if os.environ.get("PHISUM_BROWSER_PROFILE") == "embedded":
        return load_backend("embedded", os.environ.get("PHISUM_BROWSER_BACKEND", "auto"), progress=False)
    return load_backend("tiny", "transformers", {k: str(v) for k, v in tiny_adapters.items()}, progress=False)


def test_three_tabs_in_chromium(backend, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    shots = Path(os.environ.get("PHISUM_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    slow = 1000 * (600 if backend.profile.name == "embedded" else 60)
    # Live ROUGE reads the bundled samples (the offline default): screenshots never show ../shared/data text.
    with serve(backend) as (url, _), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.wait_for_selector("#dialogue textarea", timeout=60_000)
        assert backend.profile.base_model in page.inner_text("#header")

        # Tab 1: before / after
        page.get_by_text("Sample dialogues").scroll_into_view_if_needed()
        page.fill("#dialogue textarea", "#Person1#: Are you coming to the party tonight?\n"
                                        "#Person2#: Yes, I'll bring a cake. See you at eight.")
        page.click("#summarize-btn")
        # one side may show first (llama.cpp: two requests), the other saying it is still generating
        page.wait_for_function("""(pending) => ['#base-summary', '#tuned-summary'].every(s => {
            const value = document.querySelector(s + ' textarea').value.trim();
            return value.length > 0 && value !== pending; })""", arg=PENDING, timeout=slow)
        base = page.input_value("#base-summary textarea")
        tuned = page.input_value("#tuned-summary textarea")
        assert base and tuned and PENDING not in (base, tuned)
        page.screenshot(path=str(shots / "before_after.png"), full_page=True)

        # Tab 2: chat, streamed reply
        page.get_by_role("tab", name="Chat").click()
        page.fill("#chat-input textarea", "Give me one tip for writing clear emails.")
        page.keyboard.press("Enter")
        page.wait_for_function("""() => {
            const bots = document.querySelectorAll('#chatbot .message-row.bot-row, #chatbot [data-testid=bot]');
            return bots.length > 0 && bots[bots.length - 1].innerText.trim().length > 0; }""", timeout=slow)
        # Text appeared while streaming; let the reply finish (stable for 3 s) before the screenshot.
        page.wait_for_function("""() => {
            const bots = document.querySelectorAll('#chatbot .message-row.bot-row, #chatbot [data-testid=bot]');
            const text = bots[bots.length - 1].innerText;
            const now = Date.now();
            if (window.__last !== text) { window.__last = text; window.__since = now; return false; }
            return now - window.__since > 3000; }""", timeout=slow, polling=500)
        page.screenshot(path=str(shots / "chat.png"), full_page=True)

        # Tab 3: live ROUGE with N = 3
        page.get_by_role("tab", name="Live ROUGE").click()
        number = page.locator("#rouge-n input[type=number]")
        number.fill("3")
        number.press("Enter")
        page.click("#rouge-btn")
        page.wait_for_function("() => document.querySelector('#rouge-aggregate').innerText.includes('ROUGE-1')",
                               timeout=slow)
        page.wait_for_selector("#rouge-chart img", timeout=30_000)
        # The table is virtualised; its grid states the row count (header + items).
        assert page.get_attribute("#rouge-table [role=grid]", "aria-rowcount") == "4"
        page.screenshot(path=str(shots / "live_rouge.png"), full_page=True)
        browser.close()
    assert all((shots / f).stat().st_size > 10_000 for f in ("before_after.png", "chat.png", "live_rouge.png"))
