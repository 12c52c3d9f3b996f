"""File-to-file voice conversion through the streaming algorithm, block by block, exactly as a live stream runs.

Usage:
    python -m app.convert SOURCE REFERENCE OUTPUT [--model hub|BUNDLE_DIR] [--seed 0] [--device auto] [--pitch 0]
        [--silence-threshold DBFS [--hangover S]] [--input-gain DB] [--output-gain DB] [--rms-mix-rate R]
        [--noise-suppression]
    python -m app.convert --manifest JOBS.jsonl [settings flags as defaults for every job]

OUTPUT holds what a live listener would hear: output block k answers input block k (no delay compensation),
followed by the blocks that flush the lookahead. WAV output is 32-bit float at the model rate (22.05 kHz) unless
--output-rate says otherwise.

A manifest has one JSON object per line: {"source": ..., "reference": ..., "output": ..., "seed": 0} plus any
setting to override for that job (block_time, crossfade_time, ce_context, dit_context, lookahead, diffusion_steps,
cfg_rate, max_prompt) and any stream control but monitor (pitch_shift, silence_threshold_dbfs, silence_hangover_s,
input_gain_db, output_gain_db, rms_mix_rate, noise_suppression; the flags below give every job's default). Relative
paths are relative to the manifest's folder. All jobs run as concurrent streams of one model: jobs with equal block
settings are batched together, block by block.

The stream controls (app/serving/controls.py) work as they do on a live stream, with the service's code and the
protocol's ranges: --input-gain and --noise-suppression (RNNoise at 48 kHz, 20 ms later) change the input before it
is cut into blocks; --silence-threshold skips the model for silent blocks (no gate unless given), --hangover keeps
converting that long after the input was last above it; each converted block is then pitch shifted (--pitch, its
formants kept, 46 ms later), matched in loudness (--rms-mix-rate) and given --output-gain. Every control is neutral
unless given: without them the output is bitwise what it was before they existed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from app.audio.denoise import NoiseControl
from app.audio.files import Audio, AudioError, read_audio, resample, write_audio
from app.audio.opus import SAMPLE_RATE
from app.audio.pitch_shift import PitchControl
from app.cli_controls import CONTROL_FLAGS, ControlError, add_control_flags, check_controls, given_controls
from app.engine.engine import BlockRequest, Engine
from app.engine.silence import SilenceGate
from app.model.config import ConfigError
from app.model.precision import Precision
from app.model.seedvc import SeedVC
from app.model.sources import HUB, ModelLoadError
from app.serving.controls import Loudness, StreamControls, apply_input_gain
from app.streaming.settings import CONTENT_RATE, SettingsError, StreamGeometry, StreamSettings
from app.streaming.voice import VoiceCache

SETTING_FLAGS = {
    "block_time": ("--block-time", float, "seconds per block"),
    "crossfade_time": ("--crossfade", float, "crossfade between blocks, seconds"),
    "ce_context": ("--ce-context", float, "content-encoder left context, seconds"),
    "dit_context": ("--dit-context", float, "DiT left context, seconds (at most --ce-context)"),
    "lookahead": ("--lookahead", float, "right context, seconds (adds latency)"),
    "diffusion_steps": ("--steps", int, "diffusion steps per block"),
    "cfg_rate": ("--cfg-rate", float, "classifier-free guidance rate (0 = off)"),
    "max_prompt": ("--max-prompt", float, "seconds of the reference used as the voice prompt"),
}

NEUTRAL_CONTROLS = StreamControls()
# The stream controls a file job takes: all but monitor, which hears the input itself (a file has it already).
NOT_FOR_FILES = frozenset({"monitor"})
FILE_CONTROLS = frozenset(control.field for control in CONTROL_FLAGS) - NOT_FOR_FILES


class JobError(ValueError):
    """A manifest line or job that cannot be run; the message names the line."""


@dataclass(frozen=True)
class Job:
    source: Path
    reference: Path
    output: Path
    seed: int
    settings: StreamSettings
    controls: StreamControls = NEUTRAL_CONTROLS  # the service's stream controls, applied as a stream applies them


@dataclass
class RunningJob:
    job: Job
    session_id: str
    blocks: list[torch.Tensor]  # input blocks at 16 kHz, padded, plus the flush blocks
    outputs: list[torch.Tensor]
    pitch: PitchControl
    loudness: Loudness = field(default_factory=Loudness)

    def add(self, audio: torch.Tensor) -> None:
        """The engine's output block, through the output controls in LiveSession's order (neutral: as it was)."""
        controls = self.job.controls
        answered = self.blocks[len(self.outputs)].numpy()  # the input block this output block answers
        shaped = self.loudness.apply(controls, self.pitch.apply(controls.pitch_shift, audio.numpy()), answered)
        self.outputs.append(torch.from_numpy(shaped))

    @property
    def done(self) -> bool:
        return len(self.outputs) == len(self.blocks)


def input_blocks(source: Audio, geometry: StreamGeometry, controls: StreamControls) -> list[torch.Tensor]:
    """The source at 16 kHz cut into blocks (the last one zero-padded), then silent blocks that flush the lookahead;
    the input gain and noise suppression first, as the service's ingress applies them."""
    samples, rate = torch.from_numpy(apply_input_gain(controls, source.samples)), source.rate
    if controls.noise_suppression:
        # RNNoise runs at 48 kHz, where the service's ingress runs it; what its delay line holds comes out at the end.
        noise = NoiseControl()
        at_48k = resample(samples, rate, SAMPLE_RATE).numpy()
        samples, rate = torch.from_numpy(np.concatenate([noise.apply(True, at_48k), noise.flush()])), SAMPLE_RATE
    samples = resample(samples, rate, CONTENT_RATE)
    size = geometry.block_16k
    count = -(-len(samples) // size) + geometry.flush_blocks
    padded = torch.zeros(count * size)
    padded[: len(samples)] = samples
    return list(padded.split(size))


def finish_job(running: RunningJob, model_rate: int, output_rate: int) -> None:
    audio = resample(torch.cat(running.outputs), model_rate, output_rate)
    running.job.output.parent.mkdir(parents=True, exist_ok=True)
    write_audio(running.job.output, audio.numpy(), output_rate)


def run_jobs(model: SeedVC, jobs: Sequence[Job], output_rate: int, progress: bool = True) -> None:
    """Run every job as a session of one engine; sessions that share block settings advance in one batched pass."""
    voices = VoiceCache(model)
    engine = Engine(model)
    running = []
    for number, job in enumerate(jobs):
        voice = voices.get(read_audio(job.reference), job.settings.max_prompt)
        session = engine.open(str(number), voice, job.settings, job.seed, gate=silence_gate(job.controls))
        blocks = input_blocks(read_audio(job.source), session.stream.geometry, job.controls)
        pitch = PitchControl(model.sample_rate)
        running.append(RunningJob(job=job, session_id=str(number), blocks=blocks, outputs=[], pitch=pitch))
    by_id = {r.session_id: r for r in running}
    with tqdm(total=sum(len(r.blocks) for r in running), unit="block", disable=not progress) as bar:
        while active := [r for r in running if not r.done]:
            report = engine.step([BlockRequest(r.session_id, r.blocks[len(r.outputs)]) for r in active])
            for result in report.results:
                finished = by_id[result.session_id]
                finished.add(result.audio)
                if finished.done:
                    finish_job(finished, model.sample_rate, output_rate)
                    engine.close(finished.session_id)
            bar.update(len(report.results))


def silence_gate(controls: StreamControls) -> SilenceGate | None:
    """Files have no configured gate (the service's converter has one): none unless a threshold is given."""
    if controls.silence_threshold_dbfs is None:
        return None
    return SilenceGate(controls.silence_threshold_dbfs, controls.silence_hangover_s)


def job_controls(defaults: StreamControls, changes: dict[str, Any], where: str) -> StreamControls:
    """The defaults with a job's changes, already checked against the protocol (`check_controls`)."""
    controls = replace(defaults, **changes)
    if controls.silence_hangover_s and controls.silence_threshold_dbfs is None:
        raise JobError(f"{where}: a hangover needs a silence threshold (files are converted without a gate otherwise)")
    return controls


def read_manifest(
    path: Path, defaults: StreamSettings, default_seed: int, default_controls: StreamControls = NEUTRAL_CONTROLS
) -> list[Job]:
    base = path.parent
    known_settings = {f.name for f in fields(StreamSettings)}
    jobs = []
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise JobError(f"cannot read the manifest {path}: {error}") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise JobError(f"{where}: not valid JSON ({error.msg})") from error
        if not isinstance(entry, dict):
            raise JobError(f"{where}: each line must be a JSON object")
        unknown = set(entry) - {"source", "reference", "output", "seed"} - known_settings - FILE_CONTROLS
        if unknown:
            raise JobError(f"{where}: unknown keys {sorted(unknown)}")
        missing = {"source", "reference", "output"} - set(entry)
        if missing:
            raise JobError(f"{where}: missing {sorted(missing)}")
        try:
            settings = replace(defaults, **{key: entry[key] for key in known_settings & set(entry)})
        except SettingsError as error:
            raise JobError(f"{where}: {error}") from error
        try:
            changes = check_controls({key: entry[key] for key in FILE_CONTROLS & set(entry)}, lambda key: key)
        except ControlError as error:
            raise JobError(f"{where}: {error}") from error
        jobs.append(
            Job(
                source=base / entry["source"],
                reference=base / entry["reference"],
                output=base / entry["output"],
                seed=int(entry.get("seed", default_seed)),
                settings=settings,
                controls=job_controls(default_controls, changes, where),
            )
        )
    if not jobs:
        raise JobError(f"{path} holds no jobs")
    outputs = [job.output.resolve() for job in jobs]
    if len(set(outputs)) != len(outputs):
        raise JobError(f"{path}: two jobs write the same output file")
    return jobs


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m app.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", nargs="?", type=Path, help="audio to convert (any common format and rate)")
    parser.add_argument("reference", nargs="?", type=Path, help="reference voice (at least 1 s)")
    parser.add_argument("output", nargs="?", type=Path, help="where to write the converted audio")
    parser.add_argument("--manifest", type=Path, help="JSON lines of jobs to run as concurrent streams")
    defaults = StreamSettings()
    for name, (flag, kind, text) in SETTING_FLAGS.items():
        parser.add_argument(flag, dest=name, type=kind, default=getattr(defaults, name), help=f"{text} (%(default)s)")
    parser.add_argument("--model", default=HUB, help="'hub' (official files, cached) or a model bundle directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stream's random generator (%(default)s)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--precision",
        default=Precision.AUTO.value,
        choices=[p.value for p in Precision],
        help="compute precision: auto (bf16 where fast), fp32 (exact, as upstream), bf16, fp16 (%(default)s)",
    )
    parser.add_argument("--output-rate", type=int, help="resample the output to this rate (default: model rate)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_control_flags(parser, without=NOT_FOR_FILES)
    args = parser.parse_args(argv)
    single = [args.source, args.reference, args.output]
    if args.manifest is None and None in single:
        parser.error("give SOURCE REFERENCE OUTPUT, or --manifest JOBS.jsonl")
    if args.manifest is not None and any(single):
        parser.error("--manifest replaces SOURCE REFERENCE OUTPUT; give one or the other")
    if args.output_rate is not None and not 8000 <= args.output_rate <= 192000:
        parser.error("--output-rate must be between 8000 and 192000")
    return args


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {name}: CUDA is not available on this machine")
    return device


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = StreamSettings(**{name: getattr(args, name) for name in SETTING_FLAGS})
        controls = job_controls(NEUTRAL_CONTROLS, given_controls(args), "--hangover")
        if args.manifest is not None:
            jobs = read_manifest(args.manifest, settings, args.seed, controls)
        else:
            jobs = [Job(args.source, args.reference, args.output, args.seed, settings, controls)]
        model = SeedVC.load(args.model, choose_device(args.device), args.precision)
        run_jobs(model, jobs, args.output_rate or model.sample_rate, progress=not args.quiet)
    except (SettingsError, JobError, ControlError, AudioError, ConfigError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
