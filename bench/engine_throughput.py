"""Multi-session engine throughput: B streams stepped together by Engine.step, for several batch sizes B.

Usage (from the repo root):

    .venv/bin/python -m bench.engine_throughput                         # B = 1,2,4,8,16; both variants; CPU
    .venv/bin/python -m bench.engine_throughput --batches 1,8 --warmup 1 --steps 5 --json /tmp/engine.json
    .venv/bin/python -m bench.engine_throughput --variants readme --threads 2
    .venv/bin/python -m bench.engine_throughput --device cuda --autocast bf16 --compile
    .venv/bin/python -m bench.engine_throughput --model hub             # the official weights (or a bundle dir)

Without `--model` the networks are built at full size with random weights (bench/full_size.py): the real shapes, so
the real cost. Two setting variants (`--variants`, default both): `readme` = StreamSettings() defaults, upstream
README's real-time settings (block 0.18 s, 10 diffusion steps, cfg 0.7); `fast` = the same with 5 steps and cfg 0
(no guidance, so the DiT runs B rows instead of 2B, half as often).

Sessions: every session has its own voice, prepared with prepare_voice from its own synthetic reference (a different
f0 range and noise seed), its own stream seed and its own synthetic source. Prompt lengths differ per session: for
B >= 2 they are spread evenly over 2.0-3.0 s, for B = 1 the single prompt is 2.5 s, so the mean prompt is 2.5 s at
every B and the padding of short prompts to the batch's longest (3.0 s) is charged to batching, as it is in serving.
All sessions share the block settings, so each step is ONE batched pass (checked: the report's group_sizes is [B]).

Warm-up rule: per (variant, B) a fresh Engine opens B sessions and runs `--warmup` steps (default 1) that are not
recorded (allocator growth, oneDNN primitive choice, CUDA lazy init, torch.compile's compilation for the new
shapes). Then `--steps` measured steps (default 3) per B, interleaved round-robin over the batch sizes (B=1, 2, 4,
..., then again), so that load from other processes on a shared machine hits every batch size alike instead of
skewing one of them. With the defaults the full CPU run takes about 6 minutes on two cores (a 2-core Xeon with
AVX-512); medians of 3 steps are rough (repeat runs differed by up to 0.1 in the ratios), so read them with that in
mind. The rolling window has its full length from the first block
(zero-filled), so every step has the same shapes.

What is measured, per step: `step` = wall time of Engine.step (CUDA synchronised before; the step ends with the copy
of the output to the host), and its `stage_seconds` (content encoder, length regulator, CFM, vocoder, SOLA; the
StageClock synchronises CUDA at each lap). `other` = step - sum of stages: the per-stream random draws (CPU
generators, one per stream, by the parity contract), window shifts, grouping, the host copy. `cpu` = the process's
CPU time during the step (all threads): on a shared machine its per-stream ratio is less swayed by other work than
wall time (time slices taken by other processes do not count; threads spinning at a barrier still do).

Reported per B: median step, throughput = stream-blocks per second (B / step), per-stream cost (step / B) and its
ratio to B = 1, real-time capacity = B * block duration / step (how many streams one replica keeps in real time
at this batch size; below B the batch does not keep up), and the CPU time per stream with its ratio to B = 1.
Then the per-stream cost of every stage (stage / B, and its ratio to B = 1), which shows what scales worst. Finally
the CPU random draws of 8 streams (draw_block_noise for each, fresh generators, median of 20 repeats) as a share of
the batch-8 step: what a device-side draw mode could save at most (on CUDA the draws' host-to-device copies come on
top and are not counted here).

`--autocast {fp16,bf16}` wraps each step in torch.autocast on CUDA (ignored on CPU, with a note). `--compile` wraps
the DiT in torch.compile (it works on CPU when a C++ compiler is present; the first step of each shape compiles, so
keep `--warmup` >= 1). A warm-up step that fails under either option drops it, reports the error and continues
(bf16 autocast is expected to fail in the vocoder's iSTFT: torch.complex takes no bfloat16 inputs, as it does on CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from app.audio.files import Audio
from app.engine.engine import BlockRequest, Engine, StepReport
from app.model.dit import DiT
from app.model.seedvc import SeedVC
from app.streaming.noise import draw_block_noise
from app.streaming.settings import StreamGeometry, StreamSettings
from app.streaming.voice import Voice, prepare_voice
from bench.common import positive_ints, write_json
from bench.stages import (
    STAGES,
    Stats,
    describe_settings,
    load_model,
    run_meta,
    source_blocks,
    summarize,
    synchronize,
    voiced_signal,
)

VARIANTS: dict[str, StreamSettings] = {
    "readme": StreamSettings(),  # upstream README real-time settings: 10 steps, cfg 0.7
    "fast": StreamSettings(diffusion_steps=5, cfg_rate=0.0),
}
OTHER = "other"  # step minus the sum of the stages
STEP = "step"  # wall time of Engine.step
COLUMNS = (*STAGES, OTHER, STEP)
CPU = "cpu"  # process CPU time of the step, all threads (less sensitive to other load than wall time)
PROMPT_RANGE = (2.0, 3.0)  # seconds; references are exactly this long, so the prompt is the whole reference
DRAW_BATCH = 8
DRAW_REPEATS = 20
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ---- sessions -----------------------------------------------------------------------------------------------------


def prompt_seconds(batch: int) -> list[float]:
    """Prompt length of each of `batch` sessions: evenly over PROMPT_RANGE, the middle for a single session."""
    low, high = PROMPT_RANGE
    if batch == 1:
        return [(low + high) / 2]
    return [float(seconds) for seconds in np.linspace(low, high, batch)]


def session_reference(index: int, seconds: float, rate: int, seed: int) -> Audio:
    """Session `index`'s synthetic reference: its own f0 range (a different 'speaker') and noise seed."""
    f0 = (140.0 + 9.0 * index, 200.0 + 9.0 * index)
    return Audio(voiced_signal(round(seconds * rate), rate, f0, seed + index), rate)


@dataclass
class VoicePool:
    """Prepared voices by (session index, prompt seconds), shared by all variants (they agree on max_prompt)."""

    model: SeedVC
    max_prompt: float
    seed: int
    _voices: dict[tuple[int, float], Voice] = field(default_factory=dict)

    def get(self, index: int, seconds: float) -> Voice:
        key = (index, round(seconds, 6))
        if key not in self._voices:
            reference = session_reference(index, seconds, self.model.sample_rate, self.seed)
            self._voices[key] = prepare_voice(self.model, reference, self.max_prompt)
        return self._voices[key]

    def for_batch(self, batch: int) -> list[Voice]:
        return [self.get(index, seconds) for index, seconds in enumerate(prompt_seconds(batch))]


def open_sessions(engine: Engine, voices: Sequence[Voice], settings: StreamSettings, seed: int) -> list[str]:
    ids = [f"s{index}" for index in range(len(voices))]
    for index, (session_id, voice) in enumerate(zip(ids, voices, strict=True)):
        engine.open(session_id, voice, settings, seed=seed + index)
    return ids


def session_inputs(ids: Sequence[str], blocks: int, block_16k: int, seed: int) -> list[list[BlockRequest]]:
    """requests[k]: step k's requests, one block per session (each session has its own synthetic source)."""
    sources = [source_blocks(blocks, block_16k, seed=seed + 1000 + index) for index in range(len(ids))]
    return [
        [BlockRequest(session_id, source[step]) for session_id, source in zip(ids, sources, strict=True)]
        for step in range(blocks)
    ]


# ---- running ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchArgs:
    model: str | None
    device: str
    threads: int | None
    batches: tuple[int, ...]
    variants: tuple[str, ...]
    warmup: int
    steps: int
    seed: int
    autocast: str
    compile: bool
    json: Path | None


@dataclass
class CompiledDiT:
    """torch.compile around the DiT, with the eager module kept so that a failed compilation falls back to it."""

    model: SeedVC
    eager: DiT | None = None
    error: str | None = None

    @property
    def active(self) -> bool:
        return self.eager is not None

    def enable(self) -> None:
        self.eager = self.model.dit
        # An OptimizedModule forwards attributes to the DiT it wraps; the sampler only calls it.
        self.model.dit = cast(DiT, torch.compile(self.eager))

    def fall_back(self, error: Exception) -> None:
        assert self.eager is not None, "fall_back without enable"
        self.model.dit = self.eager
        self.eager = None
        self.error = first_line(error)


@dataclass
class Autocast:
    """torch.autocast around every step, CUDA only; dropped (keeping the error) if a step fails under it."""

    dtype: torch.dtype | None  # None: off
    error: str | None = None

    @classmethod
    def from_option(cls, option: str, device: torch.device) -> Autocast:
        return cls(AUTOCAST_DTYPES[option] if option != "none" and device.type == "cuda" else None)

    @property
    def active(self) -> bool:
        return self.dtype is not None

    def context(self) -> AbstractContextManager[Any]:
        return nullcontext() if self.dtype is None else torch.autocast("cuda", dtype=self.dtype)

    def fall_back(self, error: Exception) -> None:
        self.dtype = None
        self.error = first_line(error)


def first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


@dataclass(frozen=True)
class TimedStep:
    report: StepReport
    cpu_seconds: float  # process CPU time (all threads) spent during the step


def timed_step(engine: Engine, requests: Sequence[BlockRequest], autocast: Autocast) -> TimedStep:
    synchronize(engine.model.device)
    cpu_start = time.process_time()
    with autocast.context():
        report = engine.step(requests)  # ends with the copy of the output to the host, so the device is done
    return TimedStep(report, time.process_time() - cpu_start)


def step_row(step: TimedStep, batch: int) -> dict[str, float]:
    """One measured step in milliseconds: every stage, the rest (`other`), the whole step and its CPU time."""
    report = step.report
    if report.group_sizes != [batch]:
        raise RuntimeError(f"expected one batched pass of {batch} rows, got groups {report.group_sizes}")
    row = {stage: 1000 * report.stage_seconds[stage] for stage in STAGES}
    row[STEP] = 1000 * report.seconds
    row[OTHER] = row[STEP] - sum(row[stage] for stage in STAGES)
    row[CPU] = 1000 * step.cpu_seconds
    return row


@dataclass
class BatchRun:
    """One batch size's engine, its B open sessions and their pre-made step requests."""

    batch: int
    engine: Engine
    requests: list[list[BlockRequest]]  # requests[k]: step k, one block per session
    done: int = 0

    @classmethod
    def open(cls, model: SeedVC, voices: Sequence[Voice], settings: StreamSettings, args: BenchArgs) -> BatchRun:
        engine = Engine(model)
        ids = open_sessions(engine, voices, settings, args.seed)
        block_16k = engine.session(ids[0]).stream.geometry.block_16k
        return cls(len(ids), engine, session_inputs(ids, args.warmup + args.steps, block_16k, args.seed))

    def step(self, autocast: Autocast) -> TimedStep:
        timed = timed_step(self.engine, self.requests[self.done], autocast)
        self.done += 1  # a failed step is retried with the same blocks
        return timed


def warm_up(run: BatchRun, steps: int, compiled: CompiledDiT, autocast: Autocast) -> None:
    """Unrecorded steps; a step that fails under torch.compile, then under autocast, drops that option and retries."""
    for _ in range(steps):
        while True:
            try:
                run.step(autocast)
                break
            except Exception as error:
                # The failed step already advanced the streams' windows and generators: harmless for timing.
                if compiled.active:
                    compiled.fall_back(error)
                    print(f"  torch.compile failed, continuing eager: {compiled.error}")
                elif autocast.active:
                    autocast.fall_back(error)
                    print(f"  a step failed under autocast, continuing in float32: {autocast.error}")
                else:
                    raise


def measure_variant(
    model: SeedVC,
    pool: VoicePool,
    settings: StreamSettings,
    args: BenchArgs,
    compiled: CompiledDiT,
    autocast: Autocast,
) -> dict[int, list[dict[str, float]]]:
    """Per batch size, the measured steps' rows; the steps are interleaved round-robin across the batch sizes."""
    runs = [BatchRun.open(model, pool.for_batch(batch), settings, args) for batch in args.batches]
    for run in runs:
        warm_up(run, args.warmup, compiled, autocast)
    rows: dict[int, list[dict[str, float]]] = {run.batch: [] for run in runs}
    for _ in range(args.steps):
        for run in runs:
            rows[run.batch].append(step_row(run.step(autocast), run.batch))
    return rows


def draw_seconds(model: SeedVC, voices: Sequence[Voice], geometry: StreamGeometry, seed: int) -> float:
    """Median wall time of one block's CPU random draws for every stream (fresh generators, parity-contract order)."""
    generators = [torch.Generator().manual_seed(seed + index) for index in range(len(voices))]
    samples = []
    for _ in range(DRAW_REPEATS):
        start = time.perf_counter()
        for generator, voice in zip(generators, voices, strict=True):
            draw_block_noise(
                generator,
                n_mels=model.config.mel.n_mels,
                cfm_frames=voice.prompt_frames + geometry.mel_frames,
                harmonic_channels=model.vocoder.config.nb_harmonics + 1,
                vocoder_samples=geometry.vocoder_samples,
            )
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# ---- metrics ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSummary:
    variant: str
    batch: int
    stats: dict[str, Stats]  # per column of COLUMNS and CPU, milliseconds
    block_seconds: float

    @property
    def step_seconds(self) -> float:
        return self.stats[STEP].median_ms / 1000

    @property
    def throughput(self) -> float:
        """Stream-blocks per second."""
        return self.batch / self.step_seconds

    @property
    def per_stream_ms(self) -> float:
        return self.stats[STEP].median_ms / self.batch

    @property
    def capacity(self) -> float:
        """Streams one replica keeps in real time at this batch size."""
        return self.batch * self.block_seconds / self.step_seconds

    def stage_per_stream_ms(self, column: str) -> float:
        return self.stats[column].median_ms / self.batch


def baseline(summaries: Sequence[BatchSummary]) -> BatchSummary:
    """The smallest batch (B = 1 unless --batches leaves it out): what per-stream ratios are relative to."""
    return min(summaries, key=lambda summary: summary.batch)


# ---- reporting ----------------------------------------------------------------------------------------------------


def format_header(meta: Mapping[str, Any]) -> str:
    load_before, load_after = meta["load_average_1min"]
    lines = [
        f"Seed-VC engine throughput | {meta['weights']} | {meta['device']} | {meta['threads']} threads | "
        f"torch {meta['torch']}",
        f"machine: {meta['cpus']} CPUs, 1-min load average {load_before:.1f} before, {load_after:.1f} after the run "
        "(anything above the thread count means contention)",
        f"per (variant, B): fresh engine, warm-up {meta['warmup']} steps, measured {meta['steps']} (medians); "
        f"prompts {PROMPT_RANGE[0]}-{PROMPT_RANGE[1]} s spread over the sessions (2.5 s at B = 1)",
        f"autocast: {meta['autocast_note']}; compile: {meta['compile_note']}",
    ]
    return "\n".join(lines)


def format_table(variant: str, settings: StreamSettings, summaries: Sequence[BatchSummary]) -> str:
    base = baseline(summaries)
    lines = [
        f"[{variant}] {describe_settings(asdict(settings))}; block {1000 * summaries[0].block_seconds:.0f} ms",
        f"{'B':>4}{'step s':>10}{'p90 s':>9}{'blocks/s':>10}{'ms/stream':>11}{f'vs B={base.batch}':>9}"
        f"{'RT streams':>12}{'cpu ms/stream':>15}{f'vs B={base.batch}':>9}",
    ]
    for summary in summaries:
        cpu_ms = summary.stage_per_stream_ms(CPU)
        lines.append(
            f"{summary.batch:>4}{summary.step_seconds:>10.2f}{summary.stats[STEP].p90_ms / 1000:>9.2f}"
            f"{summary.throughput:>10.2f}{summary.per_stream_ms:>11.0f}"
            f"{summary.per_stream_ms / base.per_stream_ms:>9.2f}{summary.capacity:>12.3f}"
            f"{cpu_ms:>15.0f}{cpu_ms / base.stage_per_stream_ms(CPU):>9.2f}"
        )
    return "\n".join(lines)


def format_stage_table(variant: str, summaries: Sequence[BatchSummary]) -> str:
    base = baseline(summaries)
    width = 15
    lines = [
        f"[{variant}] per-stream ms per stage = stage median / B (ratio to B={base.batch})",
        f"{'stage':<17}" + "".join(f"{f'B={summary.batch}':>{width}}" for summary in summaries),
    ]
    for column in COLUMNS:
        cells = []
        for summary in summaries:
            value = summary.stage_per_stream_ms(column)
            reference = base.stage_per_stream_ms(column)
            ratio = f"({value / reference:.2f})" if reference > 0 else "(-)"
            cells.append(f"{f'{value:.1f} {ratio}':>{width}}")
        lines.append(f"{column:<17}" + "".join(cells))
    return "\n".join(lines)


def format_draws(variant: str, draws: float, summary: BatchSummary) -> str:
    step_ms = summary.stats[STEP].median_ms
    share = 100 * 1000 * draws / step_ms
    return (
        f"[{variant}] CPU draws: {1000 * draws:.1f} ms of {step_ms:.0f} ms per step ({share:.1f}%) at B={summary.batch}"
    )


def json_document(
    rows: Sequence[Mapping[str, Any]],
    summaries: Sequence[BatchSummary],
    draws: Mapping[str, float] | None,
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "meta": dict(meta),
        "rows": list(rows),
        "summary": [
            {
                "variant": summary.variant,
                "batch": summary.batch,
                "step_s": summary.step_seconds,
                "blocks_per_s": summary.throughput,
                "per_stream_ms": summary.per_stream_ms,
                "per_stream_ratio": summary.per_stream_ms
                / baseline([s for s in summaries if s.variant == summary.variant]).per_stream_ms,
                "real_time_streams": summary.capacity,
                "columns_ms": {column: asdict(stats) for column, stats in summary.stats.items()},
            }
            for summary in summaries
        ],
        "cpu_draws": draws,
    }


# ---- entry point --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> BenchArgs:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="'hub' or a model bundle dir; default: full-size random weights")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads; default: torch's default")
    parser.add_argument("--batches", type=positive_ints, default=(1, 2, 4, 8, 16), help="comma-separated batch sizes")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--warmup", type=int, default=1, help="steps run per batch size before measuring")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per batch size")
    parser.add_argument("--seed", type=int, default=0, help="random weights, synthetic audio, stream seeds")
    parser.add_argument("--autocast", choices=("none", "fp16", "bf16"), default="none", help="CUDA only")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiT")
    parser.add_argument("--json", type=Path, help="write raw per-step rows and the summary here")
    ns = parser.parse_args(argv)
    variants = tuple(ns.variants.split(","))
    if unknown := [name for name in variants if name not in VARIANTS]:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if ns.steps < 1 or ns.warmup < 0:
        parser.error("--steps must be at least 1, --warmup at least 0")
    return BenchArgs(**{**vars(ns), "variants": variants, "batches": tuple(sorted(set(ns.batches)))})


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_model(args.model, device, args.seed)
    autocast = Autocast.from_option(args.autocast, device)
    if args.autocast != "none" and not autocast.active:
        print(f"note: --autocast {args.autocast} is ignored on {device.type}: the run is float32")
    compiled = CompiledDiT(model)
    if args.compile:
        compiled.enable()
    max_prompt = {VARIANTS[name].max_prompt for name in args.variants}
    assert len(max_prompt) == 1, "variants must agree on max_prompt to share voices"
    pool = VoicePool(model, max_prompt.pop(), args.seed)
    for batch in args.batches:
        pool.for_batch(batch)  # prepared before the clock starts
    rows: list[dict[str, Any]] = []
    summaries: list[BatchSummary] = []
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    for variant in args.variants:
        settings = VARIANTS[variant]
        geometry = StreamGeometry.from_settings(settings, model.sample_rate, model.config.mel.hop_length)
        for batch, measured in measure_variant(model, pool, settings, args, compiled, autocast).items():
            rows += [{"variant": variant, "batch": batch, "step": k, **row} for k, row in enumerate(measured)]
            summary = BatchSummary(variant, batch, summarize(measured, (*COLUMNS, CPU)), geometry.block / geometry.rate)
            summaries.append(summary)
            print(
                f"  {variant} B={batch}: step {summary.step_seconds:.2f} s, {summary.per_stream_ms:.0f} ms/stream "
                f"({time.perf_counter() - started:.0f} s elapsed)",
                flush=True,
            )
    draws = None
    if DRAW_BATCH in args.batches:
        geometry = StreamGeometry.from_settings(
            VARIANTS[args.variants[0]], model.sample_rate, model.config.mel.hop_length
        )
        draws = {"batch": DRAW_BATCH, "seconds": draw_seconds(model, pool.for_batch(DRAW_BATCH), geometry, args.seed)}
    load_after = os.getloadavg()[0]
    if args.compile:
        compile_note = f"failed, ran eager ({compiled.error})" if compiled.error else "DiT compiled"
    else:
        compile_note = "off"
    if args.autocast == "none":
        autocast_note = "off"
    elif autocast.error is not None:
        autocast_note = f"{args.autocast} failed, ran float32 ({autocast.error})"
    elif autocast.active:
        autocast_note = args.autocast
    else:
        autocast_note = f"{args.autocast} ignored on {device.type} (float32)"
    meta = {
        **run_meta(args.model, device, load_before, load_after),
        "torch": torch.__version__,
        "warmup": args.warmup,
        "steps": args.steps,
        "seed": args.seed,
        "batches": list(args.batches),
        "variants": {name: asdict(VARIANTS[name]) for name in args.variants},
        "prompt_frames": {batch: [voice.prompt_frames for voice in pool.for_batch(batch)] for batch in args.batches},
        "autocast_note": autocast_note,
        "compile_note": compile_note,
        "wall_seconds": time.perf_counter() - started,
    }
    report = [format_header(meta)]
    for variant in args.variants:
        own = [summary for summary in summaries if summary.variant == variant]
        report += ["", format_table(variant, VARIANTS[variant], own), "", format_stage_table(variant, own)]
    if draws is not None:
        report.append("")
        for variant in args.variants:
            at_draw_batch = next(s for s in summaries if s.variant == variant and s.batch == DRAW_BATCH)
            report.append(format_draws(variant, draws["seconds"], at_draw_batch))
    print("\n".join(report))
    if args.json is not None:
        write_json(args.json, json_document(rows, summaries, draws, meta), "rows and summary")


if __name__ == "__main__":
    main()
