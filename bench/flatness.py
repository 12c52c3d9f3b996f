"""Flat time and memory over a long run: a few engine sessions stepped together for many blocks.

Usage (from the repo root):

    .venv/bin/python -m bench.flatness                          # tiny fixture model, 4 sessions, 200 steps, CPU
    .venv/bin/python -m bench.flatness --steps 1000 --sessions 8 --json /tmp/flatness.json
    .venv/bin/python -m bench.flatness --full-size --steps 40   # full-size random weights (slow on CPU)
    .venv/bin/python -m bench.flatness --device cuda

The model is the tiny parity fixture (tests/fixtures/parity_a/model, loaded with SeedVC.load) unless `--full-size`
builds the full-size architecture with random weights (bench/full_size.py). Sessions are opened as in
bench/engine_throughput.py: each with its own voice (prompts spread over 2.0-3.0 s), seed and synthetic source, at
StreamSettings() defaults, all stepped together by Engine.step (one batched pass per step).

Warm-up rule: the first `--warmup` steps (default 3) pay the one-time costs and are left out of the quarters. The
remaining steps are cut into quarters; the report compares the median step time of the last quarter to the first
(a ratio near 1.00 is flat; a state that grows with the stream would show as a ratio above 1), for wall time and
for the process's CPU time per step (all threads; on a shared machine it is less swayed by other load). Memory is the
process's resident set (VmRSS from /proc/self/status, or the peak ru_maxrss where /proc is missing): after the
sessions are opened (start), after the warm-up, at the end of the first quarter, and at the end; plus the peak. On
CUDA the allocated device memory is reported too. Flat means the end equals the end of the first quarter within
allocator noise (a few MiB).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from app.engine.engine import Engine
from app.model.seedvc import SeedVC
from app.streaming.settings import StreamSettings
from bench.common import percentile, write_json
from bench.engine_throughput import VoicePool, open_sessions, session_inputs
from bench.fixtures import PARITY_A, ROOT
from bench.full_size import build_full_size
from bench.stages import run_meta, synchronize

FIXTURE_MODEL = PARITY_A / "model"
MIB = 1024 * 1024


def rss_bytes() -> int:
    """Current resident set size; the peak (ru_maxrss, KiB on Linux) where /proc is not available."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class MemoryPoint:
    label: str
    after_step: int  # steps done when it was read
    rss_mib: float
    device_mib: float | None  # torch.cuda.memory_allocated on CUDA


def memory_point(label: str, after_step: int, device: torch.device) -> MemoryPoint:
    device_mib = torch.cuda.memory_allocated(device) / MIB if device.type == "cuda" else None
    return MemoryPoint(label, after_step, rss_bytes() / MIB, device_mib)


@dataclass(frozen=True)
class FlatnessArgs:
    full_size: bool
    device: str
    threads: int | None
    sessions: int
    steps: int
    warmup: int
    seed: int
    json: Path | None


def parse_args(argv: Sequence[str] | None = None) -> FlatnessArgs:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full-size", action="store_true", help="full-size random weights instead of the fixture")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads; default: torch's default")
    parser.add_argument("--sessions", type=int, default=4, help="sessions stepped together")
    parser.add_argument("--steps", type=int, default=200, help="measured steps (cut into quarters)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before measuring, not in the quarters")
    parser.add_argument("--seed", type=int, default=0, help="synthetic audio, stream seeds, random weights")
    parser.add_argument("--json", type=Path, help="write per-step times, memory points and the summary here")
    ns = parser.parse_args(argv)
    if ns.steps < 4 or ns.sessions < 1 or ns.warmup < 0:
        parser.error("--steps must be at least 4 (four quarters), --sessions at least 1, --warmup at least 0")
    return FlatnessArgs(**vars(ns))


def load(args: FlatnessArgs, device: torch.device) -> SeedVC:
    if args.full_size:
        return build_full_size(args.seed).to(device)
    return SeedVC.load(FIXTURE_MODEL, device)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load(args, device)
    settings = StreamSettings()
    engine = Engine(model)
    voices = VoicePool(model, settings.max_prompt, args.seed).for_batch(args.sessions)
    ids = open_sessions(engine, voices, settings, args.seed)
    block_16k = engine.session(ids[0]).stream.geometry.block_16k
    requests = session_inputs(ids, args.warmup + args.steps, block_16k, args.seed)
    quarter = args.steps // 4
    memory = [memory_point("start (sessions open)", 0, device)]
    load_before = os.getloadavg()[0]
    seconds: list[float] = []
    cpu_seconds: list[float] = []
    for index, step in enumerate(requests):
        synchronize(device)
        cpu_start = time.process_time()
        report = engine.step(step)
        if index >= args.warmup:
            seconds.append(report.seconds)
            cpu_seconds.append(time.process_time() - cpu_start)
        done = index + 1
        if done == args.warmup:
            memory.append(memory_point("after warm-up", done, device))
        elif done == args.warmup + quarter:
            memory.append(memory_point("end of first quarter", done, device))
    memory.append(memory_point("end", len(requests), device))
    load_after = os.getloadavg()[0]
    first = percentile(seconds[:quarter], 50)
    last = percentile(seconds[-quarter:], 50)
    cpu_first = percentile(cpu_seconds[:quarter], 50)
    cpu_last = percentile(cpu_seconds[-quarter:], 50)
    baseline = next(point for point in memory if point.label == "end of first quarter")
    end = memory[-1]
    block_seconds = engine.session(ids[0]).stream.geometry.block / model.sample_rate
    weights = "full-size random weights" if args.full_size else f"fixture {FIXTURE_MODEL.relative_to(ROOT)}"
    lines = [
        f"Seed-VC flatness | {weights} | {device} | {torch.get_num_threads()} threads | {args.sessions} sessions | "
        f"torch {torch.__version__}",
        f"machine: {os.cpu_count()} CPUs, 1-min load average {load_before:.1f} before, {load_after:.1f} after the run",
        f"warm-up {args.warmup} steps, measured {args.steps} (quarters of {quarter}); "
        f"block {1000 * block_seconds:.0f} ms",
        "",
        f"step median, first quarter   {1000 * first:8.1f} ms",
        f"step median, last quarter    {1000 * last:8.1f} ms",
        f"last / first                 {last / first:8.3f}",
        f"step median, whole run       {1000 * percentile(seconds, 50):8.1f} ms "
        f"(p90 {1000 * percentile(seconds, 90):.1f}, max {1000 * max(seconds):.1f})",
        f"CPU time per step, median    {1000 * cpu_first:8.1f} ms first quarter, {1000 * cpu_last:.1f} ms last "
        f"quarter: last / first {cpu_last / cpu_first:.3f}",
        "",
        f"{'RSS':<28}{'after step':>10}{'MiB':>10}" + (f"{'device MiB':>12}" if device.type == "cuda" else ""),
    ]
    for point in memory:
        device_cell = f"{point.device_mib:>12.1f}" if point.device_mib is not None else ""
        lines.append(f"{point.label:<28}{point.after_step:>10}{point.rss_mib:>10.1f}{device_cell}")
    lines += [
        f"{'peak (ru_maxrss)':<28}{'':>10}{peak_rss_bytes() / MIB:>10.1f}",
        f"growth after the first quarter: {end.rss_mib - baseline.rss_mib:+.1f} MiB RSS over "
        f"{end.after_step - baseline.after_step} steps",
    ]
    print("\n".join(lines))
    if args.json is not None:
        document = {
            "meta": {
                **run_meta(weights, device, load_before, load_after),
                "sessions": args.sessions,
                "warmup": args.warmup,
                "steps": args.steps,
                "torch": torch.__version__,
                "settings": asdict(settings),
                "measured_seconds": sum(seconds),
            },
            "step_seconds": seconds,
            "step_cpu_seconds": cpu_seconds,
            "memory": [asdict(point) for point in memory],
            "summary": {
                "first_quarter_s": first,
                "last_quarter_s": last,
                "ratio": last / first,
                "cpu_ratio": cpu_last / cpu_first,
            },
        }
        write_json(args.json, document, "per-step times and memory")


if __name__ == "__main__":
    main()
