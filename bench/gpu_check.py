"""The prepared GPU check: one command, a few minutes on one GPU, JSON and a markdown table out.

Usage (from the repo root; `scripts/gpu-check OUTDIR` wraps it, installing the carried wheels first):

    python3 -m bench.gpu_check --out DIR                      # CUDA, full-size random weights, <= --budget-s 290
    python3 -m bench.gpu_check --out DIR --dry-run            # CPU, tiny fixture model, seconds (CI runs this)
    python3 -m bench.gpu_check --out DIR --precisions bf16 --max-batch 64 --steps 100

It runs, in this order, and writes DIR/gpu-check.json (everything) and DIR/gpu-check.md (the tables) after every
phase, so a run cut short still leaves what it measured:

1. Import smoke test: every module the check uses (third-party and app/bench), with versions, the CUDA device's name,
   capability and memory; a missing module fails here, at once, naming it (exit status 2). The device machine has
   no ray, av, pydantic or soundfile: soundfile travels as wheels in `.whl/` (scripts/gpu-check installs them), and
   nothing imported here may pull in the others (the JSON lists any that got loaded; the test checks it is none).
2. Parity on the device in fp32 (TF32 off): the parity fixture's tiny model (tests/fixtures/parity_a) streams every
   block of the fixture's source with the fixture's settings and seed through Stream/step_streams; the streamed
   output, each block's CFM mel, vocoder wave, SOLA scores, offsets (bitwise) and output, and the voice stage are
   compared with the fixture's e2e tolerances, plus the estimator's right-padded rows case (valid region only).
3. Per precision (fp32, bf16, fp16; a fresh full-size random-weight model each, bench/full_size.py):
   per-stage times of one stream (B = 1) as convert_block's StageClock reports them (it synchronises CUDA at each
   lap), median of `--stage-steps` steps after `--warmup`; then a batch sweep through the multi-session Engine at
   StreamSettings() defaults (upstream README's real-time settings: 0.18 s blocks, 10 steps, cfg 0.7): B = 1, 2,
   4, ... sessions sharing one voice with distinct seeds, `--warmup` steps, then `--steps` timed steps per point
   (wall time of Engine.step, CUDA synchronised before and after), p50/p99, per-stream cost, real-time streams
   (B x block / p50) and peak memory per stream ((peak allocated - allocated before the sessions) / B). A sweep
   stops at the first B whose p99 exceeds the block time, at `--max-batch`, on out-of-memory, or when the next
   point would not fit its share of the time budget (reduced precisions run first; fp32 gets what is left, so
   it is the one that stops early when time is short).
4. One torch.profiler pass (CPU + CUDA activities) at the best point: the largest real-time B of the precision
   with the most real-time streams. DIR/profile.txt holds the top-25 kernels by CUDA time and torch's op table.

Time: the whole run keeps within `--budget-s` seconds from its start (default 290), `--reserve-s` of which are
kept for the profiler pass and the writing. `--dry-run` runs every phase on the CPU with the fixture model, 2
diffusion steps, B in {1, 2}, a few steps per point and a one-step profiler pass; parity is the full fixture in
fp32 on one thread, and must pass there too. Exit status: 0 when everything ran and parity passed, 1 when a phase
failed or parity did not pass (the JSON says which), 2 when the smoke test failed.

Only the standard library is imported at the top: the smoke test must be able to say what is missing.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.fixtures import PARITY_A, ROOT  # the standard library only

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from app.model.seedvc import SeedVC
    from app.streaming.settings import StreamSettings
    from app.streaming.voice import Voice

PRECISIONS = ("fp32", "bf16", "fp16")

THIRD_PARTY = ("numpy", "torch", "torchaudio", "transformers", "huggingface_hub", "safetensors", "yaml", "soundfile")
PROJECT_MODULES = (
    "app.audio.files",
    "app.model.precision",
    "app.model.seedvc",
    "app.streaming.settings",
    "app.streaming.stream",
    "app.streaming.voice",
    "app.engine.engine",
    "bench.common",
    "bench.full_size",
    "bench.stages",
)
# Not on the device machine (or the serving stack, which the check has no business loading).
FORBIDDEN_MODULES = ("ray", "av", "pydantic", "fastapi", "starlette", "uvicorn", "aiortc", "websockets")

STAGES = ("content_encoder", "length_regulator", "cfm", "vocoder", "sola")


REALTIME_HEADROOM = 0.9  # "streams per GPU": the largest B whose p99 stays under this share of the block time


# ---- options --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    out: Path
    device: str
    dry_run: bool
    budget_s: float
    reserve_s: float
    precisions: tuple[str, ...]
    model: str | None  # None: full-size random weights (dry run: the fixture model)
    diffusion_steps: int | None  # None: StreamSettings' default
    max_batch: int
    steps: int  # timed steps per sweep point
    warmup: int
    stage_steps: int
    profile_steps: int
    seed: int


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (created)")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda; the dry run uses cpu)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny fixture model, tiny sizes: every code path")
    parser.add_argument("--budget-s", type=float, default=290.0, help="the whole run's time limit in seconds")
    parser.add_argument("--reserve-s", type=float, default=30.0, help="of the budget, kept for profiler + writing")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated, of fp32,bf16,fp16")
    parser.add_argument("--model", help="a model bundle dir to time instead of the full-size random weights")
    parser.add_argument("--diffusion-steps", type=int, help="override StreamSettings' 10 diffusion steps")
    parser.add_argument("--max-batch", type=int, help="largest B of a sweep (default 1024; dry run 2)")
    parser.add_argument("--steps", type=int, help="timed steps per sweep point (default 50; dry run 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps before each measurement (default 3; dry run 1)")
    parser.add_argument("--stage-steps", type=int, help="timed B=1 steps for the stage table (default 20; dry 3)")
    parser.add_argument("--profile-steps", type=int, help="profiled steps (default 5; dry run 1)")
    parser.add_argument("--seed", type=int, default=0, help="random weights, synthetic audio, stream seeds")
    ns = parser.parse_args(argv)
    precisions = tuple(p.strip() for p in ns.precisions.split(",") if p.strip())
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown or not precisions:
        parser.error(f"--precisions takes some of {','.join(PRECISIONS)}, got {ns.precisions!r}")
    dry = ns.dry_run

    def pick(value: int | None, full: int, dry_value: int) -> int:
        return value if value is not None else (dry_value if dry else full)

    options = Options(
        out=ns.out,
        device="cpu" if dry else ns.device,
        dry_run=dry,
        budget_s=ns.budget_s,
        reserve_s=ns.reserve_s,
        precisions=precisions,
        model=ns.model if ns.model is not None else (str(PARITY_A / "model") if dry else None),
        diffusion_steps=ns.diffusion_steps if ns.diffusion_steps is not None else (2 if dry else None),
        max_batch=pick(ns.max_batch, 1024, 2),
        steps=pick(ns.steps, 50, 3),
        warmup=pick(ns.warmup, 3, 1),
        stage_steps=pick(ns.stage_steps, 20, 3),
        profile_steps=pick(ns.profile_steps, 5, 1),
        seed=ns.seed,
    )
    if options.max_batch < 1 or options.steps < 1 or options.warmup < 0 or options.stage_steps < 1:
        parser.error("--max-batch, --steps and --stage-steps must be at least 1, --warmup at least 0")
    if options.profile_steps < 1:
        parser.error("--profile-steps must be at least 1")
    return options


# ---- the clock and the report ---------------------------------------------------------------------------------------


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass
class Budget:
    """The run's time limit, counted from its start."""

    total_s: float
    reserve_s: float
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        """Seconds until the end of the whole budget."""
        return self.total_s - self.elapsed()

    def left_for_measuring(self) -> float:
        """Seconds until the reserve (profiler pass, writing) begins."""
        return self.left() - self.reserve_s


@dataclass
class Report:
    """Everything the check finds; written as JSON (and rendered as markdown) after every phase."""

    options: Options
    budget: Budget
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data.update(
            {
                "schema": 1,
                "started_at": utc_now(),
                "dry_run": self.options.dry_run,
                "budget_s": self.options.budget_s,
                "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.options).items()},
                "phases": [],
                "errors": [],
                "precisions": {},
            }
        )

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times a phase; an exception in it is recorded (with its traceback) and the run goes on."""
        start = self.budget.elapsed()
        print(f"[gpu-check {start:6.1f} s] {name} ...", flush=True)
        entry: dict[str, Any] = {"name": name, "started_s": round(start, 3)}
        self.data["phases"].append(entry)
        try:
            yield
        except Exception as error:  # one failed phase must not lose the others' numbers
            entry["error"] = f"{type(error).__name__}: {error}"
            self.data["errors"].append({"phase": name, "error": entry["error"], "traceback": traceback.format_exc()})
            print(f"[gpu-check] {name} FAILED: {entry['error']}\n{traceback.format_exc()}", flush=True)
        finally:
            entry["seconds"] = round(self.budget.elapsed() - start, 3)
            self.write()

    def write(self) -> None:
        self.data["finished_at"] = utc_now()
        self.data["elapsed_s"] = round(self.budget.elapsed(), 3)
        self.data["passed"] = passed(self.data)
        self.options.out.mkdir(parents=True, exist_ok=True)
        (self.options.out / "gpu-check.json").write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        try:
            markdown = render_markdown(self.data)
        except Exception as error:  # the JSON is what counts: a rendering bug must not end the run
            markdown = f"# GPU check\n\nthe markdown could not be rendered: {type(error).__name__}: {error}\n"
            if not any(e["phase"] == "markdown" for e in self.data["errors"]):
                self.data["errors"].append({"phase": "markdown", "error": markdown.splitlines()[-1]})
                self.data["passed"] = False
                (self.options.out / "gpu-check.json").write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        (self.options.out / "gpu-check.md").write_text(markdown)


def passed(data: Mapping[str, Any]) -> bool:
    smoke_ok = bool(data.get("smoke", {}).get("ok"))
    parity_ok = bool(data.get("parity", {}).get("passed"))
    return smoke_ok and parity_ok and not data.get("errors")


# ---- 1. import smoke test -------------------------------------------------------------------------------------------


def smoke_test(device_name: str) -> dict[str, Any]:
    """Import every module the check uses, one by one; say which fail and why. Versions and the device too."""
    modules: dict[str, str] = {}
    failures: dict[str, str] = {}
    for name in (*THIRD_PARTY, *PROJECT_MODULES):
        try:
            module = importlib.import_module(name)
        except Exception as error:  # ImportError, or anything a module raises while loading
            failures[name] = f"{type(error).__name__}: {error}"
            print(f"  import {name:<24} FAILED  {failures[name]}", flush=True)
            continue
        modules[name] = str(getattr(module, "__version__", "ok"))
        print(f"  import {name:<24} {modules[name]}", flush=True)
    result: dict[str, Any] = {"modules": modules, "failures": failures, "python": sys.version.split()[0]}
    if "torch" in modules:
        result["device"] = describe_device(device_name)
        print(f"  device: {json.dumps(result['device'])}", flush=True)
        if result["device"].get("error"):
            failures[device_name] = result["device"]["error"]
    result["forbidden_loaded"] = forbidden_loaded()
    result["ok"] = not failures
    return result


def forbidden_loaded() -> list[str]:
    return sorted(name for name in FORBIDDEN_MODULES if name in sys.modules)


def describe_device(device_name: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "requested": device_name,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads(),
    }
    device = torch.device(device_name)
    if device.type != "cuda":
        return info
    if not torch.cuda.is_available():
        info["error"] = f"{device_name} was asked for, but torch {torch.__version__} sees no CUDA device"
        return info
    index = device.index if device.index is not None else torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    info.update(
        {
            "name": properties.name,
            "capability": list(torch.cuda.get_device_capability(index)),
            "total_memory_gib": round(properties.total_memory / 2**30, 2),
            "multiprocessors": properties.multi_processor_count,
            "cudnn": torch.backends.cudnn.version(),
            "device_count": torch.cuda.device_count(),
        }
    )
    try:  # the device really computes, not just enumerates
        probe = torch.ones(64, 64, device=device)
        info["probe_ok"] = float((probe @ probe).sum().item()) == 64.0**3
    except RuntimeError as error:
        info["error"] = f"a first computation on {device_name} failed: {error}"
    return info


def environment() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain")
    return {
        "python": sys.version,
        "executable": sys.executable,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "pythonpath": os.environ.get("PYTHONPATH"),
    }


# ---- 2. parity on the device in fp32 --------------------------------------------------------------------------------


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, one torch thread, as the fixtures were generated (reduction order); a no-op on CUDA."""
    import torch

    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class Errors:
    """Max abs error per array over all blocks, against the fixture's e2e tolerance."""

    expected: Mapping[str, Any]  # name -> numpy array
    meta: Mapping[str, Any]  # expected_meta.json
    found: dict[str, dict[str, Any]] = field(default_factory=dict)

    def compare(self, name: str, actual: Tensor | Any, index: int | None = None, valid: int | None = None) -> None:
        import numpy as np

        expected = self.expected[name] if index is None else self.expected[name][index]
        actual_np = actual.detach().cpu().numpy() if hasattr(actual, "detach") else np.asarray(actual)
        if actual_np.shape != expected.shape:
            raise AssertionError(f"{name}: shape {actual_np.shape} != expected {expected.shape}")
        if valid is not None:  # the estimator case: the row's valid frames only
            actual_np, expected = actual_np[..., :valid], expected[..., :valid]
        error = float(np.max(np.abs(actual_np.astype(np.float64) - expected.astype(np.float64)), initial=0.0))
        entry = self.found.setdefault(
            name, {"max_error": 0.0, "atol": float(self.meta["arrays"][name]["atol_e2e"]), "worst": None, "count": 0}
        )
        entry["count"] += 1
        if error > entry["max_error"] or entry["worst"] is None:
            entry["max_error"] = max(error, entry["max_error"])
            entry["worst"] = index
        entry["passed"] = entry["max_error"] <= entry["atol"]


def fixture_settings(bundle: Mapping[str, Any]) -> StreamSettings:
    from app.streaming.settings import UPSTREAM_SETTING_NAMES, StreamSettings

    given = bundle["stream_settings"]
    unknown = sorted(set(given) - set(UPSTREAM_SETTING_NAMES))
    if unknown:
        raise ValueError(f"bundle.json stream_settings has keys with no StreamSettings field: {unknown}")
    return StreamSettings(**{ours: given[theirs] for theirs, ours in UPSTREAM_SETTING_NAMES.items()})


def run_parity(root: Path, device_name: str) -> dict[str, Any]:
    """The fixture's whole stream, and the estimator's padded-rows case, in fp32 on the device."""
    import numpy as np
    import torch

    from app.audio.files import read_audio
    from app.model.seedvc import SeedVC
    from app.streaming.stream import Stream, step_streams
    from app.streaming.voice import prepare_voice

    device = torch.device(device_name)
    bundle = json.loads((root / "bundle.json").read_text())
    meta = json.loads((root / "expected_meta.json").read_text())
    with np.load(root / "expected.npz") as npz:
        expected = {name: npz[name] for name in npz.files}
    errors = Errors(expected, meta)
    started = time.perf_counter()
    with one_cpu_thread(device):
        model = SeedVC.load(root / "model", device, "fp32")
        settings = fixture_settings(bundle)
        reference = read_audio(root / bundle["files"]["reference_22k"])
        voice = prepare_voice(model, reference, settings.max_prompt)
        errors.compare("voice_ref_mel", voice.prompt_mel[None])
        errors.compare("voice_prompt_condition", voice.prompt_condition[None])
        errors.compare("voice_style", voice.style[None])

        source = torch.from_numpy(read_audio(root / bundle["files"]["source_16k"]).samples)
        size = bundle["geometry"]["block_frame_16k"]
        count = bundle["n_blocks"]
        if source.shape[0] != count * size:
            raise ValueError(f"the fixture source has {source.shape[0]} samples, not {count} blocks of {size}")
        stream = Stream(model, voice, settings, seed=bundle["stream_seed"])
        outputs = []
        for k in range(count):
            step = step_streams(model, [stream], [source[k * size : (k + 1) * size]])
            if step.batch is None or step.converted != (0,):
                raise AssertionError(f"block {k} was not converted")
            errors.compare("blk_window16k", stream.window, index=k)
            errors.compare("blk_cfm_mel", step.batch.mel, index=k)
            errors.compare("blk_vocoder_wave", step.batch.wave[0], index=k)
            errors.compare("blk_sola_score", step.batch.sola.scores[0], index=k)
            errors.compare("blk_sola_offset", step.batch.sola.offsets[0], index=k)
            errors.compare("blk_output", step.audio[0], index=k)
            outputs.append(step.audio[0])
        errors.compare("output_stream", torch.cat(outputs))
        stream_seconds = time.perf_counter() - started

        # Estimator case (fixture README section 9): right-padded rows with garbage in the padding, key-masked.
        def inputs(name: str) -> Tensor:
            return torch.from_numpy(expected[name].copy()).to(device)

        x_lens = inputs("est_x_lens")
        with torch.inference_mode():
            out = model.dit(
                inputs("est_x"),
                inputs("est_prompt_x"),
                x_lens,
                inputs("est_t"),
                inputs("est_style"),
                inputs("est_cond"),
            )
        for row, length in enumerate(x_lens.tolist()):
            errors.compare("est_out", out[row], index=row, valid=int(length))

    arrays = errors.found
    return {
        "passed": all(entry["passed"] for entry in arrays.values()),
        "device": str(device),
        "precision": str(model.precision),
        "tf32": {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        },
        "blocks": count,
        "stream_seconds": round(stream_seconds, 3),
        "arrays": arrays,
    }


# ---- 3. timing: models, stage times, sweeps -------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def allocated(device: torch.device) -> int | None:
    import torch

    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def timing_template(options: Options) -> SeedVC:
    """The model every precision starts from, on the CPU in fp32: full size with random weights, or a bundle."""
    from app.model.seedvc import SeedVC
    from bench.full_size import build_full_size

    if options.model is None:
        return build_full_size(options.seed)
    return SeedVC.load(options.model, "cpu", "fp32")


def fresh_model(template: SeedVC, device: torch.device, precision: str) -> tuple[SeedVC, dict[str, Any]]:
    """A new copy of the template on the device, converted to `precision` (weights converted once, for good)."""
    release(device)
    before = allocated(device)
    model = copy.deepcopy(template).to(device)
    choice = model.set_precision(precision)
    after = allocated(device)
    info = {
        "precision": str(choice.precision),
        "reason": choice.reason,
        "model_mib": None if before is None or after is None else round((after - before) / 2**20, 1),
    }
    return model, info


def timing_settings(options: Options) -> StreamSettings:
    from app.streaming.settings import StreamSettings

    if options.diffusion_steps is None:
        return StreamSettings()
    return StreamSettings(diffusion_steps=options.diffusion_steps)


def synthetic_voice(model: SeedVC, settings: StreamSettings, seed: int) -> Voice:
    """4 s of a synthetic voice-like reference (bench/stages.py's), prepared by this model in its precision."""
    from app.audio.files import Audio
    from app.streaming.voice import prepare_voice
    from bench.stages import REFERENCE_SECONDS, voiced_signal

    samples = int(REFERENCE_SECONDS * model.sample_rate)
    reference = Audio(voiced_signal(samples, model.sample_rate, (180.0, 240.0), seed), model.sample_rate)
    return prepare_voice(model, reference, settings.max_prompt)


def block_ms(model: SeedVC, settings: StreamSettings) -> float:
    from app.streaming.settings import StreamGeometry

    geometry = StreamGeometry.from_settings(settings, model.sample_rate, model.config.mel.hop_length)
    return 1000 * geometry.block / geometry.rate


def stage_times(
    model: SeedVC, voice: Voice, settings: StreamSettings, sources: Sequence[Tensor], options: Options
) -> dict[str, Any]:
    """One stream: per-stage ms (StageClock, CUDA synchronised per lap) and the whole step, median over the steps."""
    from app.streaming.stream import Stream
    from bench.stages import COLUMNS, run_blocks, summarize

    stream = Stream(model, voice, settings, seed=options.seed)
    run_blocks(model, [stream], [sources[: options.warmup]])
    rows = run_blocks(model, [stream], [sources[options.warmup : options.warmup + options.stage_steps]])
    summary = summarize(rows)
    return {
        "steps": len(rows),
        "warmup": options.warmup,
        "median_ms": {column: round(summary[column].median_ms, 3) for column in COLUMNS},
        "p90_ms": {column: round(summary[column].p90_ms, 3) for column in COLUMNS},
    }


def percentile(values: Sequence[float], q: float) -> float:
    from bench.common import percentile as linear_percentile

    return linear_percentile(values, q)


@dataclass
class SessionRun:
    """B sessions of one Engine, one shared voice, distinct seeds; session i reads source blocks i, i+1, ..."""

    engine: Any  # app.engine.engine.Engine
    ids: list[str]
    sources: Sequence[Tensor]
    warm_up: Any = None  # app.engine.engine.WarmUpReport
    done: int = 0

    @classmethod
    def open(
        cls, model: SeedVC, voice: Voice, settings: StreamSettings, batch: int, sources: Sequence[Tensor], seed: int
    ) -> SessionRun:
        from app.engine.engine import Engine
        from app.engine.plan import ShapeBuckets

        # The converter's engine on a GPU: this B as a static shape, warmed (CUDA graphs captured on CUDA).
        engine = Engine(model, buckets=ShapeBuckets((batch,)))
        warm = engine.warm_up(voice, settings, batch_sizes=(batch,), prompt_frames=(voice.prompt_frames,))
        ids = [f"stream-{index}" for index in range(batch)]
        for index, session_id in enumerate(ids):
            engine.open(session_id, voice, settings, seed=seed + index)
        return cls(engine=engine, ids=ids, sources=sources, warm_up=warm)

    def step(self, device: torch.device) -> tuple[float, Any]:
        """One Engine.step of every session; its wall time with the device synchronised before and after."""
        from app.engine.engine import BlockRequest

        k = self.done
        requests = [BlockRequest(sid, self.sources[k + index]) for index, sid in enumerate(self.ids)]
        synchronize(device)
        start = time.perf_counter()
        report = self.engine.step(requests)
        synchronize(device)
        self.done += 1
        return time.perf_counter() - start, report


def sweep_point(
    model: SeedVC,
    voice: Voice,
    settings: StreamSettings,
    batch: int,
    sources: Sequence[Tensor],
    options: Options,
    budget: Budget,
    block: float,
) -> dict[str, Any]:
    import torch

    device = model.device
    release(device)
    base = allocated(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = SessionRun.open(model, voice, settings, batch, sources, options.seed)
    for _ in range(options.warmup):
        run.step(device)
    walls: list[float] = []
    reported: list[float] = []
    stages: dict[str, list[float]] = {}
    cut_short = False
    for _ in range(options.steps):
        wall, report = run.step(device)
        walls.append(1000 * wall)
        reported.append(1000 * report.seconds)
        for stage, seconds in report.stage_seconds.items():
            stages.setdefault(stage, []).append(1000 * seconds)
        if report.group_sizes != [batch]:
            raise AssertionError(f"B={batch}: the step ran as groups {report.group_sizes}, not one batched pass")
        if budget.left_for_measuring() < 0:  # past the measuring budget: keep what was measured
            cut_short = True
            break
    p50, p99 = percentile(walls, 50), percentile(walls, 99)
    point: dict[str, Any] = {
        "batch": batch,
        "steps": len(walls),
        "warmup": options.warmup,
        "cut_short": cut_short,
        "p50_ms": round(p50, 3),
        "p99_ms": round(p99, 3),
        "mean_ms": round(sum(walls) / len(walls), 3),
        "max_ms": round(max(walls), 3),
        "engine_p50_ms": round(percentile(reported, 50), 3),  # StepReport.seconds
        "per_stream_ms": round(p50 / batch, 3),
        "realtime_streams": round(batch * block / p50, 2),
        "realtime": p99 <= block,
        "stage_p50_ms": {stage: round(percentile(values, 50), 3) for stage, values in stages.items()},
        "step_ms": [round(value, 3) for value in walls],
        "warm_up_s": round(run.warm_up.seconds, 3),
        "graphs": run.warm_up.graphs,
        "graph_failures": list(run.warm_up.failures),
        "eager_passes": run.engine.eager_passes,
    }
    if device.type == "cuda" and base is not None:
        peak = torch.cuda.max_memory_allocated(device)
        point["peak_mib"] = round(peak / 2**20, 1)
        point["memory_per_stream_mib"] = round((peak - base) / 2**20 / batch, 2)
        point["reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    else:
        point["memory_per_stream_mib"] = None
    del run
    return point


def stop_reason(
    point: Mapping[str, Any],
    block: float,
    next_batch: int,
    max_batch: int,
    next_point_s: float,
    time_left_s: float,
    stop_on_block_time: bool = True,
) -> str | None:
    """Why the sweep stops after `point`, or None to go on to `next_batch`."""
    if point.get("cut_short"):
        return "time budget (the point was cut short)"
    if stop_on_block_time and point["p99_ms"] > block:
        return f"p99 {point['p99_ms']:.1f} ms exceeds the {block:.0f} ms block"
    if next_batch > max_batch:
        return f"max batch {max_batch} reached"
    if next_point_s > time_left_s:
        return f"time budget (B={next_batch} would take ~{next_point_s:.0f} s, {max(time_left_s, 0):.0f} s left)"
    return None


def predict_point_s(point: Mapping[str, Any], next_batch: int, options: Options) -> float:
    """Time the next point would take: the step grows at most linearly in B (it is sublinear until compute-bound)."""
    step_s = point["p50_ms"] / 1000 * next_batch / point["batch"]
    return (options.warmup + options.steps) * step_s * 1.1 + 1.0


def sweep(
    model: SeedVC,
    voice: Voice,
    settings: StreamSettings,
    sources: Sequence[Tensor],
    options: Options,
    budget: Budget,
    deadline_s: float,
    on_point: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """B = 1, 2, 4, ... until a stop reason; `deadline_s` is this sweep's share, in budget-elapsed seconds."""
    import torch

    block = block_ms(model, settings)
    points: list[dict[str, Any]] = []
    batch = 1
    reason = None
    while reason is None:
        try:
            point = sweep_point(model, voice, settings, batch, sources, options, budget, block)
        except torch.OutOfMemoryError as error:
            release(model.device)
            reason = f"out of memory at B={batch}: {str(error).splitlines()[0]}"
            break
        points.append(point)
        on_point(point)
        print(
            f"    B={batch:<5} p50 {point['p50_ms']:8.2f} ms  p99 {point['p99_ms']:8.2f} ms  "
            f"per stream {point['per_stream_ms']:7.3f} ms  mem/stream {point['memory_per_stream_mib']} MiB",
            flush=True,
        )
        next_batch = 2 * batch
        reason = stop_reason(
            point,
            block,
            next_batch,
            options.max_batch,
            predict_point_s(point, next_batch, options),
            deadline_s - budget.elapsed(),
            stop_on_block_time=not options.dry_run,
        )
        batch = next_batch
    return {"points": points, "stopped": reason, "block_ms": block, **capacity(points, block)}


def capacity(points: Sequence[Mapping[str, Any]], block: float) -> dict[str, Any]:
    """The largest B in real time (p99 <= block), and the streams per GPU (largest B with p99 < 0.9 x block)."""
    realtime = [p for p in points if p["p99_ms"] <= block]
    headroom = [p for p in points if p["p99_ms"] < REALTIME_HEADROOM * block]
    best = max(realtime, key=lambda p: p["batch"]) if realtime else None
    return {
        "best_realtime_batch": best["batch"] if best else None,
        "best_realtime_per_stream_ms": best["per_stream_ms"] if best else None,
        "streams_per_gpu": max(p["batch"] for p in headroom) if headroom else 0,
    }


def best_point(precisions: Mapping[str, Mapping[str, Any]]) -> tuple[str, int, str] | None:
    """(precision, B, why) to profile: the largest real-time B of the precision with the most real-time streams
    (ties: the lower per-stream cost there); with nothing real time, the cheapest point per stream."""
    candidates = []
    fallback = []
    for precision, result in precisions.items():
        sweep_result = result.get("sweep") or {}
        best = sweep_result.get("best_realtime_batch")
        if best is not None:
            candidates.append((-best, sweep_result["best_realtime_per_stream_ms"], precision, best))
        for p in sweep_result.get("points", []):
            fallback.append((p["per_stream_ms"], -p["batch"], precision, p["batch"]))
    if candidates:
        _, _, precision, batch = min(candidates)
        return precision, batch, "largest real-time B of the precision with the most real-time streams"
    if fallback:
        _, _, precision, batch = min(fallback)
        return precision, batch, "nothing ran in real time: the cheapest point per stream"
    return None


# ---- 4. the profiler pass -------------------------------------------------------------------------------------------


def profile_point(
    model: SeedVC,
    voice: Voice,
    settings: StreamSettings,
    batch: int,
    sources: Sequence[Tensor],
    options: Options,
    out: Path,
    header: str,
) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    device = model.device
    run = SessionRun.open(model, voice, settings, batch, sources, options.seed)
    for _ in range(max(options.warmup, 1)):
        run.step(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    walls = []
    with profile(activities=activities) as prof:
        for _ in range(options.profile_steps):
            wall, _ = run.step(device)
            walls.append(1000 * wall)
    averages = prof.key_averages()
    kernels = [event for event in averages if str(getattr(event, "device_type", "")).endswith("CUDA")]
    on_device = bool(kernels)
    if on_device:
        rows = sorted(kernels, key=lambda e: device_time(e), reverse=True)
        time_of = device_time
        unit = "CUDA"
    else:  # no CUDA kernels (the CPU dry run): the ops by self CPU time
        rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
        time_of = cpu_self_time
        unit = "CPU (self)"
    total_us = sum(time_of(event) for event in rows)
    steps = options.profile_steps
    top = [
        {
            "name": event.key,
            "calls_per_step": round(event.count / steps, 2),
            "ms_per_step": round(time_of(event) / 1000 / steps, 4),
            "share": round(time_of(event) / total_us, 4) if total_us else 0.0,
            "avg_us": round(time_of(event) / max(event.count, 1), 2),
        }
        for event in rows[:25]
    ]
    lines = [
        header,
        f"{steps} profiled steps after {max(options.warmup, 1)} warm-up; step wall under the profiler "
        f"p50 {percentile(walls, 50):.2f} ms; {len(rows)} distinct {'kernels' if on_device else 'ops'}, "
        f"{unit} time per step {total_us / 1000 / steps:.2f} ms",
        "",
        f"Top 25 {'kernels' if on_device else 'ops'} by {unit} time:",
        f"{'ms/step':>9} {'share':>7} {'calls/step':>10} {'avg us':>9}  name",
    ]
    lines += [
        f"{e['ms_per_step']:9.3f} {100 * e['share']:6.1f}% {e['calls_per_step']:10.1f} {e['avg_us']:9.1f}  "
        f"{e['name'][:160]}"
        for e in top
    ]
    sort_by = "self_cuda_time_total" if on_device else "self_cpu_time_total"
    lines += ["", f"torch.profiler op table (sorted by {sort_by}):", averages.table(sort_by=sort_by, row_limit=25)]
    (out / "profile.txt").write_text("\n".join(lines) + "\n")
    del run, prof
    return {
        "batch": batch,
        "steps": steps,
        "unit": unit,
        "kernels": on_device,
        "profiled_step_p50_ms": round(percentile(walls, 50), 3),
        "time_per_step_ms": round(total_us / 1000 / steps, 3),
        "distinct": len(rows),
        "top": top,
        "file": "profile.txt",
    }


def device_time(event: Any) -> float:
    value = getattr(event, "self_device_time_total", None)
    return float(value if value is not None else getattr(event, "self_cuda_time_total", 0.0))


def cpu_self_time(event: Any) -> float:
    return float(event.self_cpu_time_total)


# ---- markdown -------------------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** (-digits) or value == 0 else f"{value:.2e}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
    return lines


def render_markdown(data: Mapping[str, Any]) -> str:
    smoke = data.get("smoke", {})
    device = smoke.get("device", {})
    modules = smoke.get("modules", {})
    title = device.get("name") or device.get("requested") or "?"
    lines = [
        f"# GPU check: {title}{' (DRY RUN, CPU, tiny model)' if data.get('dry_run') else ''}",
        "",
        f"{data.get('started_at')} to {data.get('finished_at')}, {data.get('elapsed_s')} s of {data.get('budget_s')} s"
        f" budget; **{'PASSED' if data.get('passed') else 'FAILED'}**. torch {modules.get('torch')} (CUDA "
        f"{device.get('torch_cuda')}, capability {device.get('capability')}, "
        f"{device.get('total_memory_gib')} GiB), transformers {modules.get('transformers')}, numpy "
        f"{modules.get('numpy')}, huggingface_hub {modules.get('huggingface_hub')}, python {smoke.get('python')}.",
    ]
    if smoke.get("failures"):
        lines += ["", "Smoke test failures: " + "; ".join(f"{k}: {v}" for k, v in smoke["failures"].items())]
    if smoke.get("forbidden_loaded"):
        lines += ["", f"Modules the device lacks got loaded: {', '.join(smoke['forbidden_loaded'])}"]
    for error in data.get("errors", []):
        lines += ["", f"**{error['phase']} failed**: {error['error']}"]

    parity = data.get("parity")
    if parity:
        lines += [
            "",
            f"## Parity ({parity['precision']} on {parity['device']}, TF32 matmul {parity['tf32']['matmul']} / "
            f"cuDNN {parity['tf32']['cudnn']}, {parity['blocks']} blocks): "
            f"{'PASS' if parity['passed'] else 'FAIL'}",
            "",
        ]
        lines += table(
            ["array", "max abs error", "atol (e2e)", "worst block/row", "pass"],
            [
                [name, e["max_error"], e["atol"], e["worst"], e["passed"]]
                for name, e in sorted(parity["arrays"].items())
            ],
        )

    precisions = data.get("precisions", {})
    ordered = [p for p in PRECISIONS if p in precisions]
    settings = data.get("timing_settings")
    if settings:
        lines += [
            "",
            f"Timing: {data.get('timing_model')}; settings: block {settings['block_time']} s, "
            f"{settings['diffusion_steps']} steps, cfg {settings['cfg_rate']}, prompt {settings['max_prompt']} s "
            f"(block {_fmt(data.get('block_ms'), 1)} ms).",
        ]
    with_stages = [p for p in ordered if precisions[p].get("stages")]
    if with_stages:
        steps = precisions[with_stages[0]]["stages"]["steps"]
        lines += ["", f"## Per-stage ms at B = 1 (median of {steps} steps)", ""]
        lines += table(
            ["precision", *STAGES, "total", "step"],
            [[p, *(precisions[p]["stages"]["median_ms"][c] for c in (*STAGES, "total", "step"))] for p in with_stages],
        )
    for p in ordered:
        result = precisions[p].get("sweep")
        if not result:
            continue
        points = result["points"]
        lines += [
            "",
            f"## Sweep {p} (model {_fmt(precisions[p].get('model_mib'), 1)} MiB): stopped: {result.get('stopped')}",
            "",
        ]
        lines += table(
            ["B", "steps", "p50 ms", "p99 ms", "per-stream ms", "real-time streams", "memory/stream MiB"],
            [
                [
                    pt["batch"],
                    pt["steps"],
                    pt["p50_ms"],
                    pt["p99_ms"],
                    pt["per_stream_ms"],
                    pt["realtime_streams"],
                    pt["memory_per_stream_mib"],
                ]
                for pt in points
            ],
        )
    swept = [p for p in ordered if precisions[p].get("sweep")]
    if swept:
        lines += ["", "## Capacity", ""]
        lines += table(
            [
                "precision",
                "best real-time B (p99 <= block)",
                "per-stream ms there",
                "streams per GPU (p99 < 0.9 block)",
            ],
            [
                [
                    p,
                    precisions[p]["sweep"].get("best_realtime_batch"),
                    precisions[p]["sweep"].get("best_realtime_per_stream_ms"),
                    precisions[p]["sweep"].get("streams_per_gpu"),
                ]
                for p in swept
            ],
        )
    profile = data.get("profile")
    if profile and profile.get("top"):
        lines += [
            "",
            f"## Profile: {profile['precision']} at B = {profile['batch']} ({profile['why']}); "
            f"{profile['unit']} time {profile['time_per_step_ms']} ms per step (top 10; 25 in {profile['file']})",
            "",
        ]
        lines += table(
            ["ms/step", "share", "calls/step", "name"],
            [
                [e["ms_per_step"], f"{100 * e['share']:.1f}%", e["calls_per_step"], e["name"][:90]]
                for e in profile["top"][:10]
            ],
        )
    elif profile:
        lines += ["", f"## Profile: {profile.get('skipped', 'not run')}"]
    return "\n".join(lines) + "\n"


# ---- the run --------------------------------------------------------------------------------------------------------


def run_precision(
    precision: str,
    template: SeedVC,
    settings: StreamSettings,
    sources: Sequence[Tensor],
    options: Options,
    report: Report,
    deadline_s: float,
) -> None:
    import torch

    device = torch.device(options.device)
    entry: dict[str, Any] = {}
    report.data["precisions"][precision] = entry
    model, info = fresh_model(template, device, precision)
    entry.update(info)
    voice = synthetic_voice(model, settings, options.seed)
    report.data["block_ms"] = block_ms(model, settings)
    entry["stages"] = stage_times(model, voice, settings, sources, options)
    median = entry["stages"]["median_ms"]
    print(f"    B=1 stages (ms): {json.dumps(median)}", flush=True)
    report.write()
    points: list[dict[str, Any]] = []
    entry["sweep"] = {"points": points, "stopped": "running"}

    def on_point(point: dict[str, Any]) -> None:  # a run killed mid-sweep still leaves the points it measured
        points.append(point)
        report.write()

    entry["sweep"] = sweep(model, voice, settings, sources, options, report.budget, deadline_s, on_point)
    del model, voice
    release(device)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    budget = Budget(options.budget_s, options.reserve_s)
    report = Report(options, budget)
    print(
        f"[gpu-check] {utc_now()} out {options.out}, device {options.device}, budget {options.budget_s} s", flush=True
    )

    with report.phase("smoke"):
        report.data["smoke"] = smoke_test(options.device)
        report.data["environment"] = environment()
    if not report.data.get("smoke", {}).get("ok"):
        print("[gpu-check] the import smoke test failed; nothing else runs", flush=True)
        report.write()
        print((options.out / "gpu-check.md").read_text(), flush=True)
        return 2

    import torch

    with report.phase("parity"):
        report.data["parity"] = run_parity(PARITY_A, options.device)
        print(f"    parity passed: {report.data['parity']['passed']}", flush=True)

    device = torch.device(options.device)
    if options.dry_run:  # CPU timings mean nothing here; one thread keeps a shared CI machine from thrashing
        torch.set_num_threads(1)
    template: SeedVC | None = None
    sources: Sequence[Tensor] = []
    settings = timing_settings(options)
    report.data["timing_settings"] = asdict(settings)
    report.data["timing_model"] = (
        "full-size random weights (bench/full_size.py)" if options.model is None else f"bundle {options.model}"
    )
    with report.phase("timing model"):
        from app.streaming.settings import StreamGeometry
        from bench.stages import source_blocks

        built = timing_template(options)
        geometry = StreamGeometry.from_settings(settings, built.sample_rate, built.config.mel.hop_length)
        # Session i of a step reads block k + i: one source long enough for the largest B serves every point.
        longest = max(options.steps, options.stage_steps, options.profile_steps) + options.warmup + 1
        sources = source_blocks(longest + options.max_batch, geometry.block_16k, options.seed + 1000)
        template = built

    if template is not None:
        # Reduced precisions first: fp32 gets what is left, so it is the one that stops early when time is short.
        order = sorted(options.precisions, key=lambda p: p == "fp32")
        for position, precision in enumerate(order):
            share_end = budget.elapsed() + budget.left_for_measuring() / (len(order) - position)
            with report.phase(f"timing {precision}"):
                run_precision(precision, template, settings, sources, options, report, share_end)

    with report.phase("profile"):
        chosen = best_point(report.data["precisions"])
        if chosen is None or template is None:
            report.data["profile"] = {"skipped": "no sweep point to profile"}
        else:
            precision, batch, why = chosen
            point = next(p for p in report.data["precisions"][precision]["sweep"]["points"] if p["batch"] == batch)
            needed = (max(options.warmup, 1) + 3 * options.profile_steps) * point["p50_ms"] / 1000 + 10
            if needed > budget.left() and not options.dry_run:
                report.data["profile"] = {"skipped": f"no time left ({budget.left():.0f} s, ~{needed:.0f} s needed)"}
            else:
                model, _ = fresh_model(template, device, precision)
                voice = synthetic_voice(model, settings, options.seed)
                header = f"torch.profiler at {precision}, B = {batch} ({why}), device {device}"
                result = profile_point(model, voice, settings, batch, sources, options, options.out, header)
                report.data["profile"] = {"precision": precision, "why": why, **result}
                del model, voice
                release(device)

    report.data["smoke"]["forbidden_loaded"] = forbidden_loaded()
    report.write()
    print("\n" + (options.out / "gpu-check.md").read_text(), flush=True)
    print(f"[gpu-check] wrote {options.out / 'gpu-check.json'} and {options.out / 'gpu-check.md'}", flush=True)
    return 0 if report.data["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
