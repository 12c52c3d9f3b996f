"""Per-key usage on a temporary directory: concurrent sessions limited across replicas (leases), stream time booked
per UTC day and surviving restarts, held sessions keeping their slot for a resume, crashed replicas' leases expiring."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pytest

from app.auth.keystore import KeyStore, Quotas
from app.auth.tokens import ApiKeys, TokenError
from app.auth.usage import QuotaExceeded, UsageMeter, next_utc_midnight, utc_day
from tests.fakes import FakeClock

T = TypeVar("T")
DAY = 86_400
NOON = 19_000 * DAY + 12 * 3600  # a UTC noon


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOON)


@pytest.fixture
def keys(tmp_path: Path, clock: FakeClock) -> KeyStore:
    keys = KeyStore(str(tmp_path), static=ApiKeys({"ops": "static-key-0123456789abcdef"}), cache_ttl_s=0, clock=clock)
    keys.create("one", Quotas(max_sessions=1))
    keys.create("free")
    keys.create("minute", Quotas(max_stream_minutes_per_day=1))
    return keys


def meter(keys: KeyStore, clock: FakeClock) -> UsageMeter:
    """One ingress replica's meter."""
    return UsageMeter(keys, lease_ttl_s=60, flush_interval_s=15, retry_after_s=5, cache_ttl_s=0, clock=clock)


def run(awaitable: Awaitable[T]) -> T:
    async def main() -> T:
        return await awaitable

    return asyncio.run(main())


def test_day_helpers() -> None:
    assert utc_day(NOON) == "2022-01-08"
    assert next_utc_midnight(NOON) == 19_001 * DAY
    assert next_utc_midnight(19_001 * DAY) == 19_002 * DAY


def test_a_second_session_over_the_limit_is_refused_until_the_first_ends(keys: KeyStore, clock: FakeClock) -> None:
    async def scenario() -> None:
        usage = meter(keys, clock)
        first = await usage.acquire("one", "session-1")
        with pytest.raises(QuotaExceeded, match="1 live session") as refused:
            await usage.acquire("one", "session-2")
        assert refused.value.retry_after_s == 5
        assert (await usage.usage("one")).live_sessions == 1
        usage.release(first)
        await usage.flush()
        assert (await usage.usage("one")).live_sessions == 0
        await usage.acquire("one", "session-2")
        await usage.close()

    run(scenario())


def test_the_limit_holds_across_replicas(keys: KeyStore, clock: FakeClock) -> None:
    async def scenario() -> None:
        here, there = meter(keys, clock), meter(keys, clock)
        lease = await here.acquire("one", "session-1")
        clock.now += 1
        with pytest.raises(QuotaExceeded):
            await there.acquire("one", "session-2")
        here.release(lease)
        await here.flush()
        await there.acquire("one", "session-2")
        for each in (here, there):
            await each.close()

    run(scenario())


def test_keys_without_a_limit_and_other_keys_are_not_affected(keys: KeyStore, clock: FakeClock) -> None:
    async def scenario() -> None:
        usage = meter(keys, clock)
        await usage.acquire("one", "session-1")
        for index in range(5):
            await usage.acquire("free", f"free-{index}")
        await usage.acquire("ops", "static-1")  # static keys: the defaults, here no limit
        assert (await usage.usage("free")).live_sessions == 5
        await usage.close()

    run(scenario())


def test_a_crashed_replicas_leases_expire(keys: KeyStore, clock: FakeClock) -> None:
    async def scenario() -> None:
        crashed, survivor = meter(keys, clock), meter(keys, clock)
        await crashed.acquire("one", "session-1")  # never released, never renewed again
        clock.now += 59
        with pytest.raises(QuotaExceeded):
            await survivor.acquire("one", "session-2")
        clock.now += 1
        await survivor.acquire("one", "session-2")
        await survivor.close()

    run(scenario())


def test_live_leases_are_renewed_by_flushes(keys: KeyStore, clock: FakeClock) -> None:
    async def scenario() -> None:
        here, there = meter(keys, clock), meter(keys, clock)
        await here.acquire("one", "session-1")
        for _ in range(10):  # 300 s, far past the 60 s lease, flushing as the flusher would
            clock.now += 30
            await here.flush()
            with pytest.raises(QuotaExceeded):
                await there.acquire("one", "session-2")
        await here.close()

    run(scenario())


def test_a_held_session_keeps_its_slot_and_a_resume_elsewhere_adopts_it(keys: KeyStore, clock: FakeClock) -> None:
    async def scenario() -> None:
        here, there = meter(keys, clock), meter(keys, clock)
        dropped = await here.acquire("one", "session-1")
        here.release(dropped, held=True)  # the socket dropped; the converter holds the session for a resume
        await here.flush()
        clock.now += 10
        with pytest.raises(QuotaExceeded):
            await there.acquire("one", "session-2")  # the held session still counts
        resumed = await there.adopt("one", "session-1")  # at the limit, yet the resume keeps its slot
        assert (await there.usage("one")).live_sessions == 1  # two leases, one session
        clock.now += 120  # the dropped connection's lease expired; the resumed one is renewed
        await there.flush()
        with pytest.raises(QuotaExceeded):
            await here.acquire("one", "session-2")
        there.release(resumed)
        await there.flush()
        await here.acquire("one", "session-2")
        for each in (here, there):
            await each.close()

    run(scenario())


def test_a_resume_after_the_lease_expired_is_admitted_anew(keys: KeyStore, clock: FakeClock) -> None:
    async def scenario() -> None:
        usage = meter(keys, clock)
        dropped = await usage.acquire("one", "session-1")
        usage.release(dropped, held=True)
        clock.now += 61
        other = await usage.acquire("one", "session-2")  # the held session's lease expired: its slot is free
        clock.now += 1
        with pytest.raises(QuotaExceeded):
            await usage.adopt("one", "session-1")
        usage.release(other)
        await usage.adopt("one", "session-1")
        await usage.close()

    run(scenario())


def test_a_taken_over_connections_release_does_not_end_the_new_lease(keys: KeyStore, clock: FakeClock) -> None:
    async def scenario() -> None:
        usage = meter(keys, clock)
        old = await usage.acquire("one", "session-1")
        new = await usage.adopt("one", "session-1")  # resumed while the old socket was still open
        usage.release(old)  # the old connection ends
        await usage.flush()
        assert (await usage.usage("one")).live_sessions == 1
        with pytest.raises(QuotaExceeded):
            await usage.acquire("one", "session-2")
        usage.release(new)
        await usage.close()

    run(scenario())


class Heard:
    """The audio seconds a session has received, as a transport's LiveSession reports them."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def test_stream_time_is_booked_and_survives_a_restart(keys: KeyStore, clock: FakeClock) -> None:
    async def scenario() -> None:
        first, heard = meter(keys, clock), Heard()
        lease = await first.acquire("free", "session-1", audio=heard)
        clock.now += 30
        heard.seconds = 30
        assert (await first.usage("free")).stream_seconds == pytest.approx(30)  # a live session's audio counts
        first.release(lease)
        await first.close()
        restarted, heard = meter(keys, clock), Heard()  # a new process: a new replica id, the old file still counts
        lease = await restarted.acquire("free", "session-2", audio=heard)
        heard.seconds = 10
        restarted.release(lease)
        await restarted.close()
        usage = await meter(keys, clock).usage("free")
        assert usage.stream_seconds == pytest.approx(40) and usage.day == utc_day(clock.now)
        assert usage.live_sessions == 0

    run(scenario())


def test_usage_is_the_audio_received_not_the_time_held(keys: KeyStore, clock: FakeClock) -> None:
    """A file sent faster than real time books its length; a session that sends nothing books nothing."""

    async def scenario() -> None:
        usage, fast, silent = meter(keys, clock), Heard(), Heard()
        file = await usage.acquire("free", "session-1", audio=fast)
        idle = await usage.acquire("free", "session-2", audio=silent)
        clock.now += 10
        fast.seconds = 30  # 30 s of audio in 10 s
        usage.release(file)
        clock.now += 600
        usage.release(idle)
        await usage.close()
        assert (await usage.usage("free")).stream_seconds == pytest.approx(30)

    run(scenario())


def test_periodic_flushes_publish_a_live_sessions_time_to_other_replicas(keys: KeyStore, clock: FakeClock) -> None:
    async def scenario() -> None:
        here, there, heard = meter(keys, clock), meter(keys, clock), Heard()
        await here.acquire("free", "session-1", audio=heard)
        clock.now += 20
        heard.seconds = 20
        await here.flush()
        assert (await there.usage("free")).stream_seconds == pytest.approx(20)
        await here.close()

    run(scenario())


def test_the_daily_quota_refuses_until_the_next_utc_day(keys: KeyStore, clock: FakeClock) -> None:
    async def scenario() -> None:
        here, there, heard = meter(keys, clock), meter(keys, clock), Heard()
        lease = await here.acquire("minute", "session-1", audio=heard)
        clock.now += 61
        heard.seconds = 61  # over the minute
        here.release(lease)
        await here.flush()
        with pytest.raises(QuotaExceeded, match="1 stream minutes") as refused:
            await there.acquire("minute", "session-2")
        assert refused.value.retry_after_s == pytest.approx(next_utc_midnight(clock.now) - clock.now)
        clock.now = next_utc_midnight(clock.now)
        await there.acquire("minute", "session-3")
        for each in (here, there):
            await each.close()

    run(scenario())


def test_running_sessions_end_when_their_key_is_revoked_rotated_or_out_of_time(
    keys: KeyStore, clock: FakeClock
) -> None:
    async def scenario() -> None:
        usage = meter(keys, clock)
        keys.create("revoked")
        keys.create("rotated")
        minute, free, revoked, rotated = Heard(), Heard(), Heard(), Heard()
        leases = {
            "minute": await usage.acquire("minute", "session-1", audio=minute),
            "free": await usage.acquire("free", "session-2", audio=free),
            "revoked": await usage.acquire("revoked", "session-3", audio=revoked),
            "rotated": await usage.acquire("rotated", "session-4", generation=0, audio=rotated),
        }
        await usage.recheck()
        assert all(lease.refusal is None for lease in leases.values())
        minute.seconds = free.seconds = 61
        keys.revoke("revoked")
        keys.rotate("rotated")  # no grace: the session's token was issued for the old secret
        await usage.recheck()
        assert isinstance(leases["minute"].refusal, QuotaExceeded)
        assert isinstance(leases["revoked"].refusal, TokenError) and "revoked" in str(leases["revoked"].refusal)
        assert isinstance(leases["rotated"].refusal, TokenError) and "rotated" in str(leases["rotated"].refusal)
        assert leases["free"].refusal is None  # no daily limit
        assert await asyncio.wait_for(leases["minute"].refused(), 1) is leases["minute"].refusal
        await usage.close()

    run(scenario())


def test_revoked_and_unknown_keys_get_no_session(keys: KeyStore, clock: FakeClock) -> None:
    async def scenario() -> None:
        usage = meter(keys, clock)
        keys.revoke("free")
        for key_id in ("free", "nobody", "../one"):
            with pytest.raises(TokenError):
                await usage.acquire(key_id, "session-1")
            with pytest.raises(TokenError):
                await usage.adopt(key_id, "session-1")
        with pytest.raises(ValueError, match="session id"):
            await usage.acquire("one", "../../x")
        await usage.close()

    run(scenario())


def test_a_released_slot_is_free_at_once_on_the_same_replica(keys: KeyStore, clock: FakeClock) -> None:
    async def scenario() -> None:
        usage = meter(keys, clock)
        for index in range(20):  # no flush in between: the lease files may still be on their way out
            usage.release(await usage.acquire("one", f"session-{index}"))
        await usage.close()

    run(scenario())
