"""Deadline control driven by lateness (app/serving/converter.py `_budget`, app/engine/deadline.py), with real
converter services and the tiny model in this process; the transport's clock is a fake one, so lateness is exact.

A block's budget is what its deadline leaves: one block period (times deadline_fraction) after its input completed,
less the time it already waited, shared with the blocks of its session queued behind it. Late blocks get fewer
diffusion steps (never below deadline_min_steps), on-time blocks the configured ones; the steps a session last used
travel with it to another replica; and the first step of settings never run on a replica is projected from what the
replica measured at start, not run blind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from app.model.seedvc import SeedVC
from app.serving.config import ConverterConfig
from app.serving.converter import ConverterService
from app.serving.live import BlockReport, LiveSession
from app.serving.local import LocalConverterClient
from app.streaming.settings import StreamSettings
from bench.parity import ParitySet
from tests.fakes import FakeClock
from tests.settings_from_bundle import one_torch_thread
from tests.test_live_session import input_48k

# Blocks long against the tiny model's step (tens of ms, a first step maybe several times that on a busy machine), so
# that on-time blocks fit their budget whatever the noise, and late ones (three periods behind) cannot.
SETTINGS = StreamSettings(diffusion_steps=8, block_time=2.0, ce_context=1.0, cfg_rate=0.0)
MIN_STEPS = 4  # as shipped (serve_config.yaml)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture
def client(model: SeedVC, voice_ids) -> Iterator[LocalConverterClient]:
    store, _ = voice_ids
    config = ConverterConfig(
        precision="fp32", voice_store=store, silence_gate_dbfs=None, deadline_min_steps=MIN_STEPS, cpu_settings=None
    )
    local = LocalConverterClient(
        {name: ConverterService(config.model_copy(update={"replica_tag": name}), model=model) for name in "ab"}
    )
    yield local
    for service in local.services.values():
        service.close()


class Live:
    """A live session whose input arrives when the test says, by the transport's fake clock."""

    def __init__(self, client: LocalConverterClient, voice: str, audio: np.ndarray) -> None:
        self.clock = FakeClock()
        self.session = LiveSession(client, "live", voice, SETTINGS, seed=3, clock=self.clock)
        self.audio = audio
        self.fed = 0

    def feed_blocks(self, count: int) -> None:
        """Input arrives now, until `count` more blocks are complete."""
        target = self.session.next_index + count
        while self.session.next_index < target:
            assert self.session.feed(self.audio[self.fed : self.fed + 960]) is None, "nothing is dropped here"
            self.fed += 960

    async def convert_pending(self) -> list[BlockReport]:
        reports = []
        while self.session.pending_blocks:
            output = await self.session.next_output()
            assert output is not None
            reports.append(output[1])
        return reports

    async def on_time(self, blocks: int) -> list[int]:
        """Blocks that are converted as soon as they complete, one block period apart: steps of each."""
        steps = []
        for _ in range(blocks):
            self.clock.now += SETTINGS.block_time
            self.feed_blocks(1)
            steps += [report.steps for report in await self.convert_pending()]
        return steps

    async def late(self, blocks: int, behind_s: float) -> list[int]:
        """`blocks` blocks that complete together and wait `behind_s` before the transport sends the first."""
        self.feed_blocks(blocks)
        self.clock.now += behind_s
        return [report.steps for report in await self.convert_pending()]


def test_steps_fall_when_blocks_are_late_and_come_back_when_they_are_not(
    client: LocalConverterClient, voice_ids, parity: ParitySet
) -> None:
    _, (voice, _) = voice_ids
    live = Live(client, voice, np.tile(input_48k(parity), 6))

    async def scenario() -> tuple[list[int], list[int], list[int]]:
        await live.session.open()
        before = await live.on_time(3)
        behind = await live.late(3, behind_s=3 * SETTINGS.block_time)  # an overload kept them three periods
        after = await live.on_time(3)
        return before, behind, after

    before, behind, after = asyncio.run(scenario())
    assert before == [SETTINGS.diffusion_steps] * 3
    assert behind == [MIN_STEPS] * 3, "late blocks spend fewer steps, down to the floor"
    assert after == [SETTINGS.diffusion_steps] * 3, "and on-time blocks get them all again"


def test_a_rehomed_session_starts_from_the_steps_it_last_had(
    client: LocalConverterClient, voice_ids, parity: ParitySet
) -> None:
    _, (voice, _) = voice_ids
    live = Live(client, voice, np.tile(input_48k(parity), 6))

    async def scenario() -> tuple[list[int], list[int]]:
        await live.session.open()
        await live.on_time(1)
        behind = await live.late(2, behind_s=3 * SETTINGS.block_time)
        client.lose(live.session.replica)
        return behind, await live.on_time(2)

    behind, after_rehome = asyncio.run(scenario())
    assert behind == [MIN_STEPS] * 2 and live.session.rehomes == 1
    # Its first block on the new replica, on time, spends what it had; from then on the control decides.
    assert after_rehome == [MIN_STEPS, SETTINGS.diffusion_steps]


def test_the_first_step_of_settings_new_to_a_replica_is_bounded(
    client: LocalConverterClient, voice_ids, parity: ParitySet
) -> None:
    """The replica measured only its default settings at start (speed check): a session with other settings that is
    late on its very first block still gets fewer steps, from a cost projected off that measurement."""
    _, (voice, _) = voice_ids
    live = Live(client, voice, np.tile(input_48k(parity), 2))

    async def scenario() -> list[int]:
        await live.session.open()
        return await live.late(1, behind_s=2 * SETTINGS.block_time)

    assert asyncio.run(scenario()) == [MIN_STEPS]
