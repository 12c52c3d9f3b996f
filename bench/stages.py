"""Per-stage time of one real-time block: content encoder, length regulator, CFM, vocoder, SOLA.

Usage (from the repo root):

    .venv/bin/python -m bench.stages                          # full-size random weights, CPU, 1 stream
    .venv/bin/python -m bench.stages --threads 2 --blocks 20 --json /tmp/stages.json
    .venv/bin/python -m bench.stages --device cuda --batch 8  # 8 streams stepped together
    .venv/bin/python -m bench.stages --model hub              # the official weights (or --model BUNDLE_DIR)
    .venv/bin/python -m bench.stages --precision bf16 --compile dit content_encoder  # bf16, compiled networks

`--compile` runs the named networks through torch.compile (inductor, dynamic shapes), compiled during the warm-up
blocks, whose time the report prints. It measures what compiling would gain; the service itself does not compile on
a CPU (README, "Precision and speed").

Without `--model` the networks are built at full size with random weights (bench/full_size.py): no download, and the
same shapes, so the same cost, as the real checkpoints. Settings are StreamSettings' defaults (upstream README's
real-time settings: block 0.18 s, crossfade 0.04 s, contexts 2.5/0.5 s, lookahead 0.02 s, 10 steps, cfg 0.7, 3 s
prompt); `--steps` and `--cfg-rate` override two of them.

The reference is 4 s of a synthetic voice-like signal (harmonics with vibrato, plus noise; fixed seed), prepared once
with prepare_voice and shared by every stream. The source is another synthetic signal, one block per step per stream.

Warm-up rule: the first `--warmup` blocks (default 3) run the full step but are not recorded; they pay the one-time
costs (allocator growth, oneDNN / cuDNN algorithm choice, CUDA context and lazy module init). The window has its full
length from the first block (zero-filled), so every block, warm-up or not, has the same shapes.

What is measured, per block: each stage's wall time as convert_block's StageClock reports it (it synchronises CUDA at
each lap), `total` = their sum, and `step` = the wall time of the whole step_streams call (adds the per-stream noise
draws, window shifts and the copy of the output to the host). The real-time factor is total median / block duration:
below 1 the batch keeps up. `latency` is an estimate, not a measurement: the algorithmic delay of a sample captured at
the start of a block (block + crossfade + SOLA search + lookahead) plus the median step, without network or audio
device buffers.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from app.audio.files import Audio
from app.model.precision import Precision
from app.model.seedvc import SeedVC
from app.streaming.settings import CONTENT_RATE, StreamGeometry, StreamSettings
from app.streaming.stream import Stream, step_streams
from app.streaming.voice import Voice, prepare_voice
from bench.common import machine_meta, percentile, write_json
from bench.full_size import build_full_size, parameter_counts

STAGES = ("content_encoder", "length_regulator", "cfm", "vocoder", "sola")
TOTAL = "total"  # sum of the stages
STEP = "step"  # wall time of the whole step_streams call
COLUMNS = (*STAGES, TOTAL, STEP)
REFERENCE_SECONDS = 4.0


# ---- pure metrics -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    median_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float


def summarize(rows: Sequence[Mapping[str, float]], columns: Sequence[str] = COLUMNS) -> dict[str, Stats]:
    """Per column of the per-block rows (milliseconds): median, p90, min, max."""
    summary = {}
    for column in columns:
        values = [row[column] for row in rows]
        summary[column] = Stats(
            median_ms=percentile(values, 50), p90_ms=percentile(values, 90), min_ms=min(values), max_ms=max(values)
        )
    return summary


def block_row(stage_seconds: Mapping[str, float], step_seconds: float) -> dict[str, float]:
    """One block's stage times in milliseconds, with their total and the whole step's wall time."""
    row = {stage: 1000 * stage_seconds[stage] for stage in STAGES}
    row[TOTAL] = sum(row.values())
    row[STEP] = 1000 * step_seconds
    return row


# ---- synthetic audio ----------------------------------------------------------------------------------------------


def voiced_signal(samples: int, rate: int, f0: tuple[float, float], seed: int) -> np.ndarray:
    """A deterministic voice-like signal: 10 harmonics of an f0 gliding f0[0] -> f0[1] with 5 Hz vibrato, 3 Hz
    syllable envelope, plus noise; float32 peaking below 1."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / rate
    f0_track = np.linspace(f0[0], f0[1], t.size) * (1 + 0.02 * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(f0_track) / rate
    harmonics = sum(np.sin(k * phase) / k for k in range(1, 11))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 3 * t)
    wave = 0.3 * envelope * harmonics + 0.01 * rng.standard_normal(t.size)
    return (0.9 * wave / np.abs(wave).max()).astype(np.float32)


def source_blocks(count: int, block_16k: int, seed: int) -> list[Tensor]:
    """`count` consecutive 16 kHz input blocks of one stream."""
    wave = voiced_signal(count * block_16k, CONTENT_RATE, (110.0, 180.0), seed)
    return list(torch.from_numpy(wave).split(block_16k))


COMPILABLE = ("content_encoder", "dit")  # SeedVC's networks that are called as modules (the vocoder is not)

# ---- running ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchArgs:
    model: str | None
    device: str
    threads: int | None
    blocks: int
    warmup: int
    steps: int
    cfg_rate: float
    batch: int
    seed: int
    precision: Precision
    compile: list[str]
    json: Path | None
    trace: Path | None


def load_model(source: str | None, device: torch.device, seed: int) -> SeedVC:
    if source is None:
        return build_full_size(seed).to(device)
    return SeedVC.load(source, device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profiler(trace: Path | None, device: torch.device) -> AbstractContextManager[Any]:
    if trace is None:
        return nullcontext()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities, record_shapes=True)


def run_blocks(model: SeedVC, streams: Sequence[Stream], inputs: Sequence[Sequence[Tensor]]) -> list[dict[str, float]]:
    """Step all streams through their inputs (inputs[s][b]: block b of stream s); one timing row per block."""
    rows = []
    for blocks in zip(*inputs, strict=True):
        synchronize(model.device)
        start = time.perf_counter()
        output = step_streams(model, streams, blocks)  # ends with a copy to the host, so the device is done
        assert output.batch is not None  # no row is skipped here
        rows.append(block_row(output.batch.stage_seconds, time.perf_counter() - start))
    return rows


def benchmark(
    model: SeedVC, voice: Voice, settings: StreamSettings, args: BenchArgs
) -> tuple[list[dict[str, float]], float]:
    """The measured blocks' rows, and the seconds the warm-up blocks took (compilation included)."""
    streams = [Stream(model, voice, settings, seed=args.seed + index) for index in range(args.batch)]
    size = streams[0].geometry.block_16k
    inputs = [source_blocks(args.warmup + args.blocks, size, seed=args.seed + 1000 + s) for s in range(args.batch)]
    warm_up_started = time.perf_counter()
    run_blocks(model, streams, [blocks[: args.warmup] for blocks in inputs])
    warm_up_s = time.perf_counter() - warm_up_started
    with profiler(args.trace, model.device) as prof:
        rows = run_blocks(model, streams, [blocks[args.warmup :] for blocks in inputs])
    if prof is not None and args.trace is not None:
        prof.export_chrome_trace(str(args.trace))
    return rows, warm_up_s


# ---- reporting ----------------------------------------------------------------------------------------------------


def delay_ms(geometry: StreamGeometry) -> float:
    """Algorithmic delay of a block's first captured sample: the block itself, then crossfade + search + lookahead."""
    samples = geometry.block + geometry.sola_buffer + geometry.sola_search + geometry.extra_right
    return 1000 * samples / geometry.rate


def describe_settings(settings: Mapping[str, Any]) -> str:
    return (
        f"block {settings['block_time']} s, crossfade {settings['crossfade_time']} s, contexts "
        f"{settings['ce_context']}/{settings['dit_context']} s, lookahead {settings['lookahead']} s, "
        f"{settings['diffusion_steps']} steps, cfg {settings['cfg_rate']}, prompt {settings['max_prompt']} s"
    )


def format_report(
    summary: Mapping[str, Stats], meta: Mapping[str, Any], counts: Mapping[str, int], geometry: StreamGeometry
) -> str:
    block_ms = 1000 * geometry.block / geometry.rate
    total = summary[TOTAL].median_ms
    lines = [
        f"Seed-VC real-time stages | {meta['weights']} | {meta['device']} | {meta['threads']} threads | "
        f"batch {meta['batch']} | torch {meta['torch']}",
        f"machine: {meta['cpus']} CPUs, 1-min load average {meta['load_average_1min'][0]:.1f} before, "
        f"{meta['load_average_1min'][1]:.1f} after the run (anything above the thread count means contention)",
        f"settings: {describe_settings(meta['settings'])}",
        f"prompt {meta['prompt_frames']} mel frames + {geometry.mel_frames} per block; content window "
        f"{geometry.window_16k} samples at 16 kHz; warm-up {meta['warmup']} blocks ({meta['warm_up_s']:.1f} s), "
        f"measured {meta['blocks']}",
        f"precision {meta['precision']}; compiled with torch.compile: {', '.join(meta['compile']) or 'nothing'}",
        "parameters: " + ", ".join(f"{name} {count / 1e6:.2f} M" for name, count in counts.items()),
        "",
        f"{'stage':<18}{'median ms':>11}{'p90 ms':>10}{'max ms':>10}{'share':>8}",
    ]
    for column in COLUMNS:
        stats = summary[column]
        share = f"{100 * stats.median_ms / total:7.1f}%" if column in STAGES else ""
        lines.append(f"{column:<18}{stats.median_ms:>11.1f}{stats.p90_ms:>10.1f}{stats.max_ms:>10.1f}{share:>8}")
    lines += [
        "",
        f"block duration      {block_ms:.1f} ms",
        f"real-time factor    {total / block_ms:.3f} = total median / block "
        f"(step median / block: {summary[STEP].median_ms / block_ms:.3f})",
        f"latency (estimate)  {delay_ms(geometry) + summary[STEP].median_ms:.0f} ms = algorithmic "
        f"{delay_ms(geometry):.0f} ms + step median, without network or device buffers",
    ]
    return "\n".join(lines)


def json_document(
    rows: Sequence[Mapping[str, float]], summary: Mapping[str, Stats], meta: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "meta": dict(meta),
        "rows": [{"block": index, **{f"{k}_ms": v for k, v in row.items()}} for index, row in enumerate(rows)],
        "summary": {column: asdict(stats) for column, stats in summary.items()},
        "real_time_factor": summary[TOTAL].median_ms / meta["block_ms"],
    }


# ---- entry point --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> BenchArgs:
    defaults = StreamSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="'hub' or a model bundle dir; default: full-size random weights")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads; default: torch's default")
    parser.add_argument("--blocks", type=int, default=10, help="measured blocks")
    parser.add_argument("--warmup", type=int, default=3, help="blocks run before measuring, not recorded")
    parser.add_argument("--steps", type=int, default=defaults.diffusion_steps, help="diffusion steps")
    parser.add_argument("--cfg-rate", type=float, default=defaults.cfg_rate, help="classifier-free guidance rate")
    parser.add_argument("--batch", type=int, default=1, help="streams stepped together in one batched pass")
    parser.add_argument("--seed", type=int, default=0, help="random weights, synthetic audio, stream noise")
    parser.add_argument(
        "--precision", type=Precision, choices=list(Precision), default=Precision.FP32, help="compute precision"
    )
    parser.add_argument(
        "--compile", nargs="+", default=[], choices=COMPILABLE, help="networks to run through torch.compile"
    )
    parser.add_argument("--json", type=Path, help="write per-block rows and the summary here")
    parser.add_argument("--trace", type=Path, help="torch.profiler chrome trace of the measured blocks (slows them)")
    ns = parser.parse_args(argv)
    if ns.blocks < 1 or ns.warmup < 0 or ns.batch < 1:
        parser.error("--blocks and --batch must be at least 1, --warmup at least 0")
    return BenchArgs(**vars(ns))


def run_meta(model: str | None, device: torch.device, load_before: float, load_after: float) -> dict[str, Any]:
    """What the engine benches record about the weights, device and machine they ran on."""
    return {
        "weights": model or "full-size random weights",
        "device": str(device),
        "threads": torch.get_num_threads(),
        **machine_meta((load_before, load_after)),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = StreamSettings(diffusion_steps=args.steps, cfg_rate=args.cfg_rate)
    model = load_model(args.model, device, args.seed)
    precision = model.set_precision(args.precision).precision
    for network in args.compile:
        getattr(model, network).compile(dynamic=True)
    counts = parameter_counts(model)
    geometry = StreamGeometry.from_settings(settings, model.sample_rate, model.config.mel.hop_length)
    samples = int(REFERENCE_SECONDS * model.sample_rate)
    reference = Audio(voiced_signal(samples, model.sample_rate, (180.0, 240.0), args.seed), model.sample_rate)
    voice = prepare_voice(model, reference, settings.max_prompt)
    load_before = os.getloadavg()[0]
    rows, warm_up_s = benchmark(model, voice, settings, args)
    load_after = os.getloadavg()[0]
    summary = summarize(rows)
    meta = {
        **run_meta(args.model, device, load_before, load_after),
        "batch": args.batch,
        "blocks": args.blocks,
        "warmup": args.warmup,
        "warm_up_s": warm_up_s,
        "precision": str(precision),
        "compile": args.compile,
        "seed": args.seed,
        "torch": torch.__version__,
        "settings": asdict(settings),
        "prompt_frames": voice.prompt_frames,
        "block_ms": 1000 * geometry.block / geometry.rate,
        "parameters": counts,
    }
    print(format_report(summary, meta, counts, geometry))
    if args.json is not None:
        write_json(args.json, json_document(rows, summary, meta), "rows and summary")


if __name__ == "__main__":
    main()
