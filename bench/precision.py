"""fp32 against bf16 in one run: per-stage and per-block time at B=1, per-stream cost at B = 1, 4, 8, and deviation.

Usage (from the repo root; it takes several minutes on a 2-core CPU, so run it alone):

    flock /tmp/cpu-bench.lock .venv/bin/python -m bench.precision
    .venv/bin/python -m bench.precision --threads 2 --blocks 6 --warmup 2 --batches 1,4,8 --json /tmp/precision.json

Both models are the full-size real-time model built from the same seed (bench/full_size.py: random weights, real
shapes, so the real cost); one stays fp32, the other gets `set_precision("bf16")`. Settings are StreamSettings'
defaults (the README's real-time settings). Voices, sources, warm-up and timing are bench/stages.py's: a 4 s synthetic
reference prepared by each model, synthetic 16 kHz source blocks, `--warmup` blocks run and not recorded, then
`--blocks` measured blocks, each timed by convert_block's stage clock (`total` = sum of stages) and as the whole
step_streams call (`step`); fp32 and bf16 take turns block by block. Per block = the step median; per stream = step
median / B. The p90 and max columns of `--json` show whether other work on the machine got in the way.

Deviation: the first stream's input of the B=1 run (all warm-up and measured blocks, from a fresh stream with the
same seed) goes once more through each model, untimed (app/streaming/deviation.py: stream_blocks). Printed: the
waveform SNR of bf16's whole output stream against fp32's, the mean L1 of the per-block CFM mels, the largest shift
of the f0 the vocoder reads from them, and the share of voiced frames (f0 above the NSF threshold; the NSF source
turns an f0 shift into a phase drift only where it is voiced). Random weights are not trained weights: the deviation
on the real checkpoints may differ.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from app.audio.files import Audio
from app.model.precision import DeviceCapabilities, Precision, resolve
from app.model.seedvc import SeedVC
from app.streaming.deviation import Deviation, predicted_f0, stream_blocks
from app.streaming.settings import StreamGeometry, StreamSettings
from app.streaming.stream import Stream
from app.streaming.voice import Voice, prepare_voice
from bench.common import positive_ints, write_json
from bench.full_size import build_full_size
from bench.stages import (
    REFERENCE_SECONDS,
    STAGES,
    STEP,
    TOTAL,
    Stats,
    describe_settings,
    run_blocks,
    run_meta,
    source_blocks,
    summarize,
    voiced_signal,
)

PRECISIONS = (Precision.FP32, Precision.BF16)
# Issue 10's goals for the fast mode.
GOAL_SPEEDUP_B1 = 0.33  # fast per-block time at B=1 at most this fraction of fp32's (>= 3x)
GOAL_PER_STREAM_B8 = 0.66  # per-stream cost at B=8 at most this fraction of B=1's


@dataclass(frozen=True)
class PrecisionArgs:
    threads: int
    blocks: int
    warmup: int
    batches: tuple[int, ...]
    seed: int
    json: Path | None


def parse_args(argv: Sequence[str] | None = None) -> PrecisionArgs:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--blocks", type=int, default=6, help="measured blocks per batch size and precision")
    parser.add_argument("--warmup", type=int, default=2, help="blocks run before measuring, not recorded")
    parser.add_argument("--batches", type=positive_ints, default=(1, 4, 8), help="batch sizes, e.g. 1,4,8")
    parser.add_argument("--seed", type=int, default=0, help="random weights, synthetic audio, stream noise")
    parser.add_argument("--json", type=Path, help="write the summaries, ratios and deviation here")
    ns = parser.parse_args(argv)
    if ns.blocks < 1 or ns.warmup < 0 or ns.threads < 1:
        parser.error("--blocks and --threads must be at least 1, --warmup at least 0")
    return PrecisionArgs(**vars(ns))


def build(precision: Precision, seed: int) -> SeedVC:
    model = build_full_size(seed)
    model.set_precision(precision)
    return model


def time_batch(
    models: Mapping[Precision, SeedVC],
    voices: Mapping[Precision, Voice],
    settings: StreamSettings,
    batch: int,
    args: PrecisionArgs,
) -> dict[Precision, list[dict[str, float]]]:
    """bench.stages' measurement of `batch` streams per precision, one row per measured block and precision.

    The precisions take turns block by block (fp32 block k, bf16 block k, fp32 block k+1, ...), so that other work on
    the machine, when there is some, slows both alike instead of whichever ran at the time.
    """
    streams = {
        precision: [Stream(model, voices[precision], settings, seed=args.seed + index) for index in range(batch)]
        for precision, model in models.items()
    }
    size = streams[Precision.FP32][0].geometry.block_16k
    inputs = [source_blocks(args.warmup + args.blocks, size, seed=args.seed + 1000 + s) for s in range(batch)]
    for precision, model in models.items():
        run_blocks(model, streams[precision], [blocks[: args.warmup] for blocks in inputs])
    rows: dict[Precision, list[dict[str, float]]] = {precision: [] for precision in models}
    for k in range(args.warmup, args.warmup + args.blocks):
        for precision, model in models.items():
            rows[precision] += run_blocks(model, streams[precision], [blocks[k : k + 1] for blocks in inputs])
    return rows


# ---- reporting ----------------------------------------------------------------------------------------------------


def met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def format_report(
    summaries: Mapping[Precision, Mapping[int, Mapping[str, Stats]]],
    deviation: Deviation,
    voiced: float,
    meta: Mapping[str, Any],
    geometry: StreamGeometry,
) -> str:
    fp32, bf16 = summaries[Precision.FP32], summaries[Precision.BF16]
    batches = sorted(fp32)
    block_ms = 1000 * geometry.block / geometry.rate
    lines = [
        f"Seed-VC precision: fp32 vs bf16 | {meta['weights']} | {meta['device']} | {meta['threads']} threads | "
        f"torch {meta['torch']}",
        f"machine: {meta['cpus']} CPUs, 1-min load average {meta['load_average_1min'][0]:.1f} before, "
        f"{meta['load_average_1min'][1]:.1f} after; auto here = {meta['auto']}",
        f"settings: {describe_settings(meta['settings'])}; block {block_ms:.1f} ms",
        f"warm-up {meta['warmup']} blocks, measured {meta['blocks']} per batch size and precision; medians",
    ]
    if 1 in batches:
        lines += [
            "",
            "B=1, per stage (ms per block)",
            f"{'stage':<18}{'fp32':>10}{'bf16':>10}{'bf16/fp32':>11}",
        ]
        for column in (*STAGES, TOTAL, STEP):
            slow, fast = fp32[1][column].median_ms, bf16[1][column].median_ms
            lines.append(f"{column:<18}{slow:>10.1f}{fast:>10.1f}{fast / slow:>11.2f}")
    lines += [
        "",
        "per block (step ms) and per stream (step / B, ms)",
        f"{'B':>3}{'fp32 step':>12}{'bf16 step':>12}{'fp32 /stream':>14}{'bf16 /stream':>14}{'bf16/fp32':>11}"
        f"{'fp32 vs B=1':>13}{'bf16 vs B=1':>13}",
    ]
    for batch in batches:
        slow, fast = fp32[batch][STEP].median_ms, bf16[batch][STEP].median_ms
        row = f"{batch:>3}{slow:>12.0f}{fast:>12.0f}{slow / batch:>14.0f}{fast / batch:>14.0f}"
        row += f"{fast / slow:>11.2f}"
        if 1 in batches:
            row += f"{slow / batch / fp32[1][STEP].median_ms:>13.2f}{fast / batch / bf16[1][STEP].median_ms:>13.2f}"
        lines.append(row)
    lines += ["", "issue 10's goals"]
    if 1 in batches:
        speed = bf16[1][STEP].median_ms / fp32[1][STEP].median_ms
        lines.append(
            f"  bf16 per block at B=1 <= {GOAL_SPEEDUP_B1:.2f}x fp32: {speed:.2f}x ({1 / speed:.2f}x faster) "
            f"-> {met(speed <= GOAL_SPEEDUP_B1)}"
        )
    if 1 in batches and 8 in batches:
        for name, summary in (("bf16", bf16), ("fp32", fp32)):
            per_stream = summary[8][STEP].median_ms / 8 / summary[1][STEP].median_ms
            lines.append(
                f"  {name} per stream at B=8 <= {GOAL_PER_STREAM_B8:.2f}x B=1: {per_stream:.2f}x "
                f"-> {met(per_stream <= GOAL_PER_STREAM_B8)}"
            )
    lines += [
        "",
        f"deviation of bf16 from fp32 ({meta['deviation_blocks']} blocks, same input and stream seed, B=1): "
        f"waveform SNR {deviation.snr_db:.1f} dB, CFM mel L1 {deviation.mel_l1:.2e}, "
        f"max f0 shift {deviation.f0_max_hz:.3f} Hz, voiced frames {100 * voiced:.0f}%",
        "random weights are not trained weights: the deviation on the real checkpoints may differ",
    ]
    return "\n".join(lines)


# ---- entry point --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    settings = StreamSettings()
    models = {precision: build(precision, args.seed) for precision in PRECISIONS}
    fp32_model = models[Precision.FP32]
    geometry = StreamGeometry.from_settings(settings, fp32_model.sample_rate, fp32_model.config.mel.hop_length)
    samples = int(REFERENCE_SECONDS * fp32_model.sample_rate)
    reference = Audio(voiced_signal(samples, fp32_model.sample_rate, (180.0, 240.0), args.seed), fp32_model.sample_rate)
    voices = {precision: prepare_voice(model, reference, settings.max_prompt) for precision, model in models.items()}

    load_before = os.getloadavg()[0]
    rows: dict[Precision, dict[int, list[dict[str, float]]]] = {precision: {} for precision in PRECISIONS}
    for batch in args.batches:
        for precision, batch_rows in time_batch(models, voices, settings, batch, args).items():
            rows[precision][batch] = batch_rows
    load_after = os.getloadavg()[0]
    summaries = {precision: {b: summarize(r) for b, r in by_batch.items()} for precision, by_batch in rows.items()}

    blocks = source_blocks(args.warmup + args.blocks, geometry.block_16k, seed=args.seed + 1000)
    outputs = {
        precision: stream_blocks(model, voices[precision], settings, args.seed, blocks)
        for precision, model in models.items()
    }
    deviation = Deviation.between(fp32_model, outputs[Precision.FP32], outputs[Precision.BF16])
    threshold = fp32_model.vocoder.config.nsf_voiced_threshold
    voiced = float((predicted_f0(fp32_model, outputs[Precision.FP32].mels) > threshold).float().mean())

    meta = {
        **run_meta(None, device, load_before, load_after),
        "torch": torch.__version__,
        "auto": str(resolve(Precision.AUTO, DeviceCapabilities.of(device)).precision),
        "settings": asdict(settings),
        "warmup": args.warmup,
        "blocks": args.blocks,
        "batches": list(args.batches),
        "seed": args.seed,
        "deviation_blocks": len(blocks),
    }
    print(format_report(summaries, deviation, voiced, meta, geometry))
    if args.json is not None:
        document = {
            "meta": meta,
            "summary": {
                str(precision): {str(b): {c: asdict(s) for c, s in summary.items()} for b, summary in by_batch.items()}
                for precision, by_batch in summaries.items()
            },
            "deviation": {**asdict(deviation), "voiced_fraction": voiced},
        }
        write_json(args.json, document, "summaries and deviation")


if __name__ == "__main__":
    main()
