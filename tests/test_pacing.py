"""Pacer on a fake clock (no real sleeping): due times are absolute and never drift."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.audio.pacing import Pacer


class FakeTime:
    """A clock that only moves when slept on (each sleep oversleeps by `overshoot`) or pushed on by a test."""

    def __init__(self, now: float = 100.0, overshoot: float = 0.0) -> None:
        self.now = now
        self.overshoot = overshoot
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds + self.overshoot


def test_due_times_are_absolute_even_when_every_sleep_oversleeps() -> None:
    fake = FakeTime(overshoot=0.004)
    pacer = Pacer(0.02, clock=fake.clock, sleep=fake.sleep)

    async def send(count: int) -> list[float]:
        sent = []
        for index in range(count):
            await pacer.wait(index)
            sent.append(fake.now)
        return sent

    sent = asyncio.run(send(500))
    # Item i leaves at start + i * period + one oversleep, however many items came before it.
    assert sent[0] == 100.0
    assert sent[-1] == pytest.approx(100.0 + 499 * 0.02 + 0.004)
    # Item 0 is due at once; every later wait shrinks to absorb the previous oversleep.
    assert fake.sleeps == pytest.approx([0.02] + [0.016] * 498)
    assert pacer.lateness(499) == pytest.approx(0.004)


def test_a_late_item_is_not_waited_for_and_does_not_shift_later_items() -> None:
    fake = FakeTime()
    pacer = Pacer(0.02, clock=fake.clock, sleep=fake.sleep)

    async def run() -> None:
        await pacer.wait(0)
        await pacer.wait(1)
        fake.now += 0.07  # processing stalls: item 2 (due at 100.04) starts at 100.09
        assert pacer.lateness(2) == pytest.approx(0.05)
        await pacer.wait(2)
        await pacer.wait(3)  # due at 100.06: also late, no sleep
        assert fake.sleeps == [pytest.approx(0.02)]
        await pacer.wait(5)
        assert fake.now == pytest.approx(100.10)  # start + 5 periods, not 100.09 + 3 periods

    asyncio.run(run())
    assert pacer.lateness(5) == 0.0


def test_the_clock_starts_at_the_first_wait_or_at_start() -> None:
    fake = FakeTime()
    pacer = Pacer(0.5, clock=fake.clock, sleep=fake.sleep)
    with pytest.raises(RuntimeError, match="has not started"):
        pacer.lateness(0)
    fake.now = 200.0
    pacer.start()
    fake.now = 201.0
    pacer.start()  # no effect once started
    assert pacer.due(0) == 200.0
    assert pacer.due(3) == 201.5
    asyncio.run(pacer.wait(1))
    assert fake.sleeps == [] and pacer.lateness(1) == 0.5

    lazy = Pacer(0.5, clock=fake.clock, sleep=fake.sleep)
    asyncio.run(lazy.wait(0))
    assert lazy.due(0) == 201.0 and fake.sleeps == []


def test_refuses_bad_periods_and_indices() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        Pacer(0.0)
    pacer = Pacer(0.02)
    pacer.start()
    with pytest.raises(ValueError, match="non-negative"):
        pacer.due(-1)


def test_real_clock_and_sleep_by_default() -> None:
    pacer = Pacer(0.001)

    async def run() -> None:
        await pacer.wait(0)
        await pacer.wait(5)

    asyncio.run(run())  # five periods of 1 ms: short enough to run for real
    # asyncio may wake up to one clock tick (1 ns here) early; never by more.
    assert time.monotonic() >= pacer.due(5) - 1e-6
