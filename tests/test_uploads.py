"""Voice uploads (app/voices/uploads.py): a few at a time, bounded in bytes and time while the body arrives, stored
off the event loop."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from app.offload import Busy, Offload
from app.voices.store import VoiceError, VoiceRecord, VoiceStore
from app.voices.uploads import Uploads

RATE = 16_000


def recording(seconds: float = 1.5) -> bytes:
    t = np.arange(int(seconds * RATE)) / RATE
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), RATE, format="WAV")
    return buffer.getvalue()


async def body(data: bytes, chunk: int = 4096, hold: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    """An upload's body in chunks; with `hold`, the first chunk comes, the rest only once the event is set."""
    for start in range(0, len(data), chunk):
        yield data[start : start + chunk]
        if hold is not None:
            await hold.wait()


def uploads(tmp_path: Path, concurrent: int = 1, timeout_s: float = 5.0, max_bytes: int = 1_000_000) -> Uploads:
    return Uploads(VoiceStore(str(tmp_path)), Offload("uploads", 1, 4), max_bytes, concurrent, timeout_s)


def test_uploads_beyond_the_limit_wait_for_a_slot_before_reading(tmp_path: Path) -> None:
    service = uploads(tmp_path, concurrent=1)
    data = recording()
    read_by_second: list[int] = []

    async def second_body() -> AsyncIterator[bytes]:
        read_by_second.append(1)
        yield data

    async def scenario() -> None:
        hold = asyncio.Event()
        first = asyncio.create_task(service.add(body(data, hold=hold), None, "team-a", "first"))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(service.add(second_body(), None, "team-a", "second"))
        await asyncio.sleep(0.1)
        assert not first.done() and not second.done() and read_by_second == []  # waiting, body unread
        hold.set()
        records = await asyncio.gather(first, second)
        assert [record.name for record in records] == ["first", "second"] and read_by_second == [1]

    asyncio.run(scenario())


def test_a_slot_not_free_in_time_is_busy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    service = uploads(tmp_path, concurrent=1, timeout_s=0.2)
    data = recording()
    storing = threading.Event()
    add = VoiceStore.add

    def slow_add(self: VoiceStore, *args: Any, **kwargs: Any) -> VoiceRecord:
        storing.wait(10)  # a slow object store: the first upload keeps its slot meanwhile
        return add(self, *args, **kwargs)

    monkeypatch.setattr(VoiceStore, "add", slow_add)

    async def scenario() -> None:
        first = asyncio.create_task(service.add(body(data), None, "team-a", None))
        await asyncio.sleep(0.05)
        with pytest.raises(Busy):
            await service.add(body(data), None, "team-a", None)
        storing.set()
        await first
        assert (await service.add(body(data), None, "team-a", None)).seconds == 1.5  # the slot is free again

    asyncio.run(scenario())


def test_a_body_that_does_not_arrive_in_time_is_too_slow_and_frees_its_slot(tmp_path: Path) -> None:
    service = uploads(tmp_path, concurrent=1, timeout_s=0.2)
    data = recording()

    async def scenario() -> None:
        with pytest.raises(VoiceError) as slow:
            await service.add(body(data, hold=asyncio.Event()), None, "team-a", None)
        assert slow.value.reason == "too_slow"
        assert (await service.add(body(data), None, "team-a", None)).seconds == 1.5

    asyncio.run(scenario())


def test_too_large_is_refused_by_its_declared_length_or_as_soon_as_it_passes(tmp_path: Path) -> None:
    service = uploads(tmp_path, max_bytes=10_000)
    chunks_read: list[int] = []

    async def endless() -> AsyncIterator[bytes]:
        while True:
            chunks_read.append(1)
            yield b"\0" * 4096

    async def scenario() -> None:
        with pytest.raises(VoiceError, match="20000 bytes") as declared:
            await service.add(endless(), "20000", "team-a", None)
        assert declared.value.reason == "too_large" and chunks_read == []
        with pytest.raises(VoiceError, match="over 10000 bytes") as streamed:
            await service.add(endless(), None, "team-a", None)
        assert streamed.value.reason == "too_large" and len(chunks_read) == 3

    asyncio.run(scenario())
