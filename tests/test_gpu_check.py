"""The prepared GPU check (bench/gpu_check.py through scripts/gpu-check) dry-runs on the CPU, so it never rots.

One dry run (the fixture model, B in {1, 2}, a few steps) goes through the shell script exactly as on the GPU
machine, with the modules that machine lacks (ray, av, pydantic, the serving stack) made unimportable: every phase
must run, parity must pass within the fixture's own tolerances, and the JSON, the markdown and the profile must
hold what the GPU run will be read for. The sweep's stop rule, the capacity figures and the choice of the profiled
point are checked on made-up points as well (the dry run never reaches them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import gpu_check
from bench.fixtures import PARITY_A
from bench.parity import ParitySet

ROOT = Path(__file__).resolve().parent.parent

# Loaded through PYTHONPATH as sitecustomize: what the GPU machine lacks cannot be imported in the dry run either.
BLOCKER = """
import importlib.abc
import sys

BLOCKED = {blocked!r}


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: the GPU machine lacks it)", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
"""


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("blocker")
    (folder / "sitecustomize.py").write_text(BLOCKER.format(blocked=set(gpu_check.FORBIDDEN_MODULES)))
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(folder))
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory, blocked_env: dict[str, str]) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu-check")
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check"), str(out), "--dry-run"],
        cwd=ROOT,
        env=blocked_env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"dry run failed ({done.returncode}):\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    return {"out": out, "stdout": done.stdout, "data": json.loads((out / "gpu-check.json").read_text())}


@pytest.fixture(scope="module")
def parity_set() -> ParitySet:
    return ParitySet(PARITY_A)


def test_the_blocker_blocks(blocked_env: dict[str, str]) -> None:
    """Else the dry run would prove nothing about the modules the GPU machine lacks."""
    done = subprocess.run([sys.executable, "-c", "import ray"], env=blocked_env, capture_output=True, text=True)
    assert done.returncode != 0 and "blocked" in done.stderr


@pytest.mark.slow
def test_dry_run_passes_with_every_phase(dry_run: dict[str, Any]) -> None:
    data = dry_run["data"]
    assert data["passed"] and data["dry_run"] and not data["errors"]
    phases = [phase["name"] for phase in data["phases"]]
    assert phases == ["smoke", "parity", "timing model", "timing bf16", "timing fp16", "timing fp32", "profile"]
    assert all("error" not in phase and phase["seconds"] >= 0 for phase in data["phases"])
    assert 0 < data["elapsed_s"] < data["budget_s"]
    assert (dry_run["out"] / "gpu-check.log").read_text().rstrip().endswith("gpu-check.md")
    # The caller sees only the tail of stdout: it ends with the markdown.
    assert "## Capacity" in dry_run["stdout"][-4000:]


@pytest.mark.slow
def test_smoke_imported_everything_and_nothing_the_device_lacks(dry_run: dict[str, Any]) -> None:
    smoke = dry_run["data"]["smoke"]
    assert smoke["ok"] and not smoke["failures"]
    assert set(smoke["modules"]) == {*gpu_check.THIRD_PARTY, *gpu_check.PROJECT_MODULES}
    for name in ("torch", "transformers", "numpy", "huggingface_hub"):
        assert smoke["modules"][name][0].isdigit(), f"{name} reported no version: {smoke['modules'][name]}"
    assert smoke["forbidden_loaded"] == []
    assert smoke["device"]["requested"] == "cpu"


@pytest.mark.slow
def test_parity_is_within_the_fixture_tolerances(dry_run: dict[str, Any], parity_set: ParitySet) -> None:
    parity = dry_run["data"]["parity"]
    assert parity["passed"] and parity["precision"] == "fp32"
    assert parity["tf32"] == {"matmul": False, "cudnn": False}
    arrays = parity["arrays"]
    required = {"output_stream", "blk_cfm_mel", "blk_vocoder_wave", "blk_sola_offset", "blk_output", "est_out"}
    assert required <= set(arrays)
    blocks = parity_set.bundle["n_blocks"]
    assert parity["blocks"] == blocks
    for name, entry in arrays.items():
        atol = parity_set.tolerance(name, "e2e")  # read here, independently of the check
        assert entry["atol"] == atol
        assert 0 <= entry["max_error"] <= atol, f"{name}: {entry['max_error']} > {atol}"
        assert entry["passed"]
    for name in ("blk_cfm_mel", "blk_vocoder_wave", "blk_sola_offset"):
        assert arrays[name]["count"] == blocks
    assert arrays["est_out"]["count"] == len(parity_set.expected["est_x_lens"])
    assert arrays["blk_sola_offset"]["max_error"] == 0
    # Streaming really computed something: the waveform is not bit-identical to the reference (other threads, code).
    assert arrays["output_stream"]["max_error"] > 0


@pytest.mark.slow
def test_stage_times_for_every_precision(dry_run: dict[str, Any]) -> None:
    precisions = dry_run["data"]["precisions"]
    assert set(precisions) == set(gpu_check.PRECISIONS)
    for precision, result in precisions.items():
        assert result["precision"] == precision
        stages = result["stages"]
        assert stages["steps"] == 3
        median = stages["median_ms"]
        for stage in gpu_check.STAGES:
            assert median[stage] > 0, f"{precision} {stage}: {median[stage]}"
        assert median["total"] >= max(median[stage] for stage in gpu_check.STAGES)
        assert median["step"] > 0


@pytest.mark.slow
def test_sweeps_have_ordered_percentiles(dry_run: dict[str, Any]) -> None:
    data = dry_run["data"]
    block = data["block_ms"]
    assert block == pytest.approx(180.0)
    for precision, result in data["precisions"].items():
        sweep = result["sweep"]
        assert [point["batch"] for point in sweep["points"]] == [1, 2], precision
        assert sweep["stopped"].startswith("max batch 2")
        for point in sweep["points"]:
            assert point["steps"] == 3 == len(point["step_ms"])
            assert 0 < point["p50_ms"] <= point["p99_ms"] <= point["max_ms"]
            assert point["per_stream_ms"] == pytest.approx(point["p50_ms"] / point["batch"], rel=1e-3)
            assert point["realtime_streams"] == pytest.approx(
                point["batch"] * block / point["p50_ms"], rel=1e-2, abs=0.005
            )  # rounded to 0.01
            assert point["realtime"] == (point["p99_ms"] <= block)
            assert set(point["stage_p50_ms"]) == set(gpu_check.STAGES)
            assert point["memory_per_stream_mib"] is None  # CPU: no device memory to count


@pytest.mark.slow
def test_profile_and_markdown(dry_run: dict[str, Any]) -> None:
    data, out = dry_run["data"], dry_run["out"]
    profile = data["profile"]
    assert profile["precision"] in gpu_check.PRECISIONS and profile["batch"] in (1, 2)
    assert profile["unit"] == "CPU (self)" and not profile["kernels"]
    top = profile["top"]
    assert 0 < len(top) <= 25 and top[0]["ms_per_step"] >= top[-1]["ms_per_step"] >= 0
    assert 0 < sum(entry["share"] for entry in top) <= 1.0001
    text = (out / "profile.txt").read_text()
    assert "Top 25 ops" in text and top[0]["name"] in text

    markdown = (out / "gpu-check.md").read_text()
    for heading in ("## Parity", "## Per-stage ms at B = 1", "## Sweep fp32", "## Sweep bf16", "## Sweep fp16"):
        assert heading in markdown
    assert "## Capacity" in markdown and "## Profile: " in markdown and "**PASSED**" in markdown
    assert "| output_stream |" in markdown
    sweep_rows = [line for line in markdown.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(sweep_rows) == 2 * len(gpu_check.PRECISIONS)


# --- the decisions the dry run does not reach ------------------------------------------------------------------------


def _point(batch: int, p50: float, p99: float, cut_short: bool = False) -> dict[str, Any]:
    return {"batch": batch, "p50_ms": p50, "p99_ms": p99, "per_stream_ms": p50 / batch, "cut_short": cut_short}


def stopped(*args: Any, **kwargs: Any) -> str:
    """Why the sweep stops at this point (it must stop)."""
    reason = gpu_check.stop_reason(*args, **kwargs)
    assert reason is not None
    return reason


def test_sweep_stop_rule() -> None:
    fits = _point(8, 100.0, 150.0)
    assert gpu_check.stop_reason(fits, 180.0, 16, 1024, next_point_s=10, time_left_s=60) is None
    assert "exceeds the 180 ms block" in stopped(_point(8, 150.0, 181.0), 180.0, 16, 1024, 10, 60)
    assert gpu_check.stop_reason(_point(8, 150.0, 181.0), 180.0, 16, 1024, 10, 60, stop_on_block_time=False) is None
    assert stopped(fits, 180.0, 16, 8, 10, 60).startswith("max batch 8")
    assert stopped(fits, 180.0, 16, 1024, next_point_s=61, time_left_s=60).startswith("time budget")
    assert stopped(_point(8, 100.0, 150.0, cut_short=True), 180.0, 16, 1024, 10, 60).startswith("time")


def test_the_next_point_is_predicted_linear_in_b() -> None:
    options = gpu_check.parse_options(["--out", "x"])
    assert (options.steps, options.warmup, options.max_batch, options.device) == (50, 3, 1024, "cuda")
    seconds = gpu_check.predict_point_s(_point(4, 100.0, 120.0), 8, options)
    assert seconds == pytest.approx(53 * 0.2 * 1.1 + 1.0)


def test_capacity_and_the_profiled_point() -> None:
    block = 180.0
    fp32 = [_point(1, 50, 60), _point(2, 70, 90), _point(4, 150, 170), _point(8, 300, 320)]
    bf16 = [_point(1, 40, 50), _point(2, 45, 55), _point(4, 60, 70), _point(8, 100, 165), _point(16, 200, 240)]
    fp16 = [_point(1, 40, 50), _point(2, 45, 55), _point(4, 60, 70), _point(8, 90, 150), _point(16, 200, 240)]
    assert gpu_check.capacity(fp32, block) == {
        "best_realtime_batch": 4,
        "best_realtime_per_stream_ms": 37.5,
        "streams_per_gpu": 2,  # 170 ms is not under 0.9 x 180 = 162 ms
    }
    assert gpu_check.capacity(bf16, block)["streams_per_gpu"] == 4
    assert gpu_check.capacity([_point(1, 200, 250)], block) == {
        "best_realtime_batch": None,
        "best_realtime_per_stream_ms": None,
        "streams_per_gpu": 0,
    }
    results = {
        name: {"sweep": {"points": points, **gpu_check.capacity(points, block)}}
        for name, points in (("fp32", fp32), ("bf16", bf16), ("fp16", fp16))
    }
    best = gpu_check.best_point(results)
    assert best is not None
    precision, batch, _ = best
    assert (precision, batch) == ("fp16", 8)  # bf16 and fp16 both reach B = 8; fp16 is cheaper per stream there
    slow = {"fp32": {"sweep": {"points": [_point(1, 300, 320), _point(2, 500, 520)], "best_realtime_batch": None}}}
    best = gpu_check.best_point(slow)
    assert best is not None and best[:2] == ("fp32", 2)
    assert gpu_check.best_point({}) is None
