"""The demo page in a real browser: Debian's Chromium driven by Playwright (scripts/setup.sh
installs both) against a real server on loopback (the stand-in LLM, the tiny codec). The page
streams text word by word over the WebSocket and plays audio through an AudioWorklet; the test
reads the page's own counters, and leaves a screenshot in out/demo-page.png."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import pytest_asyncio

from .servers import running_server, tiny_codec_options

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tmp_path_factory):
    options = tiny_codec_options(
        llm_standin_rate=50.0,  # about real time: audio streams while words are still typed
        data_dir=str(tmp_path_factory.mktemp("voices")),
        http_port=0,
        metrics_port=None,
        max_streams=2,
    )
    async with running_server(options) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser():
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"],
        )
        yield browser
        await browser.close()


async def test_the_page_plays_audio_while_text_is_still_sent(server, browser):
    page = await browser.new_page(viewport={"width": 1000, "height": 880})
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    await page.goto(f"http://127.0.0.1:{server.http_port}/")
    await page.wait_for_function("document.getElementById('voice').options.length > 0")
    banner = page.get_by_test_id("banner")
    assert "RANDOM WEIGHTS" in await banner.inner_text()
    assert await banner.get_attribute("data-random-weights") == "true"

    await page.fill("#wordMs", "150")
    await page.click("#speak")
    stats = "window.miottsDemo.stats"
    ended = f"{stats}.summary !== null || {stats}.error !== null"
    await page.wait_for_function(ended, timeout=60000)
    # Playback keeps going after the stream ends: wait (bounded) until some has played.
    await page.wait_for_function(f"{stats}.samplesPlayed > 0", timeout=10000)
    result = await page.evaluate(stats)
    words = len((await page.input_value("#text")).split())
    (ROOT / "out").mkdir(exist_ok=True)
    await page.screenshot(path=str(ROOT / "out" / "demo-page.png"))
    await page.close()

    assert not errors and result["error"] is None
    assert result["textMessagesSent"] == words
    # Audio arrived while the page was still sending words: streaming, both ways.
    assert 0 < result["textSentAtFirstAudio"] < words
    assert result["framesReceived"] > 1
    summary = result["summary"]
    assert summary["random_weights"] is True
    received = result["samplesReceived"]
    assert received == round(summary["audio_seconds"] * summary["sample_rate_hz"])
    assert result["samplesScheduled"] == received  # every frame went to the AudioWorklet
    assert result["flushAcks"] >= 1  # the page flushes after each sentence, with an id
    assert result["ttfaMs"] > 0
    assert not server.engine.sessions
