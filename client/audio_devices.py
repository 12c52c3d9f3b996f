"""The sound card for the streaming client: list and choose devices, record the microphone, play the converted voice.

Everything goes through `sounddevice` (PortAudio), an optional package: it is imported only when a device is used,
and its absence is an AudioDeviceError that says how to install it. Code here takes the library as an argument
(`SoundLibrary`), so tests hand it a fake device instead of a sound card.

Live playback: PortAudio pulls audio on its own thread, at the device's clock; the stream pushes it on the event
loop, as packets arrive. Between the two is a bounded ring buffer (`Player`): pushing never blocks the loop, and the
buffer is played once it holds `PLAY_PREBUFFER_S`, which absorbs the network's jitter. When it runs dry while playing,
the device gets silence and the underrun is counted; playing resumes once the prebuffer has filled again (a device
fed sample by sample would crackle). When the stream outruns the device by more than the buffer holds, the oldest
audio is dropped, counted too, so that the delay cannot grow without bound. `PlaybackStats` reports both.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from app.audio.framing import Chunker
from app.audio.opus import FRAME_SAMPLES, OpusEncoder
from app.audio.stream_resample import StreamingResampler
from app.transport.protocol import SAMPLE_RATE

Kind = Literal["input", "output"]
# The converted voice arrives as one block's packets at a time (the server paces them at 20 ms each, but the network
# bunches them): this much is buffered before playing starts, and again after an underrun. More absorbs more jitter
# and delays the voice by as much (the client's --play-buffer).
PLAY_PREBUFFER_S = 0.1
PLAY_HEADROOM_S = 2.0  # at most this much more waits to be played; beyond it the oldest is dropped (bounded delay)
DRAIN_SLACK_S = 1.0  # the device may take this long past the buffered audio's length to play it out


class AudioDeviceError(Exception):
    """No sound card can be used: the optional `sounddevice` package or PortAudio is missing, no such device, or the
    device failed."""


class SoundLibrary(Protocol):
    """What this module uses of `sounddevice` (its module object), so that tests can pass a fake device."""

    PortAudioError: type[Exception]

    def query_devices(self, device: int | None = None, kind: Kind | None = None) -> Any: ...

    def query_hostapis(self, index: int) -> Any: ...

    # sounddevice.InputStream / OutputStream: a context manager that runs `callback` on PortAudio's thread.
    def InputStream(self, **options: Any) -> Any: ...

    def OutputStream(self, **options: Any) -> Any: ...


def sound_library(flag: str) -> SoundLibrary:
    """The `sounddevice` module; AudioDeviceError naming `flag` when it (or the PortAudio library) is missing."""
    try:
        # Imported here: sounddevice is optional, and it loads the PortAudio library when imported.
        import sounddevice
    except (ImportError, OSError) as error:  # OSError: the package is there but PortAudio is not
        raise AudioDeviceError(
            f"{flag} needs the optional 'sounddevice' package and PortAudio (pip install sounddevice): {error}"
        ) from None
    return sounddevice


def describe_devices(library: SoundLibrary) -> str:
    """Every device PortAudio sees, with the index and name that --input-device / --output-device take."""
    devices = _devices(library)
    if not devices:
        return "no audio devices found"
    defaults = {_default_index(library, "input"): "default input", _default_index(library, "output"): "default output"}
    lines = ["index  name (host API): input/output channels, default rate"]
    for device in devices:
        index = int(device["index"])
        host = library.query_hostapis(int(device["hostapi"]))["name"]
        marks = [label for default, label in defaults.items() if default == index]
        lines.append(
            f"{index:5d}  {device['name']} ({host}): {device['max_input_channels']} in, "
            f"{device['max_output_channels']} out, {device['default_samplerate']:.0f} Hz"
            + (f"  [{', '.join(marks)}]" if marks else "")
        )
    return "\n".join(lines)


def choose_device(library: SoundLibrary, spec: str | None, kind: Kind) -> int | None:
    """The index of the device `spec` names: an index, or a part of one device's name (any case); None (the
    system's default device) when `spec` is None. AudioDeviceError when none, or several, match."""
    if spec is None:
        return None
    usable = [device for device in _devices(library) if device[f"max_{kind}_channels"] > 0]
    if spec.strip().isdigit():
        matches = [device for device in usable if int(device["index"]) == int(spec)]
    else:
        exact = [device for device in usable if device["name"].lower() == spec.lower()]
        matches = exact or [device for device in usable if spec.lower() in device["name"].lower()]
    if len(matches) == 1:
        return int(matches[0]["index"])
    names = ", ".join(f"{device['index']}: {device['name']}" for device in (matches or usable)) or "none"
    if matches:
        raise AudioDeviceError(f"{spec!r} matches several {kind} devices ({names}); give its index")
    raise AudioDeviceError(f"no {kind} device matches {spec!r}; {kind} devices: {names} (see --list-devices)")


def device_rate(library: SoundLibrary, device: int | None, kind: Kind) -> int:
    """The device's own sample rate: not every device opens at 48 kHz, and resampling here is exact and cheap."""
    try:
        return int(library.query_devices(device, kind)["default_samplerate"])
    except library.PortAudioError as error:
        raise AudioDeviceError(f"no {kind} device: {error}") from None


def _devices(library: SoundLibrary) -> list[dict[str, Any]]:
    return list(library.query_devices())


def _default_index(library: SoundLibrary, kind: Kind) -> int | None:
    try:
        return int(library.query_devices(None, kind)["index"])
    except library.PortAudioError:
        return None  # no default device of this kind


class Microphone:
    """An input device as 20 ms Opus packets at 48 kHz until `stop()`."""

    def __init__(self, library: SoundLibrary, device: int | None = None) -> None:
        self._library = library
        self._device = device  # None: the system's default input
        self._captured: asyncio.Queue[np.ndarray | None] = asyncio.Queue()

    def stop(self) -> None:
        """Ends `packets()` after what was captured so far; safe to call from a signal handler on the loop."""
        self._captured.put_nowait(None)

    async def packets(self) -> AsyncGenerator[bytes, None]:
        """Opens the device and yields its audio as Opus packets until `stop()`; closing the generator closes it."""
        loop = asyncio.get_running_loop()

        def on_audio(samples: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
            # PortAudio calls this on its own thread and reuses the buffer afterwards: copy, then hand to the loop.
            loop.call_soon_threadsafe(self._captured.put_nowait, samples[:, 0].copy())

        rate = device_rate(self._library, self._device, "input")
        resampler = StreamingResampler(rate, SAMPLE_RATE)
        chunker: Chunker[np.ndarray] = Chunker(FRAME_SAMPLES)
        encoder = OpusEncoder()
        try:
            with self._library.InputStream(
                device=self._device, samplerate=rate, channels=1, dtype="float32", callback=on_audio
            ):
                # Under 20 ms may stay buffered when stop() arrives; that is after the speaker pressed Ctrl+C.
                while (captured := await self._captured.get()) is not None:
                    for frame in chunker.push(resampler.push(torch.from_numpy(captured)).numpy()):
                        yield encoder.encode(frame)
        except self._library.PortAudioError as error:
            raise AudioDeviceError(f"the microphone failed: {error}") from None


@dataclass(frozen=True)
class PlaybackStats:
    played_s: float  # audio handed to the device, silence for underruns not included
    underruns: int  # times the buffer ran dry while playing
    underrun_ms: float  # silence the device got in their place
    dropped_ms: float  # audio dropped because the buffer was full (the stream outran the device)
    device_underflows: int  # callbacks in which PortAudio itself reported an output underflow

    def describe(self) -> str:
        return (
            f"played {self.played_s:.2f} s; underruns: {self.underruns} ({self.underrun_ms:.0f} ms of silence), "
            f"dropped: {self.dropped_ms:.0f} ms, device underflows: {self.device_underflows}"
        )


class _Ring:
    """A bounded FIFO of samples shared by the loop (writer) and PortAudio's thread (reader)."""

    def __init__(self, capacity: int) -> None:
        self._data = np.zeros(capacity, dtype=np.float32)
        self._start = 0
        self._size = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._size

    def write(self, samples: np.ndarray) -> int:
        """Appends the samples, dropping the oldest ones that do not fit; returns how many were dropped."""
        capacity = len(self._data)
        with self._lock:
            dropped = max(0, self._size + len(samples) - capacity)
            skipped = max(0, len(samples) - capacity)  # more than the whole buffer: only its end can stay
            samples = samples[skipped:]
            discard = dropped - skipped
            self._start, self._size = (self._start + discard) % capacity, self._size - discard
            end = (self._start + self._size) % capacity
            first = min(len(samples), capacity - end)
            self._data[end : end + first] = samples[:first]
            self._data[: len(samples) - first] = samples[first:]
            self._size += len(samples)
            return dropped

    def read_into(self, out: np.ndarray) -> int:
        """Moves up to len(out) of the oldest samples into `out`; returns how many."""
        capacity = len(self._data)
        with self._lock:
            count = min(len(out), self._size)
            first = min(count, capacity - self._start)
            out[:first] = self._data[self._start : self._start + first]
            out[first:count] = self._data[: count - first]
            self._start, self._size = (self._start + count) % capacity, self._size - count
            return count


class Player:
    """Plays 48 kHz audio on an output device as it arrives, through a bounded buffer (see the module's docstring).

    Use as a context manager: entering opens the device; `push` the audio from the event loop; `finish()` plays out
    what is buffered; leaving closes the device. `stats` counts underruns and drops.
    """

    def __init__(
        self,
        library: SoundLibrary,
        device: int | None = None,
        *,
        prebuffer_s: float = PLAY_PREBUFFER_S,
        headroom_s: float = PLAY_HEADROOM_S,
    ) -> None:
        self._library = library
        self._device = device  # None: the system's default output
        self.rate = device_rate(library, device, "output")
        self._resampler = StreamingResampler(SAMPLE_RATE, self.rate)
        self._prebuffer = round(prebuffer_s * self.rate)
        self._ring = _Ring(self._prebuffer + round(headroom_s * self.rate))
        self._playing = False  # the prebuffer filled; False again after an underrun
        self._started = False  # played once: silence from now on, until the end, is an underrun
        self._ending = False  # no more audio comes: play out what is left without waiting for a prebuffer
        self._drained = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream: Any = None
        self._played = self._underruns = self._underrun_samples = self._dropped = self._underflows = 0

    def __enter__(self) -> Player:
        self._loop = asyncio.get_running_loop()
        try:
            self._stream = self._library.OutputStream(
                device=self._device, samplerate=self.rate, channels=1, dtype="float32", callback=self._callback
            )
            self._stream.__enter__()
        except self._library.PortAudioError as error:
            raise AudioDeviceError(f"the output device failed: {error}") from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._stream is not None:
            self._stream.__exit__(*exc_info)
            self._stream = None

    def push(self, samples_48k: np.ndarray) -> None:
        """Queues audio for the device; never blocks (a full buffer drops its oldest audio, counted)."""
        samples = self._resampler.push(torch.from_numpy(samples_48k)).numpy()
        self._dropped += self._ring.write(samples)

    async def finish(self) -> None:
        """No more audio: plays out what is buffered, then returns (or after the time that should take)."""
        self._dropped += self._ring.write(self._resampler.flush().numpy())
        self._ending = True
        try:
            async with asyncio.timeout(len(self._ring) / self.rate + DRAIN_SLACK_S):
                await self._drained.wait()
        except TimeoutError:
            pass  # the device stopped pulling (it failed or was unplugged): what is left is not played

    @property
    def stats(self) -> PlaybackStats:
        return PlaybackStats(
            played_s=self._played / self.rate,
            underruns=self._underruns,
            underrun_ms=1000 * self._underrun_samples / self.rate,
            dropped_ms=1000 * self._dropped / self.rate,
            device_underflows=self._underflows,
        )

    def _callback(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        # On PortAudio's thread: no allocation beyond the ring's copy, no waiting on the loop.
        if status is not None and getattr(status, "output_underflow", False):
            self._underflows += 1
        out = outdata[:, 0]
        if not self._playing and (self._ending or len(self._ring) >= self._prebuffer):
            self._playing = self._started = True
        count = self._ring.read_into(out) if self._playing else 0
        out[count:] = 0.0
        self._played += count
        if count == frames:
            return
        if self._ending:
            if self._loop is not None and not self._drained.is_set():
                self._loop.call_soon_threadsafe(self._drained.set)
        elif self._started:  # before the first audio arrives, silence is no underrun
            self._underrun_samples += frames - count
            if self._playing:
                self._underruns += 1
                self._playing = False
