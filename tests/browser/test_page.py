"""The web page in real headless Chromium against the real Serve app (tiny model), over both transports.

Fake microphone: a WAV of speech played once. Checks that the page connects, converted audio comes back while the
microphone speaks, the page shows the latency, stopping frees the converter session, and a refused start (unknown
voice) shows the error instead of hanging. A second app in identity mode measures the round trip the serving path
adds, as the browser sees it (printed; asserted only broadly, since timings here are noisy).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from playwright.sync_api import Browser, Page, sync_playwright

from app.audio.files import resample
from bench.harness import API_KEY, BASE_URL, local_ray, start_app
from bench.parity import ParitySet
from client.api import delete_voice, upload_voice
from tests.browser.conftest import CHROMIUM

TRANSPORTS = ["webrtc", "websocket"]
# Loopback on both sides: offered by the ingress, and a destination it may send ICE checks to (outbound filter).
LOOPBACK_ICE = {"ice_host_addresses": ["127.0.0.1"], "outbound_networks": ["127.0.0.0/8"]}
CALL_TIMEOUT_MS = 60_000
DIFFUSION_STEPS = 3  # keeps the tiny model well ahead of real time on 2 shared cores


def chromium_flags(microphone: Path, loop: bool = False) -> list[str]:
    """/work/shared/notes/browser-e2e.md: without these Chromium reaches for the internet or hangs on ICE. The fake
    microphone plays the file once, or over and over with `loop`."""
    return [
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone}{'' if loop else '%noloop'}",
        "--autoplay-policy=no-user-gesture-required",
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns,NetworkTimeServiceQuerying,OptimizationHints,MediaRouter",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ]


@pytest.fixture(scope="module")
def microphone(parity: ParitySet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    speech = resample(torch.from_numpy(parity.wav("source_16k")), 16000, 48000).numpy()
    path = tmp_path_factory.mktemp("mic") / "speech.wav"
    soundfile.write(path, np.concatenate([speech, speech]), 48000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def browser(microphone: Path) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=chromium_flags(microphone))
        yield browser
        browser.close()


def open_page(browser: Browser, transport: str) -> Page:
    # Playwright's wait_for_function compiles its predicate in the page (eval), which the page's Content-Security-
    # Policy refuses: these tests watch the page through it, so they bypass the policy. The policy itself is tested
    # below, with a page that has it, watched by polling (page.evaluate runs outside the page's CSP).
    page = browser.new_context(bypass_csp=True).new_page()
    page.goto(f"{BASE_URL}/")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.querySelector('#voice-select').value !== ''", timeout=30_000)
    page.select_option("#transport", transport)
    # The setting sits in a collapsed <details>; set it the way the page reads it.
    page.eval_on_selector(
        "#setting-diffusion-steps", "(input, steps) => { input.value = steps; }", str(DIFFUSION_STEPS)
    )
    return page


def state(page: Page) -> dict:
    return page.evaluate("JSON.parse(JSON.stringify(window.vcState))")


def converter_sessions() -> int:
    """Sessions held by the (single) converter, from /readyz: Playwright's sync API keeps an event loop running in
    this thread, where Ray's blocking handle calls refuse to run."""
    with urllib.request.urlopen(f"{BASE_URL}/readyz", timeout=10) as response:
        return json.loads(response.read())["converter"]["sessions"]


def run_call(page: Page, transport: str, seconds: float) -> list[dict]:
    """Start, sample the live figures every 100 ms for `seconds`, stop; returns the samples."""
    page.click("#start")
    page.wait_for_function("window.vcState.blocks > 0", timeout=CALL_TIMEOUT_MS)
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append(state(page))
        time.sleep(0.1)
    assert state(page)["transport"] == transport, state(page)
    page.click("#stop")
    page.wait_for_function("['closed', 'idle'].includes(window.vcState.connection)", timeout=CALL_TIMEOUT_MS)
    return samples


@pytest.fixture(scope="module")
def served(parity: ParitySet, tmp_path_factory: pytest.TempPathFactory):
    with local_ray():
        yield start_app(parity, tmp_path_factory.mktemp("voices"), converters=1, ingress=LOOPBACK_ICE)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_call_converts_speech_and_stopping_frees_the_session(served, browser: Browser, transport: str) -> None:
    page = open_page(browser, transport)
    samples = run_call(page, transport, seconds=5.0)
    speaking = [s for s in samples if s["inputRms"] > 0.01]
    assert speaking, "the fake microphone was silent"
    audible = [s for s in speaking if s["outputRms"] > 0.001]
    assert len(audible) >= 0.7 * len(speaking), f"converted audio missing: {len(audible)}/{len(speaking)}"
    assert samples[-1]["blocks"] >= 10
    assert samples[-1]["latencyMs"] is not None and samples[-1]["latencyMs"] > 0
    assert (page.text_content("#latency") or "").endswith("ms")
    assert samples[-1]["lastError"] is None
    deadline = time.monotonic() + 15
    while converter_sessions() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert converter_sessions() == 0, "stopping did not free the converter session"
    page.context.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_refused_start_shows_the_error(served, browser: Browser, transport: str) -> None:
    page = open_page(browser, transport)
    doomed = upload_voice(BASE_URL, served.token, served.parity.root / served.parity.bundle["files"]["reference_22k"])
    page.click("#refresh-voices")
    page.wait_for_function(
        f"[...document.querySelectorAll('#voice-select option')].some(o => o.value === '{doomed['voice_id']}')"
    )
    page.select_option("#voice-select", doomed["voice_id"])
    delete_voice(BASE_URL, served.token, doomed["voice_id"])
    page.click("#start")
    page.wait_for_function("window.vcState.lastError !== null", timeout=CALL_TIMEOUT_MS)
    assert state(page)["lastError"]["code"] == "unknown_voice"
    assert "unknown_voice" in (page.text_content("#status") or "")
    assert page.get_attribute("#status", "data-kind") == "error"
    page.context.close()


# Collects the page's Content-Security-Policy violations (an init script runs before the page's own, outside its CSP).
WATCH_CSP = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.cspViolations.push(`${event.effectiveDirective} ${event.blockedURI}`);
});
"""
INJECT_INLINE_SCRIPT = """() => {
  const script = document.createElement("script");
  script.textContent = "window.injected = true";
  document.head.append(script);
  return window.injected === true;
}"""


def poll(page: Page, expression: str, timeout_s: float = CALL_TIMEOUT_MS / 1000) -> None:
    """Waits until `expression` is true in the page, polling from here (wait_for_function would need eval)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"not within {timeout_s:g} s: {expression}"
        time.sleep(0.1)


def page_under_csp(browser: Browser) -> Page:
    context = browser.new_context()
    context.add_init_script(WATCH_CSP)
    page = context.new_page()
    response = page.goto(f"{BASE_URL}/")
    assert response is not None and "script-src 'self'" in response.headers["content-security-policy"]
    return page


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_page_works_under_its_csp_which_blocks_injected_script(served, browser: Browser, transport: str) -> None:
    """The page's own needs pass its Content-Security-Policy (scripts, the capture worklet, WebCodecs, WebSockets,
    WebRTC): a call works with no violation. Script injected inline (what an XSS would do) does not run."""
    page = page_under_csp(browser)
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    poll(page, "document.querySelector('#voice-select').value !== ''")
    page.select_option("#transport", transport)
    page.click("#start")
    poll(page, "window.vcState.blocks > 3")
    assert state(page)["transport"] == transport and state(page)["outputRms"] >= 0
    page.click("#stop")
    poll(page, "['closed', 'idle'].includes(window.vcState.connection)")
    assert state(page)["lastError"] is None
    assert page.evaluate("window.cspViolations") == []
    assert page.evaluate(INJECT_INLINE_SCRIPT) is False
    assert page.evaluate("window.cspViolations")[0].startswith("script-src")
    page.context.close()


def test_the_api_key_is_saved_only_when_asked_and_only_once_it_worked(served, browser: Browser) -> None:
    page = page_under_csp(browser)
    stored = "localStorage.getItem('seedvc.apiKey')"
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    poll(page, "document.querySelector('#voice-select').value !== ''")
    assert page.evaluate(stored) is None, "kept for the page's lifetime only"
    page.reload()
    assert page.input_value("#api-key") == "" and not page.is_checked("#remember-key")
    page.fill("#api-key", "a-wrong-key-0123456789")
    page.check("#remember-key")
    page.dispatch_event("#api-key", "change")
    poll(page, "window.vcState.lastError !== null && window.vcState.lastError.code === 'unauthorized'")
    assert page.evaluate(stored) is None, "a key that did not work is never saved"
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    poll(page, f"{stored} !== null")
    assert page.evaluate(stored) == API_KEY
    page.reload()
    assert page.input_value("#api-key") == API_KEY and page.is_checked("#remember-key")
    page.uncheck("#remember-key")
    assert page.evaluate(stored) is None
    assert page.evaluate("window.cspViolations") == []
    page.context.close()


@pytest.fixture(scope="module")
def identity(served, parity: ParitySet, tmp_path_factory: pytest.TempPathFactory):
    """The same service with the converter in identity mode: what remains is the serving path itself."""
    return start_app(
        parity, tmp_path_factory.mktemp("voices-identity"), converters=1, identity=True, ingress=LOOPBACK_ICE
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_identity_round_trip_is_reported(identity, browser: Browser, transport: str) -> None:
    page = open_page(browser, transport)
    samples = run_call(page, transport, seconds=5.0)
    latencies = [s["latencyMs"] for s in samples if s["latencyMs"] is not None]
    server = [s["serverLatencyMs"] for s in samples if s["serverLatencyMs"] is not None]
    assert latencies and server
    print(
        f"\n[identity round trip, {transport}] browser-visible median {np.median(latencies):.0f} ms "
        f"(p90 {np.percentile(latencies, 90):.0f}), server block latency median {np.median(server):.0f} ms"
    )
    assert 0 < np.median(latencies) < 5000
    page.context.close()
