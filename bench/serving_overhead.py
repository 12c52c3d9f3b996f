"""Serving-stack overhead per block: ingress block latency minus the engine's own step, for 1, 8 and 32 live streams.

Usage (from the repo root; nothing else may run Ray or use port 8000 meanwhile):

    .venv/bin/python -m bench.serving_overhead                          # 1, 8, 32 streams; 6 s each; table
    .venv/bin/python -m bench.serving_overhead --streams 1,8,32 --seconds 6 --json /tmp/overhead.json
    .venv/bin/python -m bench.serving_overhead --client-procs 2         # the clients in 2 subprocesses
    .venv/bin/python -m bench.serving_overhead --aligned                # every stream's blocks end together
    .venv/bin/python -m bench.serving_overhead --pacing paced --no-real-model

What runs: a local Ray (2 CPUs) and the real Serve application, started with the Serve harness (bench/harness.py:
local_ray, the tiny fixture bundle tests/fixtures/parity_a/model, replicas with num_cpus 0 and one torch thread),
real WebSockets through Serve's proxy, real libopus. The converter runs in identity mode (ConverterConfig.identity:
each block comes back unconverted, resampled 16 kHz -> model rate), so a block's latency IS the serving overhead:
Opus decode and stream-resampling at the ingress, cutting blocks, the Ray handle call ingress -> converter (router,
pickling, the replica's event loop), `@serve.batch` waiting to fill a batch, the engine thread hop, the trivial
identity work, and the way back. `latency_ms` of a block event runs from the arrival at the ingress of the packet that
completes the block to the ingress holding the converted block (app/serving/live.py); the network to the client
and the output Opus encoding are outside it.

Deployment options (bench/local_app.py): serve_config.yaml's Converter and Ingress `max_ongoing_requests` and the
Converter's `user_config` (batching: max_batch_size, batch_wait_s), with the harness's num_cpus 0, `--converters`
replicas (default 1, as serve_config.yaml) and max_sessions = the most streams. (Serve's default max_ongoing_requests
of 5, which the harness once ran with, capped the ingress at 5 open WebSockets: at 8 streams 3 waited for a slot.)

Streams: `--seconds` (6) of the fixture's source, looped, pre-encoded once as 20 ms Opus packets and sent in real time
(one packet per 20 ms against an absolute clock). Every stream connects first; once all are ready their first packets
go out at phases spread evenly over one block (`--aligned`: all at once, so all blocks end in the same 20 ms and reach
the converter together, the worst case for queueing and the best for batching). Blocks whose input was not complete
before the end message (the padded last block and the flush blocks, which the server cuts all at once) are left out.
One short stream (1.5 s) warms the app up after every start.

Output pacing (`--pacing`, both by default): `paced` is live operation (start message realtime=true: the server paces
its output at 20 ms per packet). The server's output pump (app/serving/live.py: pump) converts block k+1 only after
the last frame of block k is paced out. The pacer's clock starts at the first output frame, so frame due times are
fixed by the FIRST block's latency L0, and block k's last frame is due L0 - 20 ms after block k+1's input is
complete: once L0 exceeds one frame (20 ms), every later block waits L0 - 20 ms in the ingress before its conversion
even starts, and its latency_ms includes that wait. `unpaced` sends the same paced input with
realtime=false (the server sends each block's output at once), which leaves the coupling out: the difference between
the two is the pacer's share. With the real model (step ~100 ms) paced latency settles near 2 x step - 20 ms.
realtime=false also switches the server from dropping input to backpressure (it stops reading the socket while 3
blocks wait): when the stack cannot keep up, unpaced input waits unread before a block's clock starts, so an
overloaded unpaced run understates latency; the paced run's dropped blocks are the overload signal.

Direct converter probe (bench/converter_probe.py): after each (re)start, this process opens a session on the
converter itself and sends it 24 blocks of the source through a DeploymentHandle (no WebSocket, no ingress), one in
flight at real-time pace, and reads each reply's BlockOut: the round trip here, the replica's queue_seconds (the
`@serve.batch` wait, since nothing else is in flight) and compute_seconds (the engine step, or the identity work).
It splits the single-stream overhead into the Ray handle hop + batching wait vs what the WebSocket path and the
ingress add on top.

Engine step with the real model (on by default; `--no-real-model` skips it): one stream with the tiny model
converting, in each pacing. The block event carries no compute time, so its overhead is latency_ms minus the median
engine step that the probe measured in the replica just before (compute_seconds: same model, process, settings and
thread). A median, so the overhead's percentiles also carry the step's own spread. Only one stream: the tiny model
takes ~100 ms per stream-block on one thread, so 2 already fill a core and 8 or 32 fall behind real time and drop
input, and then latency is backlog, not overhead. queue_ms is not subtracted: at one stream it is `@serve.batch`
waiting out its timeout for a batch that never fills, which is serving overhead. Identity mode is the measurement;
this is a cross-check.

CPU (bench/cpu_usage.py): per process group (ingress replica, converter replica, Serve proxy, Serve controller,
other Ray processes, this bench process = Ray driver + the clients unless `--client-procs`, client subprocesses,
everything else) from /proc/<pid>/stat, and the machine's busy share from /proc/stat, each in % of ONE core over the
run (the machine has 2: 200 % is saturation). An idle row (app up, no stream, 3 s) shows Serve's own background
load. ms/pkt: the ingress's and the proxy's CPU above idle per stream-packet (one 20 ms packet in and one out, and
1/9 of a block's converter call); compare them with the ingress's own audio work per stream-packet (Opus decode and
encode, both resamplers), timed in this process and printed in the header: the rest is Serve's WebSocket forwarding,
ASGI, asyncio and Ray calls. The busiest threads of the ingress, converter and proxy show whether one thread (an
event loop) is the limit; Ray names most of them ray::IDLE. A warning marks runs during which other work used more
than 20 % of a core. The 1-minute load average before and after each run is reported too, but it lags a 10 s run by
design.

Statistics are over every kept block of every stream of a run (p50/p95/p99/max; bench.common.percentile). At one
stream a run has ~30 blocks, so its p99 is close to its max.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.audio.files import resample
from app.audio.opus import SAMPLE_RATE, OpusDecoder, OpusEncoder
from app.audio.stream_resample import StreamingResampler
from app.streaming.settings import CONTENT_RATE, StreamSettings
from app.transport.protocol import FRAME_MS
from bench.client_pool import ClientJob, run_clients, start_pool, warm_up
from bench.common import distribution, figure, percentile, positive_ints, write_json
from bench.converter_probe import PROBE_BLOCKS, PROBE_WARMUP, describe_probe, probe_blocks, probe_converter
from bench.cpu_usage import (
    BENCH,
    CLIENTS,
    CONTROLLER,
    CONVERTER,
    INGRESS,
    OTHER,
    PROXY,
    RAY_OTHER,
    busiest_threads,
    cpu_percent,
    cpu_snapshot,
    ray_running,
)
from bench.fixtures import PARITY_A
from bench.harness import ServeApp, local_ray
from bench.local_app import all_replica_stats, deploy
from bench.parity import ParitySet
from bench.streams import dropped_block, kept_block, looped, phases
from client.stream_client import Event, encode_packets

IDLE_SECONDS = 3.0
OTHER_CPU_WARNING = 20.0  # % of one core used outside this bench during a run: its numbers are contaminated
READY_GRACE_S = 1.0  # before the first packet: every stream connects and opens its session first
READY_GRACE_PER_STREAM_S = 0.05


# ---- pure metrics -------------------------------------------------------------------------------------------------


def block_rows(
    stream: int, events: Sequence[Event], block_ms: float, input_ms: float, step_ms: float
) -> list[dict[str, Any]]:
    """One row per kept block: latency and queue as the server reported them, overhead = latency - step_ms.

    The silent mode of the converter (the silence gate) is off in this bench, so a silent block is a dropped one."""
    return [
        {
            "stream": stream,
            "index": event["index"],
            "latency_ms": event["latency_ms"],
            "queue_ms": event["queue_ms"],
            "overhead_ms": event["latency_ms"] - step_ms,
            "dropped": dropped_block(event),
        }
        for event in events
        if kept_block(event, block_ms, input_ms)
    ]


def batch_size_counts(stats: Mapping[str, Mapping[str, Any]]) -> Counter[int]:
    """Engine steps per batch size, summed over the converter replicas' stats."""
    total: Counter[int] = Counter()
    for replica in stats.values():
        for size, count in replica.get("batch_sizes", {}).items():
            total[int(size)] += int(count)
    return total


def batch_size_delta(before: Mapping[str, Mapping[str, Any]], after: Mapping[str, Mapping[str, Any]]) -> Counter[int]:
    """The batch sizes of the steps taken between two stats snapshots (replicas that appeared count from zero)."""
    delta = batch_size_counts(after)
    delta.subtract(batch_size_counts({r: s for r, s in before.items() if r in after}))
    return +delta  # drops zero counts


def describe_batches(counts: Mapping[int, int]) -> str:
    """'1x40 2x12 5x3': batch size x engine steps, by size."""
    return " ".join(f"{size}x{count}" for size, count in sorted(counts.items())) or "-"


# ---- the service --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchArgs:
    streams: tuple[int, ...]
    seconds: float
    pacing: list[str]
    aligned: bool
    converters: int
    client_procs: int
    real_model: bool
    json: Path | None


def start_service(parity: ParitySet, voices: Path, args: BenchArgs, identity: bool) -> tuple[ServeApp, dict[str, Any]]:
    """The app (re)deployed for this bench's largest run; see `deploy`."""
    return deploy(parity, voices, max(args.streams) + 1, args.converters, identity)


def identity_work_ms(model_rate: int, block_16k: int, repeats: int = 50) -> float:
    """Median time of identity mode's per-block work in this process: resampling one block 16 kHz -> model rate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        samples = torch.zeros(block_16k)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            resample(samples, CONTENT_RATE, model_rate)
            times.append(1000 * (time.perf_counter() - started))
        return percentile(times, 50)
    finally:
        torch.set_num_threads(threads)


def transport_work_ms(packets: Sequence[bytes], model_rate: int, block_s: float) -> dict[str, float]:
    """Median in-process cost (ms) of the ingress's own audio work per stream-packet, one torch thread: Opus decode,
    48 -> 16 kHz stream-resampling, Opus encode of an output frame, and 1/frames-per-block of resampling one output
    block model rate -> 48 kHz. Everything else the ingress spends per packet is Serve, ASGI, WebSocket and asyncio."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        decoder, encoder = OpusDecoder(), OpusEncoder()
        to_16k, to_48k = StreamingResampler(SAMPLE_RATE, CONTENT_RATE), StreamingResampler(model_rate, SAMPLE_RATE)
        block = torch.zeros(round(block_s * model_rate))
        frames_per_block = round(block_s * 1000 / FRAME_MS)
        laps: dict[str, list[float]] = {"decode": [], "resample_in": [], "encode": [], "resample_out": []}
        for packet in packets:
            started = time.perf_counter()
            pcm = decoder.decode(packet)
            decoded = time.perf_counter()
            to_16k.push(torch.from_numpy(pcm))
            resampled = time.perf_counter()
            encoder.encode(pcm)
            encoded = time.perf_counter()
            to_48k.push(block)
            done = time.perf_counter()
            laps["decode"].append(decoded - started)
            laps["resample_in"].append(resampled - decoded)
            laps["encode"].append(encoded - resampled)
            laps["resample_out"].append((done - encoded) / frames_per_block)
        work = {name: 1000 * percentile(values, 50) for name, values in laps.items()}
        return {**work, "total": sum(work.values())}
    finally:
        torch.set_num_threads(threads)


# ---- one run ------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    label: str  # identity/paced, identity/unpaced, model/paced
    streams: int
    step_ms: float  # subtracted from latency: 0 in identity mode; with the model, the probe's median compute
    rows: list[dict[str, Any]]
    errors: list[str]
    late_starts: int
    late_events: int
    dropped_ms: int
    batch_sizes: dict[int, int]
    cpu: dict[str, float]
    load_1min: tuple[float, float]
    wall_s: float
    packets_per_stream: int
    client_cpu_s: float
    idle_cpu: dict[str, float]  # the same groups with the app up and no stream
    threads: dict[str, list[str]]  # the busiest threads of the ingress, converter and proxy
    extra: dict[str, Any] = field(default_factory=dict)

    def cpu_ms_per_packet(self, group: str, stream_packets: int) -> float:
        """The group's CPU above its idle level, in ms per stream-packet (one packet in and one out)."""
        return 10 * max(0.0, self.cpu[group] - self.idle_cpu[group]) * self.wall_s / stream_packets

    def summary(self) -> dict[str, Any]:
        converted = [row for row in self.rows if not row["dropped"]]
        overhead = [row["overhead_ms"] for row in converted]
        queue = [row["queue_ms"] for row in converted]
        stream_packets = self.streams * self.packets_per_stream
        return {
            "label": self.label,
            "streams": self.streams,
            "blocks": len(converted),
            "dropped_blocks": len(self.rows) - len(converted),
            "overhead_ms": distribution(overhead),
            "queue_ms": distribution(queue),
            "rest_ms": distribution([o - q for o, q in zip(overhead, queue, strict=True)]),
            "first_block_latency_ms": distribution([row["latency_ms"] for row in converted if row["index"] == 0]),
            "batch_sizes": self.batch_sizes,
            "mean_batch": (sum(s * c for s, c in self.batch_sizes.items()) / max(1, sum(self.batch_sizes.values()))),
            "errors": len(self.errors),
            "late_starts": self.late_starts,
            "late_events": self.late_events,
            "dropped_ms": self.dropped_ms,
            "cpu_percent_of_one_core": self.cpu,
            "ingress_cpu_ms_per_packet": self.cpu_ms_per_packet(INGRESS, stream_packets),
            "proxy_cpu_ms_per_packet": self.cpu_ms_per_packet(PROXY, stream_packets),
            "load_1min": list(self.load_1min),
            "client_cpu_s": self.client_cpu_s,
            "busiest_threads": self.threads,
            **self.extra,
        }


def measure(
    app: ServeApp,
    audio: np.ndarray,
    streams: int,
    label: str,
    realtime_output: bool,
    args: BenchArgs,
    pool: ProcessPoolExecutor | None,
    idle_cpu: dict[str, float],
    step_ms: float = 0.0,
) -> RunResult:
    """One run of `streams` concurrent streams; each block's overhead is its latency minus `step_ms`."""
    packets = encode_packets(audio)
    block_s = StreamSettings().block_time
    offsets = phases(streams, block_s, args.aligned)
    start_at = time.time() + READY_GRACE_S + READY_GRACE_PER_STREAM_S * streams
    parts = max(1, min(args.client_procs, streams))
    # Job j runs streams j, j + parts, ...: interleaved, so that every client process has phases all over the block.
    numbers = list(range(streams))
    jobs = [
        ClientJob(
            app.base_url,
            app.token,
            app.voice_id,
            packets,
            numbers[j::parts],
            offsets[j::parts],
            start_at,
            realtime_output,
        )
        for j in range(parts)
    ]
    stats_before = all_replica_stats()
    load_before = os.getloadavg()[0]
    cpu_before = cpu_snapshot()
    results, client_cpu = run_clients(jobs, pool)
    cpu_after = cpu_snapshot()
    load_after = os.getloadavg()[0]
    stats_after = all_replica_stats()
    rows: list[dict[str, Any]] = []
    errors, late_starts, late_events, dropped = [], 0, 0, 0
    input_ms = len(packets) * FRAME_MS
    for result in sorted(results, key=lambda r: r["stream"]):
        ready = next((e for e in result["events"] if e["type"] == "ready"), None)
        if result["error"] is not None:
            errors.append(f"stream {result['stream']}: {result['error']}")
        if ready is None:
            continue
        rows += block_rows(result["stream"], result["events"], ready["block_ms"], input_ms, step_ms)
        late_starts += result["late_start"]
        late = [e for e in result["events"] if e["type"] == "late"]
        late_events += len(late)
        end = next((e for e in result["events"] if e["type"] == "end"), None)
        dropped += int(end["dropped_ms"]) if end else int(late[-1]["total_dropped_ms"]) if late else 0
    return RunResult(
        label=label,
        streams=streams,
        step_ms=step_ms,
        rows=rows,
        errors=errors,
        late_starts=late_starts,
        late_events=late_events,
        dropped_ms=dropped,
        batch_sizes=dict(sorted(batch_size_delta(stats_before, stats_after).items())),
        cpu=cpu_percent(cpu_before, cpu_after),
        load_1min=(load_before, load_after),
        wall_s=cpu_after.wall - cpu_before.wall,
        packets_per_stream=len(packets),
        client_cpu_s=client_cpu,
        idle_cpu=idle_cpu,
        threads=busiest_threads(cpu_before, cpu_after),
    )


def idle_cpu(seconds: float = IDLE_SECONDS) -> dict[str, float]:
    """CPU per group with the app up and no stream: Serve's own background work (health checks, metrics, polls)."""
    before = cpu_snapshot()
    time.sleep(seconds)
    return cpu_percent(before, cpu_snapshot())


# ---- reporting ----------------------------------------------------------------------------------------------------


def format_report(summaries: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    lines = [
        f"Serving overhead per block | {meta['machine']} | {meta['deployment']} | {meta['clients']}",
        f"streams of {meta['seconds']:.0f} s, paced input, {meta['phases']}; block {meta['block_ms']:.0f} ms; "
        f"identity work per block (resample 16 kHz -> {meta['model_rate']} Hz, in-process) "
        f"{meta['identity_work_ms']:.2f} ms",
        "overhead = latency_ms - engine step (0 in identity mode; with the model the probe's median step); "
        "queue = of it, waiting at the converter for a "
        "batch / the engine thread; rest = overhead - queue; blk0 = p50 latency of the streams' first blocks;",
        "blocks = converted blocks counted; drop = blocks the server dropped (fell > 3 blocks behind), not counted; "
        "late = streams whose ready came after their first packet was due (they waited for a connection slot)",
        f"app work per stream-packet at the ingress, in-process: {meta['transport_work']}",
        "",
        f"{'run':<17}{'n':>3}{'blocks':>7} | {'overhead p50':>12}{'p95':>7}{'p99':>7}{'max':>7} | "
        f"{'queue p50':>9}{'p95':>6} | {'rest p50':>8}{'p95':>6} | {'blk0':>5} | "
        f"{'drop':>4} {'late':>4} {'err':>3} | batch sizes",
    ]
    for s in summaries:
        o, q, r = s["overhead_ms"], s["queue_ms"], s["rest_ms"]
        lines.append(
            f"{s['label']:<17}{s['streams']:>3}{s['blocks']:>7} | {figure(o['p50']):>12}{figure(o['p95']):>7}"
            f"{figure(o['p99']):>7}{figure(o['max']):>7} | {figure(q['p50']):>9}{figure(q['p95']):>6} | "
            f"{figure(r['p50']):>8}{figure(r['p95']):>6} | {figure(s['first_block_latency_ms']['p50']):>5} | "
            f"{s['dropped_blocks']:>4} {s['late_starts']:>4} {s['errors']:>3} | "
            f"{describe_batches(s['batch_sizes'])}"
        )
    lines += [
        "",
        f"direct converter probe ({PROBE_BLOCKS - PROBE_WARMUP} blocks, this process -> DeploymentHandle -> converter, "
        "one in flight, real-time pace, no other stream): p50 / p95 / max ms",
    ]
    for mode, probe in meta["probes"].items():
        lines.append(
            f"  {mode:<9}"
            + " | ".join(
                f"{name.removesuffix('_ms')} {figure(d['p50'])} / {figure(d['p95'])} / {figure(d['max'])}"
                for name, d in probe.items()
            )
        )
    lines += [
        "",
        "CPU, % of one core over the run (2 cores = 200 %); ms/pkt: CPU above idle per stream-packet (one in, one out)",
        f"{'run':<17}{'n':>3} | {'machine':>7}{'ingress':>8}{'convert':>8}{'proxy':>7}{'ctrl':>6}{'ray':>5}"
        f"{'bench':>6}{'client':>7}{'other':>6} | {'ingr ms/pkt':>11}{'proxy ms/pkt':>13} | load before/after",
    ]
    c = meta["idle_cpu"]
    lines.append(
        f"{'idle (no stream)':<20} | {c['machine']:>7.0f}{c[INGRESS]:>8.0f}{c[CONVERTER]:>8.0f}{c[PROXY]:>7.0f}"
        f"{c[CONTROLLER]:>6.0f}{c[RAY_OTHER]:>5.0f}{c[BENCH]:>6.0f}{c[CLIENTS]:>7.0f}{c[OTHER]:>6.0f} |"
    )
    for s in summaries:
        c = s["cpu_percent_of_one_core"]
        lines.append(
            f"{s['label']:<17}{s['streams']:>3} | {c['machine']:>7.0f}{c[INGRESS]:>8.0f}{c[CONVERTER]:>8.0f}"
            f"{c[PROXY]:>7.0f}{c[CONTROLLER]:>6.0f}{c[RAY_OTHER]:>5.0f}{c[BENCH]:>6.0f}{c[CLIENTS]:>7.0f}"
            f"{c[OTHER]:>6.0f} | {s['ingress_cpu_ms_per_packet']:>11.3f}{s['proxy_cpu_ms_per_packet']:>13.3f} | "
            f"{s['load_1min'][0]:.2f} / {s['load_1min'][1]:.2f}"
        )
    return "\n".join(lines)


# ---- entry point --------------------------------------------------------------------------------------------------


def _pacings(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or not set(values) <= {"paced", "unpaced"}:
        raise argparse.ArgumentTypeError(f"expected paced, unpaced or both, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> BenchArgs:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serving_overhead",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--streams", type=positive_ints, default=(1, 8, 32), help="concurrent streams per run (1,8,32)")
    parser.add_argument("--seconds", type=float, default=6.0, help="input per stream, in seconds (6)")
    parser.add_argument("--pacing", type=_pacings, default=["paced", "unpaced"], help="output pacing: paced,unpaced")
    parser.add_argument("--aligned", action="store_true", help="start every stream at the same phase")
    parser.add_argument("--converters", type=int, default=1, help="converter replicas (1, as serve_config.yaml)")
    parser.add_argument("--client-procs", type=int, default=0, help="client subprocesses; 0 = in this process")
    parser.add_argument("--no-real-model", dest="real_model", action="store_false", help="skip the real-model run")
    parser.add_argument("--json", type=Path, help="write per-block rows, summaries and metadata here")
    ns = parser.parse_args(argv)
    if ns.seconds < 1 or ns.converters < 1 or ns.client_procs < 0:
        parser.error("--seconds and --converters must be at least 1, --client-procs at least 0")
    return BenchArgs(**vars(ns))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if running := ray_running():
        print("another Ray is running on this machine (Serve needs port 8000 to itself):", *running, sep="\n  ")
        return 2
    pool = None
    if args.client_procs:
        pool = start_pool(args.client_procs)
    parity = ParitySet(PARITY_A)
    settings = StreamSettings()
    runs: list[RunResult] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-voices-") as voices, local_ray():
            app, options = start_service(parity, Path(voices), args, identity=True)
            audio = looped(app.source_48k(), args.seconds, 48000)
            warm_up(app.base_url, app.token, app.voice_id, audio, pool=pool)
            idle = idle_cpu()
            blocks = probe_blocks(audio, round(settings.block_time * CONTENT_RATE), PROBE_BLOCKS)
            probes = {"identity": describe_probe(probe_converter(app.voice_id, blocks, settings.block_time))}
            for pacing in args.pacing:
                for streams in args.streams:
                    label = f"identity/{pacing}"
                    runs.append(measure(app, audio, streams, label, pacing == "paced", args, pool, idle))
                    print(f"done: identity/{pacing} x{streams}", file=sys.stderr)
            if args.real_model:
                app, _ = start_service(parity, Path(voices), args, identity=False)
                speed = {r: s["real_time_factor"] * settings.block_time * 1000 for r, s in all_replica_stats().items()}
                warm_up(app.base_url, app.token, app.voice_id, audio, pool=pool)
                probes["model"] = describe_probe(probe_converter(app.voice_id, blocks, settings.block_time))
                step = probes["model"]["compute_ms"]["p50"] or 0.0
                for pacing in args.pacing:
                    run = measure(app, audio, 1, f"model/{pacing}", pacing == "paced", args, pool, idle, step)
                    run.extra = {"replica_speed_check_step_ms": speed}
                    runs.append(run)
    finally:
        if pool is not None:
            pool.shutdown()
    model_rate = int(parity.geometry["sr"])
    block_16k = round(settings.block_time * CONTENT_RATE)
    work = transport_work_ms(encode_packets(audio), model_rate, settings.block_time)
    meta = {
        "machine": f"{os.cpu_count()} CPUs",
        "deployment": f"{args.converters} converter(s), {options['mode']}",
        "options": options,
        "clients": f"clients in {args.client_procs} subprocess(es)" if pool else "clients in the bench process",
        "seconds": args.seconds,
        "phases": "all streams aligned" if args.aligned else "stream phases spread over one block",
        "block_ms": 1000 * settings.block_time,
        "model_rate": model_rate,
        "identity_work_ms": identity_work_ms(model_rate, block_16k),
        "transport_work_ms": work,
        "transport_work": ", ".join(f"{name} {value:.3f}" for name, value in work.items()) + " ms",
        "idle_cpu": idle,
        "probes": probes,
        "torch": torch.__version__,
    }
    summaries = [run.summary() for run in runs]
    print(format_report(summaries, meta))
    print("\nbusiest threads, % of one core:")
    for run in runs:
        print(
            f"  {run.label + ' x' + str(run.streams):<20} "
            + " | ".join(f"{group}: {', '.join(names)}" for group, names in run.threads.items())
        )
    for run in runs:
        if run.cpu[OTHER] > OTHER_CPU_WARNING:
            print(f"WARNING {run.label} x{run.streams}: other work used {run.cpu[OTHER]:.0f} % of a core meanwhile")
        for error in run.errors[:5]:
            print(f"{run.label} x{run.streams}: {error}")
        if run.step_ms:
            print(f"{run.label} x{run.streams}: subtracted the probe's median engine step, {run.step_ms:.1f} ms")
    if args.json is not None:
        document = {
            "meta": meta,
            "summaries": summaries,
            "rows": [{"run": run.label, "streams": run.streams, **row} for run in runs for row in run.rows],
            "errors": {f"{run.label} x{run.streams}": run.errors for run in runs},
        }
        write_json(args.json, document, "rows and summaries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
