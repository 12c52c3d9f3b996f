"""The connection's outbox (app/transport/outbox.py): bounded frames, the oldest dropped when paced, waiting for
room when not, events never dropped and always in order."""

from __future__ import annotations

import asyncio

import numpy as np

from app.transport.outbox import Outbox


def frame(number: int) -> np.ndarray:
    return np.full(960, number, dtype=np.float32)


async def drain(outbox: Outbox) -> list[object]:
    items: list[object] = []
    while (item := await outbox.get()) is not None:
        items.append(item if isinstance(item, str) else int(item[0]))
    return items


def test_a_full_paced_outbox_drops_its_oldest_frames_but_no_event() -> None:
    async def scenario() -> list[object]:
        outbox = Outbox(max_frames=3, drop_oldest=True)
        for block in range(3):
            outbox.put_event(f"block {block}")
            for number in range(3):
                await outbox.put_frame(frame(10 * block + number))
        outbox.close()
        assert outbox.dropped_frames == 6 and outbox.frames == 3
        return await drain(outbox)

    assert asyncio.run(scenario()) == ["block 0", "block 1", "block 2", 20, 21, 22]


def test_an_unpaced_outbox_waits_for_room_instead() -> None:
    async def scenario() -> None:
        outbox = Outbox(max_frames=2, drop_oldest=False)
        await outbox.put_frame(frame(0))
        await outbox.put_frame(frame(1))
        third = asyncio.create_task(outbox.put_frame(frame(2)))
        await asyncio.sleep(0.05)
        assert not third.done() and outbox.frames == 2
        assert int((await outbox.get())[0]) == 0  # type: ignore[index]  # a frame
        await asyncio.wait_for(third, 1)
        outbox.close()
        assert await drain(outbox) == [1, 2] and outbox.dropped_frames == 0

    asyncio.run(scenario())
