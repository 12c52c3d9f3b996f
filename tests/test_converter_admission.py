"""Admission and batching on one converter (app/serving/converter.py, registry.py) with the tiny model, in process.

Capacity holds when opens arrive together (it is checked on the engine thread, where sessions are admitted), and a
batch that holds two blocks of one session (a client that resumed while its old connection's block still waited)
converts them in order without failing the other sessions of the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from app.model.seedvc import SeedVC
from app.serving.config import ConverterConfig
from app.serving.converter import ConverterService
from app.serving.wire import BlockIn, BlockOut, CapacityExceeded, ConverterError, OpenRequest, SessionTakenOver
from app.streaming.settings import StreamSettings
from bench.parity import ParitySet

SETTINGS = StreamSettings(diffusion_steps=3)


@pytest.fixture
def service(model: SeedVC, voice_ids) -> Iterator[ConverterService]:
    store, _ = voice_ids
    config = ConverterConfig(
        precision="fp32", voice_store=store, silence_gate_dbfs=None, max_sessions=2, replica_tag="replica-a"
    )
    service = ConverterService(config, model=model)
    yield service
    service.close()


def test_opens_that_arrive_together_cannot_pass_the_capacity(service: ConverterService, voice_ids) -> None:
    _, (voice, _) = voice_ids

    async def three_at_once() -> list[object]:
        opens = [service.open(OpenRequest(f"s{n}", voice, SETTINGS, seed=n)) for n in range(3)]
        return await asyncio.gather(*opens, return_exceptions=True)

    answers = asyncio.run(three_at_once())
    refused = [answer for answer in answers if isinstance(answer, CapacityExceeded)]
    assert len(refused) == 1 and len(service.sessions) == 2, answers
    assert refused[0].replica == "replica-a", "the refusal names the replica, so that the next try avoids it"


def blocks_of(parity: ParitySet, count: int, size: int) -> list[np.ndarray]:
    source = parity.wav("source_16k").astype(np.float32)
    return [np.ascontiguousarray(source[n * size : (n + 1) * size]) for n in range(count)]


def test_two_blocks_of_one_session_in_a_batch_fail_no_one(
    service: ConverterService, model: SeedVC, voice_ids, parity: ParitySet
) -> None:
    _, (voice, _) = voice_ids

    async def scenario() -> tuple[list[BlockOut | ConverterError], list[BlockOut | ConverterError]]:
        opened = [await service.open(OpenRequest(sid, voice, SETTINGS, seed=n)) for n, sid in enumerate("ab")]
        first, second = blocks_of(parity, 2, opened[0].block_16k)
        lease = {reply.session_id: reply.lease for reply in opened}
        mixed = await service.convert_blocks(
            [
                BlockIn("a", 0, first, lease["a"]),
                BlockIn("b", 0, first, lease["b"]),
                BlockIn("a", 1, second, lease["a"]),
            ]
        )
        # The same blocks in the batches the converter must have formed: a0 with b0, then a1 alone.
        for sid in "ab":
            await service.close_session(sid)
        again = [await service.open(OpenRequest(sid, voice, SETTINGS, seed=n)) for n, sid in enumerate("ab")]
        lease = {reply.session_id: reply.lease for reply in again}
        expected = await service.convert_blocks(
            [BlockIn("a", 0, first, lease["a"]), BlockIn("b", 0, first, lease["b"])]
        )
        expected += await service.convert_blocks([BlockIn("a", 1, second, lease["a"])])
        return mixed, expected

    answers, expected_answers = asyncio.run(scenario())
    mixed = [reply for reply in answers if isinstance(reply, BlockOut)]
    expected = [reply for reply in expected_answers if isinstance(reply, BlockOut)]
    assert len(mixed) == len(expected) == 3, (answers, expected_answers)
    assert [(r.session_id, r.index) for r in mixed] == [("a", 0), ("b", 0), ("a", 1)]
    for got, want in zip(mixed, expected, strict=True):
        np.testing.assert_array_equal(got.audio, want.audio)


def test_a_stale_connections_block_in_the_batch_of_its_successor(
    service: ConverterService, voice_ids, parity: ParitySet
) -> None:
    _, (voice, _) = voice_ids

    async def scenario() -> list[BlockOut | ConverterError]:
        old = await service.open(OpenRequest("a", voice, SETTINGS, seed=0))
        other = await service.open(OpenRequest("b", voice, SETTINGS, seed=1))
        new = await service.attach("a")  # the client resumed: the old connection's lease is void
        [block] = blocks_of(parity, 1, old.block_16k)
        return await service.convert_blocks(
            [
                BlockIn("a", 0, block, old.lease),
                BlockIn("a", 0, block, new.opened.lease),
                BlockIn("b", 0, block, other.lease),
            ]
        )

    stale, resumed, bystander = asyncio.run(scenario())
    assert isinstance(stale, SessionTakenOver)
    assert isinstance(resumed, BlockOut) and resumed.index == 0
    assert isinstance(bystander, BlockOut)
