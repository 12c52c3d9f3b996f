"""The file-to-file CLI: the end-to-end parity contract, output format, bulk manifests, and clear errors.

The contract (issue: Seed-VC model): `python -m app.convert inputs/source_16k.wav inputs/reference_22k.wav OUT.wav
--model model/` plus the fixture's stream settings and seed; the first n_blocks blocks must match output.wav.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import yaml

from app.convert import main
from bench.parity import ParitySet


def settings_flags(parity: ParitySet) -> list[str]:
    s = parity.settings
    pairs = {
        "--block-time": s["block_time"],
        "--crossfade": s["crossfade_time"],
        "--ce-context": s["extra_time_ce"],
        "--dit-context": s["extra_time"],
        "--lookahead": s["extra_time_right"],
        "--steps": s["diffusion_steps"],
        "--cfg-rate": s["inference_cfg_rate"],
        "--max-prompt": s["max_prompt_length"],
        "--seed": parity.bundle["stream_seed"],
        "--precision": "fp32",
    }
    return [str(item) for pair in pairs.items() for item in pair]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real command line, as a user types it (for the end-to-end contract)."""
    return subprocess.run(
        [sys.executable, "-m", "app.convert", *args, "--quiet"], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@dataclass
class Outcome:
    returncode: int
    stderr: str


@pytest.fixture
def run_main(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """The CLI's main() in this process (no interpreter start-up per case), from a given working directory."""

    def run(*args: str, cwd: Path) -> Outcome:
        monkeypatch.chdir(cwd)
        code = main([*args, "--quiet"])
        return Outcome(returncode=code, stderr=capsys.readouterr().err)

    return run


def test_cli_streams_the_fixture_exactly_like_upstream(parity: ParitySet, tmp_path: Path) -> None:
    out = tmp_path / "OUT.wav"
    files = parity.bundle["files"]
    result = run_cli(
        files["source_16k"],
        files["reference_22k"],
        str(out),
        "--model",
        "model/",
        *settings_flags(parity),
        cwd=parity.root,
    )
    assert result.returncode == 0, result.stderr
    info = soundfile.info(out)
    assert (info.samplerate, info.channels, info.subtype) == (parity.geometry["sr"], 1, "FLOAT")
    converted, _ = soundfile.read(out, dtype="float32")
    expected = parity.expected["output_stream"]
    block = parity.geometry["block_frame"]
    # Output block k answers input block k, then whole blocks flush the lookahead.
    assert len(converted) % block == 0 and len(converted) > len(expected)
    parity.assert_close("output_stream", converted[: len(expected)], kind="e2e")


def test_cli_writes_the_requested_output_rate(parity: ParitySet, tmp_path: Path, run_main) -> None:
    out = tmp_path / "out48k.flac"
    files = parity.bundle["files"]
    result = run_main(
        files["source_16k"],
        files["reference_22k"],
        str(out),
        "--model",
        "model/",
        "--output-rate",
        "48000",
        "--steps",
        "2",
        cwd=parity.root,
    )
    assert result.returncode == 0, result.stderr
    info = soundfile.info(out)
    assert info.samplerate == 48000
    source_seconds = len(parity.wav("source_16k")) / 16000
    assert source_seconds < info.duration < source_seconds + 0.5


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    soundfile.write(path, samples.astype(np.float32), rate, subtype="FLOAT")
    return path


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_source", "cannot"),
        ("garbage_source", "cannot decode"),
        ("empty_source", "no audio samples"),
        ("nan_source", "NaN"),
        ("short_reference", "at least 1 s"),
        ("contradicting_settings", "cannot exceed the content-encoder context"),
        ("missing_bundle", "no model bundle"),
        ("incomplete_bundle", "lacks dit.pth"),
        ("not_a_seedvc_checkpoint", "not a Seed-VC DiT checkpoint"),
        ("config_mismatch", "does not match its config"),
    ],
)
def test_cli_reports_bad_input_clearly(parity: ParitySet, tmp_path: Path, run_main, case: str, expected: str) -> None:
    source = parity.root / parity.bundle["files"]["source_16k"]
    reference = parity.root / parity.bundle["files"]["reference_22k"]
    model = parity.model_dir
    extra: list[str] = []
    if case == "missing_source":
        source = tmp_path / "nope.wav"
    elif case == "garbage_source":
        source = tmp_path / "garbage.wav"
        source.write_bytes(b"RIFF this is not audio at all" * 10)
    elif case == "empty_source":
        source = write_wav(tmp_path / "empty.wav", np.zeros(0), 16000)
    elif case == "nan_source":
        source = write_wav(tmp_path / "nan.wav", np.full(16000, np.nan), 16000)
    elif case == "short_reference":
        reference = write_wav(tmp_path / "short.wav", np.zeros(8000), 22050)
    elif case == "contradicting_settings":
        extra = ["--ce-context", "0.5", "--dit-context", "1.0"]
    elif case == "missing_bundle":
        model = tmp_path / "no-such-bundle"
    else:
        model = tmp_path / "bundle"
        shutil.copytree(parity.model_dir, model)
        if case == "incomplete_bundle":
            (model / "dit.pth").unlink()
        elif case == "not_a_seedvc_checkpoint":
            shutil.copyfile(model / "hift.pt", model / "dit.pth")
        elif case == "config_mismatch":
            config = yaml.safe_load((model / "config_dit.yml").read_text())
            config["model_params"]["DiT"]["depth"] += 1
            (model / "config_dit.yml").write_text(yaml.safe_dump(config))
    result = run_main(
        str(source), str(reference), str(tmp_path / "out.wav"), "--model", str(model), *extra, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert not (tmp_path / "out.wav").exists()


def test_manifest_jobs_equal_their_solo_runs(parity: ParitySet, tmp_path: Path, run_main) -> None:
    """Three jobs as concurrent streams (two share settings and batch together, one has its own block size)."""
    files = parity.bundle["files"]
    source = parity.wav("source_16k")
    write_wav(tmp_path / "a.wav", source, 16000)
    write_wav(tmp_path / "b.wav", source[: len(source) // 2][::-1].copy(), 16000)
    shutil.copyfile(parity.root / files["reference_22k"], tmp_path / "ref.wav")
    jobs: list[dict[str, Any]] = [  # manifest lines: JSON objects
        {"source": "a.wav", "reference": "ref.wav", "output": "out/a.wav", "seed": 1},
        {"source": "b.wav", "reference": "ref.wav", "output": "out/b.wav", "seed": 2},
        {"source": "a.wav", "reference": "ref.wav", "output": "out/c.wav", "seed": 3, "block_time": 0.24},
    ]
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(job) for job in jobs) + "\n")
    common = ["--model", str(parity.model_dir), "--steps", "3", "--precision", "fp32"]
    result = run_main("--manifest", str(manifest), *common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for job in jobs:
        solo = tmp_path / f"solo-{Path(job['output']).name}"
        flags = ["--seed", str(job["seed"])] + (["--block-time", str(job["block_time"])] if "block_time" in job else [])
        solo_result = run_main(job["source"], job["reference"], str(solo), *common, *flags, cwd=tmp_path)
        assert solo_result.returncode == 0, solo_result.stderr
        together, _ = soundfile.read(tmp_path / job["output"], dtype="float32")
        alone, _ = soundfile.read(solo, dtype="float32")
        assert together.shape == alone.shape
        assert np.abs(together - alone).max() <= parity.tolerance("output_stream", "e2e")


def test_manifest_errors_name_the_line(parity: ParitySet, tmp_path: Path, run_main) -> None:
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(
        '{"source": "a.wav", "reference": "r.wav", "output": "o.wav"}\n{"source": "a.wav", "colour": 1}\n'
    )
    result = run_main("--manifest", str(manifest), "--model", str(parity.model_dir), cwd=tmp_path)
    assert result.returncode == 2
    assert "jobs.jsonl:2" in result.stderr and "colour" in result.stderr
