"""Which queue signal should the converter autoscaling policy read: requests in flight, or blocks waiting?

A step increase of load on one converter that may scale to two: SESSIONS real-time sessions start at once (the tiny
model at the README settings, more than one replica on two cores keeps up with), and the policy
(deployments/autoscaling.py) may add a replica on its queue signal only (its sessions threshold is out of reach).
For each signal, prints the seconds until the second converter served, and what the sessions lost: dropped input (end
events) and refused starts. Real local Ray Serve, loopback only; run it alone, under the CPU lock:

    flock /tmp/cpu-bench.lock unshare -n sh -c 'ip link set lo up && .venv/bin/python -m bench.autoscaling_signal'
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from tempfile import TemporaryDirectory

from app.audio.pacing import Pacer
from app.transport.protocol import FRAME_MS
from bench.harness import (
    ServeApp,
    autoscaled_converters,
    converter_replicas,
    local_ray,
    start_app,
)
from bench.parity import parity_sets
from client.stream_client import StreamResult, encode_packets, run_stream, start_message


async def paced(packets: list[bytes], seconds: float) -> AsyncGenerator[bytes, None]:
    pacer = Pacer(FRAME_MS / 1000)
    for index in range(int(seconds * 1000 / FRAME_MS)):
        await pacer.wait(index)
        yield packets[index % len(packets)]


async def step_load(app: ServeApp, sessions: int, seconds: float) -> tuple[list[StreamResult | BaseException], float]:
    """The sessions, started together; and when the second converter appeared (seconds after the start; inf: never)."""
    packets = encode_packets(app.source_48k())
    started = time.monotonic()
    scaled_at = float("inf")

    async def watch() -> None:
        nonlocal scaled_at
        while len(await asyncio.to_thread(converter_replicas)) < 2:
            await asyncio.sleep(0.25)
        scaled_at = time.monotonic() - started

    watcher = asyncio.create_task(watch())
    starts = [start_message(app.token, app.voice_id, realtime=True, seed=seed) for seed in range(sessions)]
    results = await asyncio.gather(
        *(run_stream(app.base_url, start, paced(packets, seconds)) for start in starts), return_exceptions=True
    )
    watcher.cancel()
    return list(results), scaled_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--target", type=float, default=1.0, help="target_ongoing_requests (per replica)")
    args = parser.parse_args()
    parity = parity_sets()[0]
    print(
        f"{args.sessions} real-time sessions at once for {args.seconds:.0f} s, 1 -> 2 converters, target {args.target}"
    )
    for signal in ("ongoing", "waiting"):
        with TemporaryDirectory() as voices, local_ray():
            # Sessions never decide here: only the queue signal under test may add the second converter.
            policy = {"sessions_per_replica": 100, "target_ongoing_requests": args.target, "queue_signal": signal}
            options = {"Converter": autoscaled_converters(downscale_delay_s=600, **policy)}
            app = start_app(parity, Path(voices), converters=1, max_sessions=8, options=options)
            results, scaled_at = asyncio.run(step_load(app, args.sessions, args.seconds))
        ended = [r for r in results if isinstance(r, StreamResult) and r.end is not None]
        refused = [r for r in results if isinstance(r, StreamResult) and r.error and r.error["code"] == "overloaded"]
        dropped_s = sum(r.end["dropped_ms"] for r in ended if r.end) / 1000
        print(
            f"{signal:>8}: second converter after {scaled_at:5.1f} s; dropped {dropped_s:5.1f} s of input in all; "
            f"{len(refused)} refused, {len(results) - len(ended) - len(refused)} failed otherwise"
        )


if __name__ == "__main__":
    main()
