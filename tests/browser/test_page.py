"""The web page in real headless Chromium against the real Serve app (tiny model), over both transports.

Fake microphone: a WAV of speech played once. Checks that the page connects, converted audio comes back while the
microphone speaks, the page shows the latency, stopping frees the converter session, and a refused start (unknown
voice) shows the error instead of hanging; a live control moved mid-call is confirmed, the converted voice records
to a WAV, and WebRTC that cannot connect falls back to WebSocket quickly, leaving one session on the converter.
The fields span the protocol's ranges; the server's noise suppression turns the browser's own off; a start refused
for capacity is retried with a countdown and connects once there is room. A second app in identity mode measures
the round trip the serving path adds, as the browser sees it (printed; asserted only broadly, since timings here
are noisy).
"""

from __future__ import annotations

import dataclasses
import io
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
from app.serving.controls import StreamControls
from app.transport.protocol import (
    BLOCK_TIME_RANGE,
    CE_CONTEXT_RANGE,
    CFG_RATE_RANGE,
    DIFFUSION_STEPS_RANGE,
    DIT_CONTEXT_RANGE,
    GAIN_DB_RANGE,
    LOOKAHEAD_RANGE,
    PITCH_SHIFT_RANGE,
    RMS_MIX_RATE_RANGE,
    SILENCE_HANGOVER_RANGE,
    SILENCE_THRESHOLD_RANGE,
)
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


def open_page(browser: Browser, transport: str, init_script: str | None = None) -> Page:
    """The page with the API key entered and a voice listed; `init_script` runs before the page's own scripts."""
    # Playwright's wait_for_function compiles its predicate in the page (eval), which the page's Content-Security-
    # Policy refuses: these tests watch the page through it, so they bypass the policy. The policy itself is tested
    # below, with a page that has it, watched by polling (page.evaluate runs outside the page's CSP).
    context = browser.new_context(bypass_csp=True)
    if init_script is not None:
        context.add_init_script(init_script)
    page = context.new_page()
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


def wait_for_no_sessions(timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while converter_sessions() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert converter_sessions() == 0, "stopping did not free the converter session"


def stop_call(page: Page) -> None:
    page.click("#stop")
    page.wait_for_function("['closed', 'idle'].includes(window.vcState.connection)", timeout=CALL_TIMEOUT_MS)


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
    stop_call(page)
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
    wait_for_no_sessions()
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


# Keeps every text message the page sends (an init script runs before the page's own).
WATCH_SENT_TEXT = """
window.sentText = [];
const nativeSend = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
  if (typeof data === "string") window.sentText.push(JSON.parse(data));
  return nativeSend.call(this, data);
};
"""
LIVE_CONTROL = ("#control-pitch", "pitch_shift", 5)
READ_RECORDING = """() => fetch(document.querySelector("#recording-link").href)
  .then((response) => response.arrayBuffer())
  .then((buffer) => Array.from(new Uint8Array(buffer)))"""


def move_control(page: Page, selector: str, value: float) -> None:
    """As a user lets go of a slider: its value, then the input and change events."""
    page.eval_on_selector(
        selector,
        "(input, value) => { input.value = value; input.dispatchEvent(new Event('input'));"
        " input.dispatchEvent(new Event('change')); }",
        str(value),
    )


def test_a_control_moved_mid_call_is_confirmed_and_the_converted_voice_records(served, browser: Browser) -> None:
    """Over WebRTC (set_controls travels on the signalling socket): a control moved mid-call goes out alone, the
    server's controls_set confirms it and the call goes on; what was recorded downloads as a WAV of that length."""
    page = open_page(browser, "webrtc", init_script=WATCH_SENT_TEXT)
    page.click("#start")
    page.wait_for_function("window.vcState.blocks > 3", timeout=CALL_TIMEOUT_MS)
    page.click("#record")
    selector, field, value = LIVE_CONTROL
    move_control(page, selector, value)
    page.wait_for_function(f"window.vcState.controls && window.vcState.controls.{field} === {value}", timeout=10_000)
    sent = page.evaluate("window.sentText")
    assert "controls" not in sent[0], "neutral controls are not sent"
    assert [m for m in sent if m["type"] == "set_controls"] == [{"type": "set_controls", field: value}]
    blocks = state(page)["blocks"]
    page.wait_for_function(f"window.vcState.blocks > {blocks + 8}", timeout=CALL_TIMEOUT_MS)
    page.click("#record")
    page.wait_for_function("window.vcState.recordingSeconds !== null")
    assert (page.get_attribute("#recording-link", "download") or "").endswith(".wav")
    audio, rate = soundfile.read(io.BytesIO(bytes(page.evaluate(READ_RECORDING))), dtype="float32")
    assert rate == 48000 and audio.ndim == 1
    assert len(audio) / rate == pytest.approx(state(page)["recordingSeconds"], abs=0.02)
    assert len(audio) / rate > 0.5
    assert np.sqrt(np.mean(np.square(audio))) > 0.001, "the recording holds no converted voice"
    stop_call(page)
    assert state(page)["lastError"] is None
    wait_for_no_sessions()
    page.context.close()


# WebRTC that cannot connect, as with UDP blocked and no TURN server: the page's peer connection may use relay
# candidates only, and there are none. No candidate pair ever forms, so Chromium never reports "failed": the page's
# ICE deadline is what notices.
BLOCK_WEBRTC = """
const NativePeerConnection = window.RTCPeerConnection;
window.RTCPeerConnection = function (config) {
  return new NativePeerConnection({ ...config, iceTransportPolicy: "relay" });
};
window.RTCPeerConnection.prototype = NativePeerConnection.prototype;
"""
FALLBACK_WITHIN_MS = 3000


def test_blocked_webrtc_falls_back_quickly_and_the_converter_holds_one_session(served, browser: Browser) -> None:
    """The page ends the WebRTC session it gives up (else the converter would hold it 30 s for a resume) and is
    converting over WebSocket within 3 s of WebRTC's failure."""
    wait_for_no_sessions()
    page = open_page(browser, "webrtc", init_script=BLOCK_WEBRTC)
    started = time.monotonic()
    page.click("#start")
    page.wait_for_function(
        "window.vcState.transport === 'websocket (fallback)' && window.vcState.connection === 'connected'",
        timeout=CALL_TIMEOUT_MS,
    )
    figures = state(page)
    print(
        f"\n[fallback] WebRTC failed ({figures['fallbackReason']}); converting over WebSocket "
        f"{figures['fallbackMs']} ms later, {time.monotonic() - started:.1f} s after Start"
    )
    assert figures["fallbackReason"].startswith("ice_timeout")
    assert figures["fallbackMs"] < FALLBACK_WITHIN_MS
    assert converter_sessions() == 1, "the abandoned WebRTC session is still held"
    page.wait_for_function("window.vcState.blocks > 3", timeout=CALL_TIMEOUT_MS)
    assert converter_sessions() == 1
    stop_call(page)
    assert state(page)["lastError"] is None
    wait_for_no_sessions()
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
    """And a key that is refused empties the voice list: the voices of the key before it are not this one's."""
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
    # A key that stops working takes the voices listed for the previous one with it.
    poll(page, "document.querySelector('#voice-select').value !== ''")
    page.fill("#api-key", "another-wrong-key-0123456789")
    page.dispatch_event("#api-key", "change")
    poll(page, "window.vcState.lastError !== null && window.vcState.lastError.code === 'unauthorized'")
    assert page.evaluate("[...document.querySelectorAll('#voice-select option')].map(o => o.value)") == [""]
    assert page.evaluate("window.cspViolations") == []
    page.context.close()


# The protocol's ranges, by field: what the page's fields must span (it takes them from GET /v1/limits).
PROTOCOL_RANGES = {
    "block_time": BLOCK_TIME_RANGE,
    "lookahead": LOOKAHEAD_RANGE,
    "diffusion_steps": DIFFUSION_STEPS_RANGE,
    "cfg_rate": CFG_RATE_RANGE,
    "ce_context": CE_CONTEXT_RANGE,
    "dit_context": DIT_CONTEXT_RANGE,
    "pitch_shift": PITCH_SHIFT_RANGE,
    "input_gain_db": GAIN_DB_RANGE,
    "output_gain_db": GAIN_DB_RANGE,
    "rms_mix_rate": RMS_MIX_RATE_RANGE,
    "silence_threshold_dbfs": SILENCE_THRESHOLD_RANGE,
    "silence_hangover_s": SILENCE_HANGOVER_RANGE,
}
READ_FIELDS = """() => Object.fromEntries([...document.querySelectorAll("[data-control], [data-setting]")]
  .filter((element) => element.type !== "checkbox")
  .map((element) => [element.dataset.control || element.dataset.setting, {
    min: Number(element.min), max: Number(element.max), value: element.value,
    range: (document.querySelector(`label[for="${element.id}"] [data-range]`) || {}).textContent || null,
  }]))"""


def shown(value: float) -> str:
    """A limit as the page writes it: JavaScript's String(number), with a real minus sign."""
    return f"{value:g}".replace("-", "\u2212")


def test_the_fields_span_the_protocol_ranges(served, browser: Browser) -> None:
    """Every slider and number field of the page spans exactly its protocol range (app/transport/protocol.py), says
    it in its label, and starts at the server's neutral value: the page has no ranges of its own to drift."""
    page = open_page(browser, "websocket")
    page.wait_for_function("!document.querySelector('#start').disabled")  # the limits are in
    fields = page.evaluate(READ_FIELDS)
    assert {name: (field["min"], field["max"]) for name, field in fields.items()} == {
        name: (bounds.low, bounds.high) for name, bounds in PROTOCOL_RANGES.items()
    }
    assert fields["pitch_shift"]["min"] == -12 and fields["pitch_shift"]["max"] == 12
    for name in ("block_time", "diffusion_steps", "silence_threshold_dbfs"):
        low, high = PROTOCOL_RANGES[name]
        assert fields[name]["range"] == f"{shown(low)}\u2013{shown(high)}", fields[name]
    neutral = dataclasses.asdict(StreamControls())
    for name in ("pitch_shift", "input_gain_db", "rms_mix_rate", "silence_hangover_s"):
        assert float(fields[name]["value"]) == neutral[name], name
    assert fields["silence_threshold_dbfs"]["value"] == ""  # None: the converter's own gate
    page.context.close()


# Keeps every microphone track and peer connection the page makes (an init script runs before the page's own).
WATCH_MICROPHONE = """
window.micTracks = [];
const nativeGetUserMedia = MediaDevices.prototype.getUserMedia;
MediaDevices.prototype.getUserMedia = async function (constraints) {
  const stream = await nativeGetUserMedia.call(this, constraints);
  window.micTracks.push(...stream.getAudioTracks());
  return stream;
};
window.peerConnections = [];
const NativePeer = window.RTCPeerConnection;
window.RTCPeerConnection = function (config) {
  const pc = new NativePeer(config);
  window.peerConnections.push(pc);
  return pc;
};
window.RTCPeerConnection.prototype = NativePeer.prototype;
"""
READ_MICROPHONE = """() => {
  const described = (track) => ({
    suppresses: track.getSettings().noiseSuppression,
    asked: track.getConstraints().noiseSuppression ?? null,
  });
  const pc = window.peerConnections[window.peerConnections.length - 1];
  return {
    live: window.micTracks.filter((track) => track.readyState === "live").map(described),
    sent: pc.getSenders().filter((sender) => sender.track).map((sender) => ({
      ...described(sender.track), live: sender.track.readyState === "live",
      ours: window.micTracks.includes(sender.track),
    })),
  };
}"""
BROWSER_SUPPRESSES = {"suppresses": False, "asked": False}
# Chromium's default (nothing asked) is to suppress noise itself.
BROWSER_DEFAULT = {"suppresses": True, "asked": None}


def wait_for_microphone(page: Page, expected: dict) -> dict:
    """Until the one live microphone track, and the track the call sends, are as expected."""
    deadline = time.monotonic() + 10
    while True:
        microphone = page.evaluate(READ_MICROPHONE)
        if microphone == {"live": [expected], "sent": [{**expected, "live": True, "ours": True}]}:
            return microphone
        assert time.monotonic() < deadline, microphone
        time.sleep(0.1)


def test_noise_suppression_turns_the_browsers_own_off(served, browser: Browser) -> None:
    """The server's noise suppression on: the microphone is opened with the browser's own off, so the voice is not
    suppressed twice; turned off and on mid-call, the microphone follows (the browser's default, then off again), the
    call sends the new track and goes on."""
    page = open_page(browser, "webrtc", init_script=WATCH_MICROPHONE + WATCH_SENT_TEXT)
    page.check("#control-noise")
    page.click("#start")
    page.wait_for_function("window.vcState.blocks > 3", timeout=CALL_TIMEOUT_MS)
    assert page.evaluate("window.sentText")[0]["controls"] == {"noise_suppression": True}
    wait_for_microphone(page, BROWSER_SUPPRESSES)
    for server_on, expected in ((False, BROWSER_DEFAULT), (True, BROWSER_SUPPRESSES)):
        page.set_checked("#control-noise", server_on)
        page.wait_for_function(
            f"window.vcState.controls && window.vcState.controls.noise_suppression === {str(server_on).lower()}",
            timeout=10_000,
        )
        wait_for_microphone(page, expected)
        blocks = state(page)["blocks"]
        page.wait_for_function(f"window.vcState.blocks > {blocks + 3}", timeout=CALL_TIMEOUT_MS)
    assert state(page)["lastError"] is None and state(page)["connection"] == "connected"
    stop_call(page)
    wait_for_no_sessions()
    page.context.close()


@pytest.fixture(scope="module")
def one_slot(served, parity: ParitySet, tmp_path_factory: pytest.TempPathFactory):
    """The service with room for one session only, telling refused callers to come back in 1 s."""
    return start_app(
        parity,
        tmp_path_factory.mktemp("voices-one-slot"),
        converters=1,
        max_sessions=1,
        ingress={**LOOPBACK_ICE, "retry_after_s": 1.0},
    )


def test_a_start_refused_for_capacity_is_retried_and_says_so(one_slot, browser: Browser) -> None:
    """A second caller while the only slot is taken: the page says it is busy and counts down to the next try (the
    wait doubling, as the Python client's), and connects once the slot frees; a third caller may cancel the wait."""
    first = open_page(browser, "websocket")
    first.click("#start")
    first.wait_for_function("window.vcState.blocks > 0", timeout=CALL_TIMEOUT_MS)
    second = open_page(browser, "websocket")
    second.click("#start")
    second.wait_for_function("window.vcState.startRetry !== null", timeout=CALL_TIMEOUT_MS)
    assert state(second)["startRetry"] == {"code": "overloaded", "attempt": 1, "of": 5, "waitS": 1.0}
    status = second.text_content("#status") or ""
    assert "Busy" in status and "Retrying in" in status, status
    assert second.is_visible("#cancel-retry") and state(second)["connection"] == "waiting"
    second.wait_for_function("window.vcState.startRetry && window.vcState.startRetry.attempt === 2", timeout=10_000)
    assert state(second)["startRetry"]["waitS"] == 2.0  # doubled
    stop_call(first)
    second.wait_for_function(
        "window.vcState.connection === 'connected' && window.vcState.blocks > 0", timeout=CALL_TIMEOUT_MS
    )
    assert 2 <= state(second)["startRetries"] <= 5
    assert not second.is_visible("#cancel-retry")
    assert converter_sessions() == 1

    third = open_page(browser, "websocket", init_script=WATCH_SENT_TEXT)
    third.click("#start")
    third.wait_for_function("window.vcState.startRetry !== null", timeout=CALL_TIMEOUT_MS)
    third.click("#cancel-retry")
    third.wait_for_function("window.vcState.connection === 'closed'")
    time.sleep(2.0)  # past the next try, had it not been cancelled
    assert [m["type"] for m in third.evaluate("window.sentText")].count("start") == 1
    assert state(third)["connection"] == "closed" and (third.text_content("#status") or "") == "Stopped."
    stop_call(second)
    wait_for_no_sessions()
    for page in (first, second, third):
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
