"""Resuming a session whose connection dropped (app/serving/live.py, converter.py; app/transport/sessions.py).

Real converter services in this process stand for replicas. A dropped connection leaves its session on the converter;
a new connection takes it over with a lease, continues its block numbers and state, and the old connection can
neither send blocks nor close it any more. Sessions nobody resumes are closed after the converter's TTL.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from app.auth.tokens import TokenSigner
from app.model.seedvc import SeedVC
from app.serving.config import ConverterConfig
from app.serving.converter import ConverterService
from app.serving.live import BlockReport, LateReport, LiveSession
from app.serving.local import LocalConverterClient
from app.serving.metrics import RecordedMetrics
from app.serving.wire import OpenReply, OpenRequest, ResumeState, SessionLost, SessionTakenOver
from app.streaming.settings import StreamSettings
from app.transport.protocol import ErrorCode, ProtocolError, ResumeRequest, SettingsOverrides, StartMessage
from app.transport.sessions import StreamServices
from app.voices.store import VoiceStore
from bench.parity import ParitySet
from tests.fakes import FakeClock
from tests.test_live_session import SETTINGS, input_48k, make_client, run_session

FRAME = 960  # 20 ms at 48 kHz


async def feed_and_collect(session: LiveSession, audio: np.ndarray) -> tuple[list[np.ndarray], list[BlockReport]]:
    """Real-time-like use without ending the input: every complete block is converted before more input comes."""
    frames: list[np.ndarray] = []
    reports: list[BlockReport] = []
    for start in range(0, len(audio), FRAME):
        session.feed(audio[start : start + FRAME])
        while session.pending_blocks:
            output = await session.next_output()
            assert output is not None
            frames += output[0]
            reports.append(output[1])
    return frames, reports


async def finish(session: LiveSession) -> tuple[list[np.ndarray], list[BlockReport]]:
    session.end_input()
    frames: list[np.ndarray] = []
    reports: list[BlockReport] = []
    while (output := await session.next_output()) is not None:
        frames += output[0]
        reports.append(output[1])
    return frames + session.final_frames(), reports


def test_a_resumed_session_continues_its_blocks_and_state(parity: ParitySet, model: SeedVC, voice_ids) -> None:
    store, (voice, _) = voice_ids
    audio = input_48k(parity)
    half = 48000 * 2
    steady, _ = asyncio.run(run_session(LiveSession(make_client(model, store), "s", voice, SETTINGS, 5), audio))
    client = make_client(model, store)

    async def dropped_then_resumed() -> tuple[
        np.ndarray, np.ndarray, list[BlockReport], ResumeState | None, ResumeState | None
    ]:
        first = LiveSession(client, "s", voice, SETTINGS, 5)
        await first.open()
        before_frames, before = await feed_and_collect(first, audio[:half])
        # The connection drops here: nobody closes `first`, and the input it had not cut into a block is lost.
        second = await LiveSession.resume(client, "s", first.replica)
        left, taken = first.resume_state, second.resume_state
        after_frames, after = await feed_and_collect(second, audio[half:])
        tail_frames, tail = await finish(second)
        await second.close()
        after_audio = np.concatenate(after_frames + tail_frames)
        return np.concatenate(before_frames), after_audio, before + after + tail, left, taken

    before, after, reports, left, taken = asyncio.run(dropped_then_resumed())
    assert [r.index for r in reports] == list(range(len(reports))), "block numbers continue after the resume"
    assert len(set(client.served["s"])) == 1, "the session stayed where it was"
    # The converter handed over exactly the state the first connection last saw: noise generator, crossfade tail,
    # and an input window equal to the first connection's own mirror of it.
    assert left is not None and taken is not None
    assert taken.generator_state == left.generator_state and taken.next_index == left.next_index
    np.testing.assert_array_equal(taken.tail, left.tail)
    np.testing.assert_array_equal(taken.window, left.window)
    # Up to the drop the sound is the undisturbed stream's; after it the stream goes on (the lost input aside).
    assert np.abs(before - steady[: len(before)]).max() <= parity.tolerance("output_stream", "e2e")
    assert np.sqrt(np.mean(after**2)) > 0.1 * np.sqrt(np.mean(steady**2))


def test_the_old_connection_can_neither_convert_nor_close_a_resumed_session(
    parity: ParitySet, model: SeedVC, voice_ids
) -> None:
    store, (voice, _) = voice_ids
    client = make_client(model, store, replicas=1)
    audio = input_48k(parity)[: 48000 * 2]

    async def scenario() -> None:
        old = LiveSession(client, "t", voice, SETTINGS, 1)
        await old.open()
        await feed_and_collect(old, audio[: 48000 // 2])
        new = await LiveSession.resume(client, "t", old.replica)
        old.feed(audio[: int(48000 * SETTINGS.block_time) + FRAME])
        with pytest.raises(SessionTakenOver):
            await old.next_output()
        await old.close()  # the old connection's cleanup: must leave the new one's session alone
        _, reports = await feed_and_collect(new, audio[48000 // 2 :])
        assert reports and all(not r.rehomed for r in reports)
        await new.close()
        with pytest.raises(SessionLost):
            await LiveSession.resume(client, "t", new.replica)

    asyncio.run(scenario())


def test_a_session_nobody_resumes_is_closed_after_the_ttl(model: SeedVC, voice_ids) -> None:
    store, (voice, _) = voice_ids
    config = ConverterConfig(
        precision="fp32", voice_store=store, silence_gate_dbfs=None, detached_session_ttl_s=30, replica_tag="a"
    )
    clock = FakeClock()
    service = ConverterService(config, model=model, clock=clock)
    client = LocalConverterClient({"a": service})

    async def scenario() -> None:
        await LiveSession(client, "abandoned", voice, SETTINGS, 1).open()
        clock.now += 29
        await LiveSession.resume(client, "abandoned", "a")  # within the TTL it is still there (and the TTL restarts)
        clock.now += 29
        await LiveSession(client, "newcomer", voice, SETTINGS, 1).open()
        assert "abandoned" in service.sessions, "an attach counts as a call"
        clock.now += 2
        await LiveSession(client, "other", voice, SETTINGS, 1).open()  # any call reaps what expired
        assert "abandoned" not in service.sessions and "newcomer" in service.sessions
        with pytest.raises(SessionLost):
            await LiveSession.resume(client, "abandoned", "a")

    try:
        asyncio.run(scenario())
    finally:
        service.close()


def services_for(client: LocalConverterClient, store: str) -> StreamServices:
    return StreamServices(
        client=client,
        tokens=TokenSigner(b"s" * 32),
        voices=VoiceStore(store),
        defaults=SETTINGS,
        metrics=RecordedMetrics(),
    )


def start(services: StreamServices, voice: str, **fields: Any) -> StartMessage:
    token = services.tokens.issue("k").token
    return StartMessage(type="start", version=1, token=token, voice_id=voice, **fields)


def test_resume_checks_the_token_the_caller_and_the_settings(model: SeedVC, voice_ids) -> None:
    store, (voice, other_voice) = voice_ids
    services = services_for(make_client(model, store), store)

    async def scenario() -> None:
        session, ready = await services.start_session(start(services, voice), "k")
        assert ready.resume_token and ready.resumed_at_block is None
        resume = ResumeRequest(session_id=session.session_id, resume_token=ready.resume_token)
        refusals = {
            "another caller": (start(services, voice, resume=resume), "intruder"),
            "another session": (
                start(services, voice, resume=ResumeRequest(session_id="x" * 32, resume_token=ready.resume_token)),
                "k",
            ),
            "a forged token": (
                start(services, voice, resume=ResumeRequest(session_id=session.session_id, resume_token="a.b")),
                "k",
            ),
            "a session token as resume token": (
                start(
                    services,
                    voice,
                    resume=ResumeRequest(session_id=session.session_id, resume_token=services.tokens.issue("k").token),
                ),
                "k",
            ),
        }
        for case, (message, owner) in refusals.items():
            with pytest.raises(ProtocolError) as refused:
                await services.start_session(message, owner)
            assert refused.value.code == ErrorCode.session_expired, case
        different = start(services, voice, resume=resume, settings=SettingsOverrides(diffusion_steps=7))
        with pytest.raises(ProtocolError) as refused:
            await services.start_session(different, "k")
        assert refused.value.code == ErrorCode.bad_settings
        # That refusal freed the session: the client was told it cannot continue it.
        with pytest.raises(ProtocolError) as refused:
            await services.start_session(start(services, voice, resume=resume), "k")
        assert refused.value.code == ErrorCode.session_expired

        session, ready = await services.start_session(start(services, voice), "k")
        resume = ResumeRequest(session_id=session.session_id, resume_token=ready.resume_token)
        resumed, again = await services.start_session(start(services, other_voice, resume=resume), "k")
        assert again.session_id == session.session_id and again.resumed_at_block == 0
        assert again.resume_token and again.settings == SETTINGS
        resumed.feed(np.zeros(int(48000 * SETTINGS.block_time) + FRAME, dtype=np.float32))
        output = await resumed.next_output()
        assert output is not None and output[1].voice_id == other_voice, "a resume may switch the voice"
        await resumed.close()

    asyncio.run(scenario())


def test_settings_of_the_resumed_session_are_its_own(model: SeedVC, voice_ids) -> None:
    """Sending the same overrides again is fine: they lead to the same effective settings."""
    store, (voice, _) = voice_ids
    services = services_for(make_client(model, store), store)
    overrides = SettingsOverrides(diffusion_steps=4)

    async def scenario() -> StreamSettings:
        session, _ = await services.start_session(start(services, voice, settings=overrides), "k")
        session.started_at -= 100  # it has been going for a while
        resume = ResumeRequest(session_id=session.session_id, resume_token=services.resume_token(session, "k"))
        resumed, again = await services.start_session(start(services, voice, settings=overrides, resume=resume), "k")
        assert resumed.started_at == session.started_at, "its maximum length counts from its first connection"
        await resumed.close()
        return again.settings

    assert asyncio.run(scenario()).diffusion_steps == 4
    assert isinstance(services.metrics, RecordedMetrics)
    assert services.metrics.values("seedvc_sessions_resumed") == [1.0]


def test_a_resumed_sessions_totals_count_its_earlier_connections(parity: ParitySet, model: SeedVC, voice_ids) -> None:
    """The end event's blocks and dropped time, and the late events' totals, are the session's: a resume carries the
    blocks answered and dropped before it (the converter's next block number and blocks converted tell them)."""
    store, (voice, _) = voice_ids
    client = make_client(model, store, replicas=1)
    audio = input_48k(parity)
    block_48k = int(48000 * SETTINGS.block_time)

    async def answered(session: LiveSession) -> None:
        while session.pending_blocks:
            assert await session.next_output() is not None

    async def scenario() -> tuple[LiveSession, tuple[int, int], LateReport]:
        first = LiveSession(client, "totals", voice, SETTINGS, 2, max_backlog_blocks=1)
        await first.open()
        first.feed(audio[: 4 * block_48k])  # four blocks at once: the oldest are dropped
        await answered(first)
        first.feed(audio[4 * block_48k : 5 * block_48k])
        await answered(first)
        second = await LiveSession.resume(client, "totals", first.replica, max_backlog_blocks=1)
        carried = second.total_dropped_blocks, second.blocks_answered
        late = second.feed(audio[5 * block_48k : 8 * block_48k])
        assert late is not None, "the resumed connection drops input too"
        await answered(second)
        return first, carried, late

    first, (dropped, answered_before), late = asyncio.run(scenario())
    assert first.total_dropped_blocks >= 2
    assert (dropped, answered_before) == (first.total_dropped_blocks, first.blocks_answered)
    assert late.total_dropped_ms == pytest.approx(late.dropped_ms + 1000 * SETTINGS.block_time * dropped)


async def answered(session: LiveSession) -> BlockReport:
    """The report of the session's next output block (there must be one)."""
    output = await session.next_output()
    assert output is not None
    return output[1]


def test_a_rehome_after_dropped_blocks_numbers_on_after_them(
    parity: ParitySet, model: SeedVC, voice_ids, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks dropped as silence never reach the converter. A re-home right after them must still tell the new
    converter where the numbering stands: were the connection to drop before its next block, a client resuming
    there would be told to send blocks again that it already has (seen in a redeploy under load)."""
    store, (voice, _) = voice_ids
    client = make_client(model, store)
    session = LiveSession(client, "s", voice, SETTINGS, 5, max_backlog_blocks=2)
    opened: list[OpenRequest] = []
    open_on = client.open

    async def recorded_open(request: OpenRequest) -> OpenReply:
        opened.append(request)
        return await open_on(request)

    monkeypatch.setattr(client, "open", recorded_open)
    audio = input_48k(parity)

    async def scenario() -> list[BlockReport]:
        await session.open()
        start = 0
        while not session.pending_blocks:  # one block, converted: the session has a state to move
            session.feed(audio[start : start + FRAME])
            start += FRAME
        reports = [await answered(session)]
        while session.total_dropped_blocks < 3:  # input piles up faster than it is taken: the oldest drops
            session.feed(audio[start : start + FRAME])
            start += FRAME
        client.lose(session.replica)  # the dropped blocks are answered without it; the next one finds it gone
        while session.pending_blocks:
            reports.append(await answered(session))
        return reports

    reports = asyncio.run(scenario())
    rehomed = next(report for report in reports if report.rehomed)
    assert [report.index for report in reports] == list(range(len(reports)))
    assert sum(report.steps == 0 and report.batch_size == 0 for report in reports[: rehomed.index]) >= 3
    [reopen] = opened[1:]
    assert reopen.resume is not None and reopen.resume.next_index == rehomed.index
    assert reopen.resume.blocks_done == 1, "the dropped blocks were not converted"
