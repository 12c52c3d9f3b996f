"""client/audio_devices.py without a sound card: a fake `sounddevice` (the `SoundLibrary` protocol) whose output
stream the test pulls as PortAudio would. Device choice by index and name, the player's bounded buffer (prebuffer,
underruns counted, oldest audio dropped when full, resampling to the device's rate), and the CLI's --play end to end
against the echo converter: the samples played are the samples written to the file."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from app.transport.protocol import SAMPLE_RATE
from client import stream_client
from client.audio_devices import AudioDeviceError, Player, choose_device, describe_devices
from tests.test_stream_client_unit import EchoConverter, serving, write_input

DEVICES = [
    {"index": 0, "name": "Built-in Microphone", "hostapi": 0, "max_input_channels": 2, "max_output_channels": 0},
    {"index": 1, "name": "Built-in Output", "hostapi": 0, "max_input_channels": 0, "max_output_channels": 2},
    {"index": 2, "name": "USB Headset", "hostapi": 0, "max_input_channels": 1, "max_output_channels": 2},
    {"index": 3, "name": "USB Headset Monitor", "hostapi": 0, "max_input_channels": 0, "max_output_channels": 2},
]


class FakeOutputStream:
    """sounddevice.OutputStream: keeps the callback; `pull(frames)` calls it as PortAudio's thread would, and keeps
    what it wrote. With `clock=True` a thread pulls 10 ms every 10 ms while the stream is open (a real device)."""

    def __init__(self, library: FakeSoundLibrary, clock: bool, **options: Any) -> None:
        self.options = options
        self.played: list[np.ndarray] = []
        self._open = threading.Event()
        self._thread = threading.Thread(target=self._run) if clock else None
        library.streams.append(self)

    def pull(self, frames: int) -> np.ndarray:
        outdata = np.full((frames, 1), np.nan, dtype=np.float32)  # NaN: a sample the player failed to write
        self.options["callback"](outdata, frames, None, None)
        self.played.append(outdata[:, 0].copy())
        return outdata[:, 0]

    def _run(self) -> None:
        while self._open.is_set():
            self.pull(self.options["samplerate"] // 100)
            time.sleep(0.01)

    def __enter__(self) -> FakeOutputStream:
        self._open.set()
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._open.clear()
        if self._thread is not None:
            self._thread.join()


class FakeSoundLibrary:
    """The parts of sounddevice that client/audio_devices.py uses, over DEVICES, each at `rate`."""

    PortAudioError = type("PortAudioError", (Exception,), {})

    def __init__(self, rate: int = SAMPLE_RATE, clock: bool = False) -> None:
        self.rate, self.clock = rate, clock
        self.streams: list[FakeOutputStream] = []

    def query_devices(self, device: int | None = None, kind: str | None = None) -> Any:
        devices = [{**device, "default_samplerate": float(self.rate)} for device in DEVICES]
        if device is None and kind is None:
            return devices
        return devices[device if device is not None else {"input": 0, "output": 1}[str(kind)]]

    def query_hostapis(self, index: int) -> Any:
        return {"name": "Fake API"}

    def InputStream(self, **options: Any) -> Any:
        raise AssertionError("no input in these tests")

    def OutputStream(self, **options: Any) -> FakeOutputStream:
        return FakeOutputStream(self, self.clock, **options)


def test_devices_are_chosen_by_index_or_name_within_their_kind() -> None:
    library = FakeSoundLibrary()
    assert choose_device(library, None, "output") is None  # the system's default
    assert choose_device(library, "2", "input") == 2
    assert choose_device(library, "microphone", "input") == 0  # any case, any part of the name
    assert choose_device(library, "usb headset", "output") == 2  # the exact name wins over a longer one
    assert choose_device(library, "monitor", "output") == 3
    with pytest.raises(AudioDeviceError, match="no input device matches 'Output'; input devices: 0: Built-in"):
        choose_device(library, "Output", "input")  # an output-only device is no input
    with pytest.raises(AudioDeviceError, match="no output device matches '0'"):
        choose_device(library, "0", "output")
    with pytest.raises(AudioDeviceError, match="'usb' matches several output devices"):
        choose_device(library, "usb", "output")


def test_the_device_list_shows_index_name_channels_and_defaults() -> None:
    listing = describe_devices(FakeSoundLibrary()).splitlines()
    assert len(listing) == 1 + len(DEVICES)
    assert listing[1].split() == [
        *("0", "Built-in", "Microphone", "(Fake", "API):", "2", "in,", "0", "out,", "48000", "Hz", "[default", "input]")
    ]
    assert listing[2].endswith("[default output]") and "USB Headset Monitor" in listing[4]


def ramp(seconds: float) -> np.ndarray:
    return np.linspace(0.1, 0.9, round(seconds * SAMPLE_RATE), dtype=np.float32)


def test_playback_waits_for_its_prebuffer_and_counts_underruns() -> None:
    async def play() -> tuple[list[np.ndarray], Player]:
        library = FakeSoundLibrary()
        audio = ramp(0.3)
        with Player(library, 1, prebuffer_s=0.1) as player:
            device = library.streams[0]
            assert device.options["device"] == 1 and device.options["samplerate"] == SAMPLE_RATE
            assert not device.pull(480).any()  # nothing yet: silence, and no underrun before the first audio
            player.push(audio[:2400])  # 50 ms: under the prebuffer
            assert not device.pull(480).any()
            player.push(audio[2400:7200])  # 150 ms buffered: plays
            played = [device.pull(4800), device.pull(4800)]  # 100 ms, then 100 ms more with 50 ms left
            player.push(audio[7200:9600])  # 50 ms after the underrun: under the prebuffer again
            assert not device.pull(480).any()
            player.push(audio[9600:])
            finishing = asyncio.create_task(player.finish())
            await asyncio.sleep(0)  # finish() marks the end: what is left plays without a prebuffer
            played += [device.pull(4800), device.pull(4800)]
            await finishing
        return played, player

    played, player = asyncio.run(play())
    audio = ramp(0.3)
    np.testing.assert_array_equal(played[0], audio[:4800])
    np.testing.assert_array_equal(played[1], np.concatenate([audio[4800:7200], np.zeros(2400, np.float32)]))
    np.testing.assert_array_equal(np.concatenate(played[2:])[:7200], audio[7200:])
    assert not np.concatenate(played[2:])[7200:].any()
    stats = player.stats
    assert stats.underruns == 1 and stats.played_s == pytest.approx(0.3)
    assert stats.underrun_ms == pytest.approx(60.0)  # 50 ms short in the pull, then 10 ms of rebuffering
    assert stats.dropped_ms == 0.0 and "underruns: 1 (60 ms of silence)" in stats.describe()


def test_a_full_buffer_drops_its_oldest_audio_and_counts_it() -> None:
    async def play() -> tuple[np.ndarray, Player]:
        library = FakeSoundLibrary()
        with Player(library, prebuffer_s=0.05, headroom_s=0.05) as player:  # holds 100 ms
            player.push(ramp(0.15))
            played = library.streams[0].pull(4800)
        return played, player

    played, player = asyncio.run(play())
    np.testing.assert_array_equal(played, ramp(0.15)[2400:])  # the newest 100 ms: the delay stays bounded
    assert player.stats.dropped_ms == pytest.approx(50.0)


def test_a_device_at_another_rate_gets_the_voice_resampled() -> None:
    async def play() -> tuple[np.ndarray, Player]:
        library = FakeSoundLibrary(rate=44100)
        with Player(library) as player:
            player.push(ramp(0.2))
            finishing = asyncio.create_task(player.finish())
            await asyncio.sleep(0)
            played = library.streams[0].pull(44100)
            await finishing
        return played, player

    played, player = asyncio.run(play())
    assert player.rate == 44100 and player.stats.played_s == pytest.approx(0.2, abs=1e-3)
    assert np.abs(played[1000:8000] - np.interp(np.arange(1000, 8000) / 44100, *ramp_axis())).max() < 1e-3


def ramp_axis() -> tuple[np.ndarray, np.ndarray]:
    audio = ramp(0.2)
    return np.arange(len(audio)) / SAMPLE_RATE, audio


def test_cli_plays_what_it_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    library = FakeSoundLibrary(clock=True)
    monkeypatch.setitem(sys.modules, "sounddevice", library)
    monkeypatch.setattr(stream_client, "get_token", lambda url, key: "token-1")
    output = tmp_path / "out.wav"
    with serving(EchoConverter()) as url:
        argv = [str(write_input(tmp_path)), str(output), "--url", url, "--api-key", "k", "--voice", "v", "--play"]
        # A prebuffer longer than the stream: the whole voice plays after it, so no underrun can cut into it here.
        code = stream_client.main([*argv, "--output-device", "headset monitor", "--play-buffer", "1500"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    written, rate = soundfile.read(output, dtype="float32")
    [device] = library.streams
    played = np.concatenate(device.played)
    assert device.options["device"] == 3 and rate == SAMPLE_RATE and not np.isnan(played).any()
    np.testing.assert_array_equal(np.trim_zeros(played), np.trim_zeros(written))
    assert f"played {len(written) / SAMPLE_RATE:.2f} s; underruns: 0" in printed.out


def test_cli_device_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    argv = [str(write_input(tmp_path)), str(tmp_path / "out.wav"), "--api-key", "k", "--voice", "v"]
    argv += ["--url", "http://127.0.0.1:9"]  # never reached: the device is checked first
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # not installed
    assert stream_client.main([*argv, "--play"]) == 1
    assert "--play needs the optional 'sounddevice' package" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "sounddevice", FakeSoundLibrary())
    assert stream_client.main([*argv, "--play", "--output-device", "hdmi"]) == 1
    error = capsys.readouterr().err
    assert "no output device matches 'hdmi'; output devices: 1: Built-in Output, 2: USB Headset" in error
    assert stream_client.main(["--list-devices"]) == 0
    assert "USB Headset Monitor (Fake API): 0 in, 2 out" in capsys.readouterr().out
    for wrong in (["--play", "--fast"], ["--output-device", "1"], ["--play", "--play-buffer", "10"]):
        with pytest.raises(SystemExit) as exit_info:
            stream_client.parse_args([*argv, *wrong])
        assert exit_info.value.code == 2
