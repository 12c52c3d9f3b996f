"""The CPU real-time profile: what one block costs at candidate settings, and how far its output is from the README's.

Usage (from the repo root; wrap in `flock /tmp/cpu-bench.lock` on a shared machine):

    # engine-level cost of one stream's block at the profile, the README settings and any candidate (key=value,...)
    .venv/bin/python -m bench.cpu_profile sweep --threads 2 --try block_time=0.3,diffusion_steps=3
    # the profile's output against the README settings' for the same input and stream seed
    .venv/bin/python -m bench.cpu_profile deviation --threads 2 --seconds 8

Both run the full-size model with random weights (bench/full_size.py), or `--model BUNDLE_DIR` / `hub`, in
`--precision` (auto: bf16 on CPUs with bf16 instructions). The profile itself is `CPU_REALTIME_PROFILE` in
app/serving/config.py; whether one stream is served in real time is measured through the service by
`bench.load --local --model full-size --converter model --streams 1` (README, "CPU real-time profile").

sweep: one session on the serving engine (app/engine), fed the looped fixture source block by block as a live
stream; the first `--warmup` steps are not recorded. Per setting: median step and per-stage time, p90 and max step,
and the real-time factor (median step / block time; the service also needs CPU for Opus, resampling and the
WebSocket, ~16 % of a core per stream, so aim well below 1).

deviation: the same input (the fixture source, looped to `--seconds`) streamed through every block with stream seed
0, at the README settings in float32 (the reference) and at: the README settings in the compute precision (what the
precision alone changes), the profile in the compute precision (what serving the profile changes), and the README
settings with stream seed 1 (the diffusion noise alone: the floor of any comparison). Outputs are compared on the
common span after each one's algorithmic delay is taken off: waveform SNR (dB, higher is closer) and the mean L1 of
their log-mels (computed from the whole output, as block mels have different lengths at different block times), with
app/streaming/deviation.py's snr_db and mel_l1. With random weights the outputs are noise-like, so the figures say how
much the computation changes, not how it sounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from app.audio.files import Audio, read_audio, resample
from app.engine.engine import BlockRequest, Engine
from app.model.precision import Precision
from app.model.seedvc import SeedVC
from app.serving.config import CPU_REALTIME_PROFILE
from app.streaming.deviation import mel_l1, snr_db
from app.streaming.settings import CONTENT_RATE, SettingsError, StreamGeometry, StreamSettings
from app.streaming.voice import prepare_voice
from bench.common import write_json
from bench.fixtures import PARITY_A_REFERENCE, PARITY_A_SOURCE
from bench.full_size import write_full_size_bundle

README = StreamSettings()


def profile_settings() -> StreamSettings:
    return CPU_REALTIME_PROFILE.apply(README)


def parse_candidate(text: str) -> StreamSettings:
    """`key=value,...` over the README settings (StreamSettings field names)."""
    fields = {field.name: field.type for field in dataclasses.fields(StreamSettings)}
    values: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown setting {key!r}; known: {', '.join(fields)}")
        values[key] = int(value) if fields[key] in (int, "int") else float(value)
    return dataclasses.replace(README, **values)


def describe(settings: StreamSettings) -> str:
    """The settings that differ from the README's, as key=value (or 'README settings')."""
    changed = [
        f"{field.name}={getattr(settings, field.name)}"
        for field in dataclasses.fields(StreamSettings)
        if getattr(settings, field.name) != getattr(README, field.name)
    ]
    return ",".join(changed) or "README settings"


def algorithmic_delay_s(settings: StreamSettings, model: SeedVC) -> float:
    """How late a sample captured at the start of a block comes out, before compute: the block, then the output's
    lag behind the input (lookahead, crossfade, SOLA search)."""
    geometry = StreamGeometry.from_settings(settings, model.sample_rate, model.config.mel.hop_length)
    return (geometry.block + geometry.delay) / model.sample_rate


@contextmanager
def model_source(model: str | None, seed: int) -> Iterator[str]:
    """The model to load: a bundle or `hub` as given, else the full-size random model written to a temporary bundle."""
    if model is not None:
        yield model
        return
    with tempfile.TemporaryDirectory(prefix="cpu-profile-") as directory:
        print("writing the full-size random-weight model as a bundle (~0.85 GB, temporary) ...", file=sys.stderr)
        yield str(write_full_size_bundle(Path(directory) / "model", seed))


def source_16k(seconds: float) -> Tensor:
    audio = read_audio(PARITY_A_SOURCE)
    samples = resample(torch.from_numpy(audio.samples), audio.rate, CONTENT_RATE)
    repeats = -(-int(seconds * CONTENT_RATE) // samples.numel())
    return samples.repeat(repeats)[: int(seconds * CONTENT_RATE)]


def blocks_of(samples: Tensor, block_16k: int, count: int) -> list[Tensor]:
    """`count` consecutive blocks of `samples`, looped; the last one zero-padded."""
    total = count * block_16k
    looped = samples.repeat(-(-total // samples.numel()))[:total]
    return [looped[i * block_16k : (i + 1) * block_16k].clone() for i in range(count)]


def reference_audio() -> Audio:
    return read_audio(PARITY_A_REFERENCE)


# ---- sweep --------------------------------------------------------------------------------------------------------


def measure(model: SeedVC, settings: StreamSettings, blocks: int, warmup: int) -> dict[str, Any]:
    """One stream on the engine: per-step wall time and per-stage times, after `warmup` unrecorded steps."""
    engine = Engine(model)
    voice = prepare_voice(model, reference_audio(), settings.max_prompt)
    session = engine.open("sweep", voice, settings, seed=0)
    inputs = blocks_of(source_16k(10.0), session.stream.geometry.block_16k, warmup + blocks)
    steps, stages = [], []
    for index, block in enumerate(inputs):
        report = engine.step([BlockRequest("sweep", block)])
        if index >= warmup:
            steps.append(report.seconds)
            stages.append(report.stage_seconds)
    step = statistics.median(steps)
    return {
        "settings": dataclasses.asdict(settings),
        "changed": describe(settings),
        "step_ms": {
            "median": 1000 * step,
            "p90": 1000 * float(np.percentile(steps, 90)),
            "max": 1000 * max(steps),
        },
        "stage_ms": {stage: 1000 * statistics.median(s[stage] for s in stages) for stage in stages[0]},
        "real_time_factor": step / settings.block_time,
        "algorithmic_delay_ms": 1000 * algorithmic_delay_s(settings, model),
    }


def format_sweep(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'settings (changed from README)':<72}{'step ms':>9}{'p90':>7}{'max':>7}{'RTF':>6}  stages ms"]
    for row in rows:
        stages = " ".join(f"{name[:4]} {ms:.0f}" for name, ms in row["stage_ms"].items())
        step = row["step_ms"]
        lines.append(
            f"{row['changed']:<72}{step['median']:>9.0f}{step['p90']:>7.0f}{step['max']:>7.0f}"
            f"{row['real_time_factor']:>6.2f}  {stages}"
        )
    return "\n".join(lines)


# ---- deviation ----------------------------------------------------------------------------------------------------


def stream_output(model: SeedVC, settings: StreamSettings, seed: int, samples: Tensor) -> Tensor:
    """Every block of `samples` through one stream, then the blocks that flush the lookahead; the output with its
    algorithmic delay taken off, so that sample n answers input sample n (at the model rate)."""
    engine = Engine(model)
    voice = prepare_voice(model, reference_audio(), settings.max_prompt)
    session = engine.open("deviation", voice, settings, seed=seed)
    geometry = session.stream.geometry
    count = -(-samples.numel() // geometry.block_16k) + geometry.flush_blocks
    padded = torch.nn.functional.pad(samples, (0, count * geometry.block_16k - samples.numel()))
    output = [
        engine.step([BlockRequest("deviation", block)]).results[0].audio for block in padded.split(geometry.block_16k)
    ]
    length = samples.numel() * model.sample_rate // CONTENT_RATE
    return torch.cat(output)[geometry.delay : geometry.delay + length]


def compare(model: SeedVC, reference: Tensor, actual: Tensor) -> dict[str, float]:
    length = min(reference.numel(), actual.numel())
    reference, actual = reference[:length], actual[:length]
    with torch.no_grad():
        mels = model.mel(torch.stack([reference, actual]).to(model.device)).float().cpu()
    return {"snr_db": snr_db(reference, actual), "mel_l1": mel_l1(mels[0], mels[1])}


def deviation(source: str, precision: Precision | str, seconds: float) -> dict[str, Any]:
    samples = source_16k(seconds)
    exact = SeedVC.load(source, "cpu", Precision.FP32)
    reference = stream_output(exact, README, 0, samples)
    other_seed = stream_output(exact, README, 1, samples)
    delay = {"readme": algorithmic_delay_s(README, exact), "profile": algorithmic_delay_s(profile_settings(), exact)}
    del exact
    fast = SeedVC.load(source, "cpu", precision)
    rows = {
        "README settings, stream seed 1 (noise floor)": compare(fast, reference, other_seed),
        f"README settings in {fast.precision}": compare(fast, reference, stream_output(fast, README, 0, samples)),
        f"profile in {fast.precision}": compare(fast, reference, stream_output(fast, profile_settings(), 0, samples)),
    }
    return {
        "reference": "README settings in fp32, stream seed 0",
        "seconds": seconds,
        "profile": describe(profile_settings()),
        "rows": rows,
        "algorithmic_delay_ms": {name: 1000 * value for name, value in delay.items()},
    }


def format_deviation(result: dict[str, Any]) -> str:
    lines = [
        f"against {result['reference']}, {result['seconds']:.0f} s of the fixture source; profile: {result['profile']}",
        f"{'':<48}{'SNR dB':>8}{'mel L1':>9}",
    ]
    for name, row in result["rows"].items():
        lines.append(f"{name:<48}{row['snr_db']:>8.1f}{row['mel_l1']:>9.3f}")
    delay = result["algorithmic_delay_ms"]
    lines.append(
        f"algorithmic delay (block + lookahead + crossfade + search): README {delay['readme']:.0f} ms, profile "
        f"{delay['profile']:.0f} ms (+{delay['profile'] - delay['readme']:.0f} ms)"
    )
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cpu_profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=("sweep", "deviation"))
    parser.add_argument("--model", help="'hub' or a model bundle dir; default: full-size random weights")
    parser.add_argument("--precision", default="auto", choices=[p.value for p in Precision])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads; default: torch's default")
    parser.add_argument("--seed", type=int, default=0, help="random weights")
    parser.add_argument("--try", dest="candidates", action="append", default=[], help="sweep: key=value,... (repeat)")
    parser.add_argument("--blocks", type=int, default=12, help="sweep: measured blocks per setting")
    parser.add_argument("--warmup", type=int, default=3, help="sweep: unrecorded blocks per setting")
    parser.add_argument("--seconds", type=float, default=8.0, help="deviation: seconds of input")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with model_source(args.model, args.seed) as source:
        if args.mode == "sweep":
            model = SeedVC.load(source, "cpu", args.precision)
            candidates = [README, profile_settings(), *(parse_candidate(text) for text in args.candidates)]
            rows = []
            for settings in candidates:
                try:
                    rows.append(measure(model, settings, args.blocks, args.warmup))
                except SettingsError as error:
                    print(f"{describe(settings)}: not streamable: {error}", flush=True)
                    continue
                print(format_sweep(rows[-1:]), flush=True)
            result: dict[str, Any] = {"precision": str(model.precision), "threads": torch.get_num_threads()}
            result["rows"] = rows
            print(f"\n{model.precision}, {torch.get_num_threads()} threads\n{format_sweep(rows)}")
        else:
            result = deviation(source, args.precision, args.seconds)
            print(format_deviation(result))
    if args.json is not None:
        write_json(args.json, result, "result")
    return result


if __name__ == "__main__":
    main()
