"""The stream controls as flags of both CLIs (app/cli_controls.py): each flag reaches the streaming client's start
message and the file CLI's conversion (through the service's own code, on the fixture set's tiny model), neutral
values leave the output bitwise as it was, and values outside the protocol's ranges exit 2 naming the flag."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from app.audio.files import Audio, read_audio
from app.convert import NEUTRAL_CONTROLS, input_blocks, silence_gate
from app.convert import main as convert_main
from app.engine.silence import SilenceGate
from app.model.seedvc import SeedVC
from app.serving.controls import Loudness, StreamControls, db_to_gain
from app.streaming.settings import StreamGeometry, StreamSettings
from app.transport.protocol import StartMessage, parse_client_message
from bench.parity import ParitySet
from client.stream_client import parse_args, start_message

CLIENT_ARGS = ["in.wav", "out.wav", "--voice", "v", "--api-key", "k"]
EVERY_FLAG = [
    *("--pitch", "-5", "--silence-threshold", "-48", "--hangover", "0.3", "--input-gain", "-6"),
    *("--output-gain", "6", "--rms-mix-rate", "0.25", "--noise-suppression", "--monitor"),
]
EVERY_CONTROL = {
    "pitch_shift": -5.0,
    "silence_threshold_dbfs": -48.0,
    "silence_hangover_s": 0.3,
    "input_gain_db": -6.0,
    "output_gain_db": 6.0,
    "rms_mix_rate": 0.25,
    "noise_suppression": True,
    "monitor": True,
}
OUT_OF_RANGE = [
    ("--pitch", "13", "--pitch: 13.0 is outside -12 to 12"),
    ("--silence-threshold", "3", "--silence-threshold: 3.0 is outside -120 to 0"),
    ("--hangover", "1.5", "--hangover: 1.5 is outside 0 to 1"),
    ("--input-gain", "-31", "--input-gain: -31.0 is outside -30 to 30"),
    ("--output-gain", "40", "--output-gain: 40.0 is outside -30 to 30"),
    ("--rms-mix-rate", "1.1", "--rms-mix-rate: 1.1 is outside 0 to 1"),
]


def test_every_control_flag_reaches_the_start_message() -> None:
    args = parse_args([*CLIENT_ARGS, *EVERY_FLAG])
    assert args.controls == EVERY_CONTROL
    start = parse_client_message(json.dumps(start_message("t", "v", controls=args.controls)))
    assert isinstance(start, StartMessage) and start.controls is not None
    assert start.controls.changes() == EVERY_CONTROL  # the server's own parser reads them back, every one
    # None given: no controls at all, the start message protocol-v1 clients always sent.
    assert parse_args(CLIENT_ARGS).controls == {}
    assert "controls" not in start_message("t", "v", controls=parse_args(CLIENT_ARGS).controls)


@pytest.mark.parametrize(("flag", "value", "message"), OUT_OF_RANGE)
def test_out_of_range_controls_exit_2_naming_the_flag_on_both_clis(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*CLIENT_ARGS, flag, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    # The file CLI checks before it reads a file or loads a model.
    assert convert_main(["a.wav", "b.wav", str(tmp_path / "out.wav"), flag, value, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_the_file_cli_refuses_what_has_no_meaning_for_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["a.wav", "b.wav", str(tmp_path / "out.wav"), "--monitor"])
    assert exit_info.value.code == 2 and "--monitor" in capsys.readouterr().err
    # A file has no configured silence gate: a hangover alone would hold nothing.
    assert convert_main(["a.wav", "b.wav", str(tmp_path / "out.wav"), "--hangover", "0.2"]) == 2
    assert "a hangover needs a silence threshold" in capsys.readouterr().err


def test_manifest_controls_are_checked_per_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    manifest = tmp_path / "jobs.jsonl"
    line = {"source": "a.wav", "reference": "r.wav", "output": "o.wav"}
    manifest.write_text(json.dumps({**line, "output_gain_db": 6}) + "\n" + json.dumps({**line, "rms_mix_rate": 2}))
    assert convert_main(["--manifest", str(manifest), "--quiet"]) == 2
    assert "jobs.jsonl:2: rms_mix_rate: 2 is outside 0 to 1" in capsys.readouterr().err
    manifest.write_text(json.dumps({**line, "monitor": True}))
    assert convert_main(["--manifest", str(manifest), "--quiet"]) == 2
    assert "unknown keys ['monitor']" in capsys.readouterr().err


def test_input_controls_shape_the_file_clis_blocks(parity: ParitySet, model: SeedVC) -> None:
    source = read_audio(parity.root / parity.bundle["files"]["source_16k"])
    geometry = StreamGeometry.from_settings(StreamSettings(), model.sample_rate, model.config.mel.hop_length)
    plain = np.concatenate(input_blocks(source, geometry, NEUTRAL_CONTROLS))
    louder = np.concatenate(input_blocks(source, geometry, StreamControls(input_gain_db=6.0)))
    np.testing.assert_allclose(louder, plain * db_to_gain(6.0), rtol=0, atol=1e-6)
    # Noise suppression on noise alone: RNNoise takes most of it away (at 48 kHz, then the blocks are cut).
    noise = Audio(np.random.default_rng(0).normal(0, 0.05, 16000).astype(np.float32), 16000)
    noisy = np.concatenate(input_blocks(noise, geometry, NEUTRAL_CONTROLS))
    denoised = np.concatenate(input_blocks(noise, geometry, StreamControls(noise_suppression=True)))
    assert 10 * np.log10(np.sum(noisy**2) / np.sum(denoised**2)) > 10.0
    assert silence_gate(NEUTRAL_CONTROLS) is None  # files: no gate unless asked
    assert silence_gate(StreamControls(silence_threshold_dbfs=-40.0, silence_hangover_s=0.3)) == SilenceGate(-40, 0.3)


def test_the_file_cli_applies_the_controls_to_the_conversion(
    parity: ParitySet, model: SeedVC, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(parity.root)
    files = parity.bundle["files"]
    source = tmp_path / "source.wav"
    speech = parity.wav("source_16k")[: 16000 * 3 // 2]  # 1.5 s: every control shows in a few blocks
    soundfile.write(source, speech, 16000, subtype="FLOAT")

    def convert(*flags: str) -> np.ndarray:
        output = tmp_path / f"out{len(list(tmp_path.iterdir()))}.wav"
        args = [str(source), files["reference_22k"], str(output), "--model", "model/", "--steps", "2", "--quiet"]
        assert convert_main([*args, *flags]) == 0
        return np.asarray(soundfile.read(output, dtype="float32")[0])

    plain = convert()
    neutral = ["--pitch", "0", "--input-gain", "0", "--output-gain", "0", "--rms-mix-rate", "1"]
    assert np.array_equal(convert(*neutral), plain)  # neutral values: bitwise the output without controls
    louder = convert("--output-gain", "6")
    np.testing.assert_allclose(louder, plain * db_to_gain(6.0), rtol=0, atol=1e-6)
    assert np.abs(louder).max() / np.abs(plain).max() == pytest.approx(1.995, abs=1e-3)  # twice the amplitude
    # Loudness matching: each converted block scaled towards the loudness of the input block it answers.
    geometry = StreamGeometry.from_settings(StreamSettings(), model.sample_rate, model.config.mel.hop_length)
    blocks = input_blocks(read_audio(source), geometry, NEUTRAL_CONTROLS)
    loudness, matching = Loudness(), StreamControls(rms_mix_rate=0.0)
    expected = [
        loudness.apply(matching, plain[index * geometry.block : (index + 1) * geometry.block], block.numpy())
        for index, block in enumerate(blocks)
    ]
    np.testing.assert_allclose(convert("--rms-mix-rate", "0"), np.concatenate(expected), rtol=0, atol=1e-6)
    # The gate hears the input after its gain: 30 dB quieter, every block of speech falls under -45 dBFS.
    gated = convert("--silence-threshold", "-45")
    assert np.abs(gated).max() > 0.01  # the speech is above the threshold: converted
    assert np.abs(convert("--silence-threshold", "-45", "--input-gain", "-30")).max() == 0.0
