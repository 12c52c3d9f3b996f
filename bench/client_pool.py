"""Real-time streams run by client processes: each job's streams connect first, then send their pre-encoded
Opus packets in real time from a shared wall-clock start, each at its own phase; and the short warm-up stream every
serving benchmark sends before it measures.

A job runs on its process's own event loop: this process's (no pool), or spawned subprocesses'
(bench.serving_overhead --client-procs), which takes the clients' work off the bench process's event loop.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np

from app.audio.opus import SAMPLE_RATE
from client.stream_client import (
    Event,
    Outgoing,
    StreamError,
    encode_packets,
    paced_packets,
    run_stream,
    start_message,
)


@dataclass(frozen=True)
class ClientJob:
    """Streams one client process runs: all connect now, streams[i] sends its first packet at start_at + offsets[i]."""

    base_url: str
    token: str
    voice_id: str
    packets: list[bytes]
    streams: list[int]  # stream numbers (also their seeds)
    offsets: list[float]
    start_at: float  # time.time(): a clock every process shares
    realtime_output: bool
    settings: dict[str, Any] | None = None  # what every stream's start message asks for; None: the server's defaults


async def _delayed(packets: Sequence[bytes], start_at: float) -> AsyncGenerator[Outgoing, None]:
    await asyncio.sleep(max(0.0, start_at - time.time()))
    async for packet in paced_packets(packets, realtime=True):
        yield packet


async def _one_stream(job: ClientJob, stream: int, offset: float) -> dict[str, Any]:
    ready_at: list[float] = []

    def on_event(event: Event) -> None:
        if event["type"] == "ready":
            ready_at.append(time.time())

    start = start_message(job.token, job.voice_id, realtime=job.realtime_output, seed=stream, settings=job.settings)
    due = job.start_at + offset
    try:
        result = await run_stream(job.base_url, start, _delayed(job.packets, due), on_event=on_event)
    except (StreamError, OSError) as error:
        return {"stream": stream, "events": [], "error": f"{type(error).__name__}: {error}", "late_start": False}
    refusal = None if result.error is None else f"{result.error['code']}: {result.error['message']}"
    return {
        "stream": stream,
        "events": result.events,
        "error": refusal,
        "late_start": bool(ready_at and ready_at[0] > due),
    }


async def _run_job(job: ClientJob) -> list[dict[str, Any]]:
    streams = [_one_stream(job, stream, offset) for stream, offset in zip(job.streams, job.offsets, strict=True)]
    return list(await asyncio.gather(*streams))


def client_worker(job: ClientJob) -> dict[str, Any]:
    """Runs a job's streams on this process's own event loop; also reports this process's CPU time for them."""
    started = time.process_time()
    streams = asyncio.run(_run_job(job))
    return {"pid": os.getpid(), "cpu_s": time.process_time() - started, "streams": streams}


def _ping(_: int) -> int:
    return os.getpid()


def run_clients(jobs: Sequence[ClientJob], pool: ProcessPoolExecutor | None) -> tuple[list[dict[str, Any]], float]:
    """Every job's stream results, and the CPU seconds the clients spent (this process's, when there is no pool)."""
    # Without a pool there is one job: every stream on this process's event loop.
    reports = [client_worker(job) for job in jobs] if pool is None else list(pool.map(client_worker, jobs))
    return [stream for report in reports for stream in report["streams"]], sum(r["cpu_s"] for r in reports)


def start_pool(processes: int) -> ProcessPoolExecutor:
    """`processes` spawned client processes, started and done importing before anything is timed."""
    pool = ProcessPoolExecutor(processes, mp_context=get_context("spawn"))
    list(pool.map(_ping, range(processes)))
    return pool


WARMUP_SECONDS = 1.5


def warm_up(
    base_url: str,
    token: str,
    voice_id: str,
    audio_48k: np.ndarray,
    settings: dict[str, Any] | None = None,
    pool: ProcessPoolExecutor | None = None,
) -> None:
    """One short real-time stream before measuring (a fresh replica's first blocks are slow); raises if it fails."""
    packets = encode_packets(audio_48k[: int(SAMPLE_RATE * WARMUP_SECONDS)])
    job = ClientJob(base_url, token, voice_id, packets, [0], [0.0], time.time() + 0.2, True, settings)
    results, _ = run_clients([job], pool)
    result = results[0]
    if result["error"] is not None or not any(event["type"] == "block" for event in result["events"]):
        raise RuntimeError(f"the warm-up stream failed: {result['error'] or 'no block came back'}")
