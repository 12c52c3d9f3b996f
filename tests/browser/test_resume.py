"""The web page gets a call back when the ingress replica serving it dies, over both transports, in headless Chromium.

The app runs two ingress replicas, as production does, so that the page can reconnect to the other one at once, and
two converters. Which replicas serve the page's call is up to Serve; the test reads them from the replicas' own logs
(every replica writes its log to a directory the test chose, and the ingress names the session it opened and the
converter it opened it on), so that it always kills the replica holding the call and every run exercises the path
under test:

- the ingress alone dies: the page shows "reconnecting", then comes back in the same session ("resumed"), its block
  indexes going on, converted audio flowing again;
- the ingress and the session's converter die together: the resume finds nothing (`session_expired`) and the page
  goes on in a new session ("new session").

Either way the call then ends cleanly. Ray's blocking handle calls refuse to run in Playwright's thread (see
test_page.converter_sessions); the named-actor calls used here (list, get, kill) do not need an event loop.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import soundfile
import torch
from playwright.sync_api import Browser, Page, sync_playwright

from app.audio.files import resample
from bench.harness import APP, ServeApp, local_ray, start_app
from bench.parity import ParitySet
from tests.browser.conftest import CHROMIUM
from tests.browser.test_page import CALL_TIMEOUT_MS, LOOPBACK_ICE, TRANSPORTS, chromium_flags, open_page, state

BLOCKS_BEFORE = 25  # 4.5 s of 180 ms blocks: well under way before the fault
BLOCKS_AFTER = 25  # and as many after it
BACK_TIMEOUT_MS = 20_000  # the page gives up after 6 tries spanning 7.5 s (plus each try's own time)
REPLICA_WAIT_S = 60.0  # Serve replacing the replicas the previous test killed


@pytest.fixture(scope="module")
def looping_microphone(parity: ParitySet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Speech that goes on for the whole call (the fake device loops the file): audio must flow after the fault."""
    speech = resample(torch.from_numpy(parity.wav("source_16k")), 16000, 48000).numpy()
    path = tmp_path_factory.mktemp("mic-loop") / "speech.wav"
    soundfile.write(path, speech, 48000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def browser(looping_microphone: Path) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=chromium_flags(looping_microphone, loop=True)
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("replica-logs")


@pytest.fixture(scope="module")
def served(parity: ParitySet, tmp_path_factory: pytest.TempPathFactory, logs: Path) -> Iterator[ServeApp]:
    # Each replica's log file lands in `logs`, named after the replica.
    logging = {"logging_config": {"logs_dir": str(logs)}}
    options: dict[str, dict[str, Any]] = {
        "Ingress": {"num_replicas": 2, "max_ongoing_requests": 100, **logging},
        "Converter": logging,
    }
    with local_ray():
        yield start_app(parity, tmp_path_factory.mktemp("voices"), converters=2, ingress=LOOPBACK_ICE, options=options)


class Replicas:
    """The live replicas of one deployment, by replica id, and what their logs say."""

    def __init__(self, logs: Path, deployment: str) -> None:
        self.logs = logs
        self.deployment = deployment

    def actors(self) -> dict[str, str]:
        """Replica id -> actor name."""
        names = [
            a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"#{self.deployment}#" in a["name"]
        ]
        return {name.rsplit("#", 1)[1]: name for name in names}

    def log(self, replica: str) -> str:
        path = self.logs / f"replica_{APP}_{self.deployment}_{replica}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, count: int) -> None:
        """Until `count` replicas run (Serve replaces the ones an earlier test killed)."""
        deadline = time.monotonic() + REPLICA_WAIT_S
        while True:
            replicas = self.actors()
            if len(replicas) == count and all("Finished initializing replica" in self.log(r) for r in replicas):
                return
            assert time.monotonic() < deadline, f"{self.deployment} replicas: {sorted(replicas)}, wanted {count}"
            time.sleep(0.2)

    def kill(self, replica: str) -> None:
        ray.kill(ray.get_actor(self.actors()[replica], namespace="serve"), no_restart=True)


def holders(ingress: Replicas, session_id: str) -> tuple[str, str]:
    """The ingress replica that opened the session, and the converter it opened it on (as its log says)."""
    pattern = re.compile(f"{session_id}: (?:started|session open) on converter (\\w+)")
    deadline = time.monotonic() + 10
    while True:
        found = [(replica, match[1]) for replica in ingress.actors() if (match := pattern.search(ingress.log(replica)))]
        if found:
            assert len(found) == 1, found
            return found[0]
        assert time.monotonic() < deadline, f"no ingress replica logged session {session_id}"
        time.sleep(0.1)


def start_call(browser: Browser, transport: str) -> Page:
    page = open_page(browser, transport)
    page.click("#start")
    page.wait_for_function(f"window.vcState.blocks >= {BLOCKS_BEFORE}", timeout=CALL_TIMEOUT_MS)
    return page


def go_on_and_stop(page: Page, transport: str, back: dict) -> tuple[list[dict], dict]:
    """After the call came back: BLOCKS_AFTER more blocks, 2 s of live figures, then Stop; returns both."""
    page.wait_for_function(f"window.vcState.blocks >= {back['blocks'] + BLOCKS_AFTER}", timeout=CALL_TIMEOUT_MS)
    samples = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        samples.append(state(page))
        time.sleep(0.1)
    page.click("#stop")
    page.wait_for_function("['closed', 'failed'].includes(window.vcState.connection)", timeout=CALL_TIMEOUT_MS)
    entries = page.eval_on_selector_all("#log li", "items => items.map(item => item.textContent)")
    print("\n" + "\n".join(e for e in entries if re.search("reconnect|resum|session|try|lost|error", e)))
    return samples, state(page)


def check_went_on_and_ended(page: Page, samples: list[dict], final: dict) -> None:
    """Converted audio flowed after the fault while the microphone spoke, and the call ended cleanly."""
    events = page.text_content("#log") or ""
    assert "connection: reconnecting" in events, events[-2000:]
    speaking = [s for s in samples if s["inputRms"] > 0.01]
    audible = [s for s in speaking if s["outputRms"] > 0.001]
    assert speaking, "the fake microphone was silent"
    assert len(audible) >= 0.5 * len(speaking), (
        f"no converted audio after the fault: {len(audible)}/{len(speaking)}, late {samples[-1]['lateMs']} ms"
    )
    # Stop sent end, the server answered with its end event, and nothing went wrong.
    assert final["connection"] == "closed" and final["lastError"] is None, final
    assert re.search(r"end: \d+ blocks", events), events[-2000:]
    page.context.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_call_resumes_when_its_ingress_replica_dies(
    served: ServeApp, browser: Browser, logs: Path, transport: str
) -> None:
    began = time.monotonic()
    ingress = Replicas(logs, "Ingress")
    ingress.wait_for(2)  # the page needs a replica to go to
    page = start_call(browser, transport)
    before = state(page)
    session_id = before["sessionId"]
    assert session_id and page.text_content("#session-id") == session_id
    victim, _ = holders(ingress, session_id)
    survivor = next(replica for replica in ingress.actors() if replica != victim)

    ingress.kill(victim)
    killed_at = time.monotonic()
    page.wait_for_function("window.vcState.resumes >= 1", timeout=BACK_TIMEOUT_MS)
    back_after_s = time.monotonic() - killed_at
    back = state(page)
    samples, final = go_on_and_stop(page, transport, back)
    print(
        f"[{transport}] killed ingress {victim} at block {before['lastBlockIndex']}; back after {back_after_s:.2f} s, "
        f"resumed at block {back['resumedAtBlock']}; {final['blocks']} blocks; took {time.monotonic() - began:.1f} s"
    )

    # The same session came back on the other replica, and the page says so.
    assert back["sessionId"] == session_id and back["sessionNote"] == "resumed", back
    assert back["restarts"] == 0 and back["transport"] == transport, back
    assert page.text_content("#session-id") == session_id
    assert "resumed" in (page.text_content("#session-note") or "")
    assert re.search(f"{session_id}: (session )?resumed at block", ingress.log(survivor))
    # Block indexes go on from where the converter stood, past every block the page had seen.
    assert back["resumedAtBlock"] > before["lastBlockIndex"], (before, back)
    assert final["lastBlockIndex"] >= back["resumedAtBlock"] + BLOCKS_AFTER - 1, final
    assert final["resumes"] == 1, final
    check_went_on_and_ended(page, samples, final)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_call_whose_session_is_lost_goes_on_in_a_new_session(
    served: ServeApp, browser: Browser, logs: Path, transport: str
) -> None:
    began = time.monotonic()
    ingress, converters = Replicas(logs, "Ingress"), Replicas(logs, "Converter")
    ingress.wait_for(2)
    converters.wait_for(2)  # the new session needs a converter to go to
    page = start_call(browser, transport)
    old_session = state(page)["sessionId"]
    victim, converter = holders(ingress, old_session)

    # The converter first, and its ingress at once (before it could re-home the session): nothing holds it any more.
    converters.kill(converter)
    ingress.kill(victim)
    killed_at = time.monotonic()
    page.wait_for_function("window.vcState.restarts >= 1", timeout=BACK_TIMEOUT_MS)
    back_after_s = time.monotonic() - killed_at
    back = state(page)
    status = page.text_content("#status") or ""
    # Serve loads a replacement converter meanwhile, which takes the 2 cores for a few seconds: the new session may
    # fall behind and drop input until it is up. What follows the fault must be judged once it is.
    converters.wait_for(2)
    samples, final = go_on_and_stop(page, transport, back)
    print(
        f"[{transport}] killed ingress {victim} and converter {converter}; back in a new session after "
        f"{back_after_s:.2f} s; test took {time.monotonic() - began:.1f} s"
    )

    assert back["sessionId"] not in (None, old_session) and back["sessionNote"] == "new session", back
    assert back["resumes"] == 0 and back["transport"] == transport, back
    assert page.text_content("#session-id") == back["sessionId"]
    assert "new session" in (page.text_content("#session-note") or "")
    assert "new session" in status, f"the page must tell the user: {status}"
    assert "session_expired" in (page.text_content("#log") or "")
    assert final["lastBlockIndex"] >= BLOCKS_AFTER - 1, final  # the new session's blocks count from 0
    check_went_on_and_ended(page, samples, final)
