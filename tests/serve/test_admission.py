"""Admission control: when every converter is full, a new session is refused at once with a code and a retry-after,
and the sessions already admitted keep running."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from bench.harness import BASE_URL, ServeApp, local_ray, start_app
from bench.parity import ParitySet
from client.stream_client import StreamResult, stream_audio
from tests.serve.started import started_stream

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def full_after_one(parity: ParitySet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    with local_ray():
        yield start_app(parity, tmp_path_factory.mktemp("voices"), converters=1, max_sessions=1)


def test_excess_session_is_refused_and_the_admitted_one_continues(full_after_one: ServeApp) -> None:
    app = full_after_one
    audio = app.source_48k(3.0)

    async def two() -> tuple[StreamResult, StreamResult]:
        admitted = await started_stream(BASE_URL, app.token, app.voice_id, audio)
        refused = await stream_audio(BASE_URL, app.token, app.voice_id, audio, realtime=True)
        return await admitted, refused

    admitted, refused = asyncio.run(two())
    assert refused.error is not None and refused.error["code"] == "overloaded"
    assert refused.error["retry_after_s"] > 0 and refused.ready is None
    assert admitted.error is None and admitted.end is not None
    assert len(admitted.output_48k) >= len(audio)
