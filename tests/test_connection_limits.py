"""Per-connection limits (app/transport/limits.py): the token bucket, the message allowances, the session length."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.serving.config import IngressConfig
from app.transport.limits import MAX_RESEND_S, ConnectionLimits, MessageLimits, TokenBucket
from app.transport.protocol import CLOSE_POLICY_VIOLATION, ErrorCode, ProtocolError, close_code
from tests.fakes import FakeClock

FRAME_S = 0.02


def limits(**changes: float | None) -> MessageLimits:  # None: a limit that is off
    base: dict[str, Any] = {
        "audio_speed": 3.0,
        "audio_burst_s": 1.0,
        "text_per_s": 2.0,
        "text_burst": 4,
        "max_session_s": 60.0,
        "start_timeout_s": 5.0,
        "idle_input_s": 30.0,
        "max_output_backlog_s": 3.0,
    }
    return MessageLimits(**{**base, **changes})


def test_bucket_allows_the_burst_then_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert all(bucket.take() for _ in range(5))
    assert not bucket.take()
    clock.now += 0.25  # 2.5 units refilled
    assert bucket.take(2) and not bucket.take(1)
    clock.now += 100  # refilling stops at the burst size
    assert bucket.take(5) and not bucket.take(0.5)


def test_a_refused_take_takes_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1, burst=3, clock=clock)
    assert not bucket.take(4)
    assert bucket.take(3)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (1, 0), (-1, 1)])
def test_bucket_needs_positive_rate_and_burst(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(rate, burst)


def test_real_time_audio_never_trips_the_limit() -> None:
    clock = FakeClock()
    connection = ConnectionLimits(limits(), clock)
    for _ in range(30_000):  # ten minutes of 20 ms packets, with jitter that averages out
        connection.audio(FRAME_S)
        clock.now += FRAME_S


def test_audio_three_times_real_time_is_fine_and_a_flood_is_too_fast() -> None:
    clock = FakeClock()
    connection = ConnectionLimits(limits(audio_speed=3.0, audio_burst_s=1.0), clock)
    for _ in range(1000):  # 3x real time, sustained
        connection.audio(3 * FRAME_S)
        clock.now += FRAME_S
    for _ in range(50):  # then the whole burst at once
        connection.audio(FRAME_S)
    with pytest.raises(ProtocolError) as refused:
        connection.audio(FRAME_S)
    assert refused.value.code == ErrorCode.too_fast
    assert "3 times real time" in refused.value.message


def test_a_resumed_connection_may_send_its_resend_at_once_but_only_once() -> None:
    clock = FakeClock()
    fresh = ConnectionLimits(limits(audio_speed=3.0, audio_burst_s=1.0), clock)
    resumed = ConnectionLimits(limits(audio_speed=3.0, audio_burst_s=1.0), clock)
    resumed.allow_resend(6.0)  # the converter stood 6 s behind the client when its connection came back
    backlog = [FRAME_S] * round(7.0 / FRAME_S)  # the resend and the burst, in one go
    with pytest.raises(ProtocolError):
        for seconds in backlog:
            fresh.audio(seconds)
    for seconds in backlog:
        resumed.audio(seconds)
    with pytest.raises(ProtocolError) as refused:  # the credit is spent: a flood is a flood again
        resumed.audio(FRAME_S)
    assert refused.value.code == ErrorCode.too_fast
    clock.now += 10.0  # refilling goes back to the burst, not to the credit
    with pytest.raises(ProtocolError):
        for _ in range(round(1.1 / FRAME_S)):
            resumed.audio(FRAME_S)


def test_a_resend_allowance_is_capped() -> None:
    clock = FakeClock()
    connection = ConnectionLimits(limits(audio_speed=3.0, audio_burst_s=1.0), clock)
    connection.allow_resend(3600.0)  # an hour-old session whose converter stands at block 0 is not resending
    connection.audio(MAX_RESEND_S + 1.0)  # the cap and the burst
    with pytest.raises(ProtocolError):
        connection.audio(FRAME_S)


def test_a_negative_resend_allows_nothing() -> None:
    clock = FakeClock()
    connection = ConnectionLimits(limits(audio_speed=3.0, audio_burst_s=1.0), clock)
    connection.allow_resend(-5.0)  # clocks of two machines: the converter ahead of the session's age
    connection.audio(1.0)
    with pytest.raises(ProtocolError):
        connection.audio(FRAME_S)


def test_text_messages_are_limited() -> None:
    clock = FakeClock()
    connection = ConnectionLimits(limits(text_per_s=2.0, text_burst=4), clock)
    for _ in range(4):
        connection.text()
    with pytest.raises(ProtocolError) as refused:
        connection.text()
    assert refused.value.code == ErrorCode.too_fast
    clock.now += 0.5
    connection.text()  # one more has accrued


def test_new_codes_close_with_policy_violation() -> None:
    assert close_code(ErrorCode.too_fast) == close_code(ErrorCode.session_too_long) == CLOSE_POLICY_VIOLATION


def test_a_session_that_sends_nothing_still_ends_at_its_maximum_length() -> None:
    async def silent_reader() -> None:
        await asyncio.Event().wait()  # a client that holds the socket and sends nothing

    async def run() -> None:
        connection = ConnectionLimits(limits(max_session_s=0.05))
        await connection.bounded(silent_reader())

    with pytest.raises(ProtocolError) as ended:
        asyncio.run(run())
    assert ended.value.code == ErrorCode.session_too_long


def test_bounded_work_keeps_its_result_and_its_own_timeouts() -> None:
    async def own_timeout() -> None:
        async with asyncio.timeout(0.01):
            await asyncio.sleep(1)

    async def run() -> None:
        connection = ConnectionLimits(limits(max_session_s=60))
        assert await connection.bounded(asyncio.sleep(0, result="done")) == "done"
        with pytest.raises(TimeoutError):  # not session_too_long: the session has time left
            await connection.bounded(own_timeout())

    asyncio.run(run())


def test_the_session_clock_runs_from_the_connection_start() -> None:
    clock = FakeClock()
    connection = ConnectionLimits(limits(max_session_s=10), clock)
    clock.now += 11

    async def reader() -> None:
        await asyncio.sleep(1)

    with pytest.raises(ProtocolError) as ended:
        asyncio.run(connection.bounded(reader()))
    assert ended.value.code == ErrorCode.session_too_long


def test_limits_come_from_the_config() -> None:
    config = IngressConfig(
        max_audio_speed=2.5,
        audio_burst_s=3,
        max_text_per_s=1,
        text_burst=7,
        max_session_s=99,
        start_timeout_s=2,
        idle_input_timeout_s=None,
        max_output_backlog_s=1.5,
    )
    assert MessageLimits.from_config(config) == MessageLimits(2.5, 3, 1, 7, 99, 2, None, 1.5)
    assert MessageLimits.default() == MessageLimits.from_config(IngressConfig())
    assert MessageLimits.default().max_session_s == 4 * 3600


def test_a_resumed_sessions_earlier_time_counts_towards_its_maximum_length() -> None:
    async def reader() -> str:
        await asyncio.sleep(0.01)
        return "read"

    fresh, resumed = (
        ConnectionLimits(limits(max_session_s=10), FakeClock()),
        ConnectionLimits(limits(max_session_s=10), FakeClock()),
    )
    resumed.count_earlier(11)  # its first connection ran 11 s before it dropped
    assert asyncio.run(fresh.bounded(reader())) == "read"
    with pytest.raises(ProtocolError) as ended:
        asyncio.run(resumed.bounded(reader()))
    assert ended.value.code == ErrorCode.session_too_long


def test_the_start_message_must_come_in_time() -> None:
    connection = ConnectionLimits(limits(start_timeout_s=0.05))

    async def never() -> str:
        await asyncio.sleep(10)
        return "start"

    async def soon() -> str:
        return "start"

    with pytest.raises(ProtocolError) as refused:
        asyncio.run(connection.first(never()))
    assert refused.value.code == ErrorCode.not_started and "0.05 s" in refused.value.message
    assert asyncio.run(connection.first(soon())) == "start"


def test_a_session_without_media_ends_but_media_or_holding_input_back_keeps_it() -> None:
    async def scenario() -> None:
        quiet = ConnectionLimits(limits(idle_input_s=0.1))
        start = asyncio.get_running_loop().time()
        with pytest.raises(ProtocolError) as idle:
            await quiet.idle_watch()
        assert idle.value.code == ErrorCode.idle_timeout and close_code(idle.value.code) == CLOSE_POLICY_VIOLATION
        assert asyncio.get_running_loop().time() - start >= 0.1

        talking = ConnectionLimits(limits(idle_input_s=0.1))
        watch = asyncio.create_task(talking.idle_watch())
        for _ in range(10):  # packets every 50 ms (silence or DTX would count just the same)
            await asyncio.sleep(0.05)
            talking.input_arrived()
        with talking.holding_input():  # a file waiting for room: the server, not the client, holds input back
            await asyncio.sleep(0.3)
        await asyncio.sleep(0.05)
        assert not watch.done()
        with pytest.raises(ProtocolError):
            await watch  # and then nothing more arrives

        never = ConnectionLimits(limits(idle_input_s=None))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(never.idle_watch(), 0.2)

    asyncio.run(scenario())
