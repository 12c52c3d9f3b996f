"""An Opus decoder that can conceal lost packets: in-band FEC from the packet after a loss, else libopus' PLC.

FFmpeg's libopus wrapper (app/audio/opus.py) decodes only the packets it is given: it cannot decode the redundancy
(LBRR) that a sender's in-band FEC puts into the NEXT packet, nor ask libopus to extrapolate a missing one (an empty
packet means end of stream to FFmpeg). Over UDP (RTP, WebRTC) packets do get lost, and a frame that is skipped
instead of concealed shortens the input's timeline and clicks. So this calls libopus itself, through ctypes, on
the libopus PyAV already loads: the copy bundled in PyAV's wheel (`av.libs/`), or a system libopus for a PyAV
built from source.

Frames are mono float32 at 48 kHz, like app/audio/opus.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path

import av
import numpy as np

from app.audio.opus import MAX_PACKET_BYTES, SAMPLE_RATE, OpusError

CHANNELS = 1
# The loss in-band FEC on packets this service sends over UDP is sized for: it adds a few kbit/s, and covers single
# losses up to it.
EXPECTED_LOSS_PERCENT = 10
# The longest packet Opus allows is 120 ms (RFC 6716, section 3.2.5): room for any packet a peer sends.
MAX_PACKET_SAMPLES = SAMPLE_RATE * 120 // 1000


@functools.cache
def libopus() -> ctypes.CDLL:
    """The libopus PyAV uses (loading it again returns the same, already loaded, library)."""
    wheel_libs = Path(av.__file__).resolve().parent.parent / "av.libs"
    candidates = sorted(wheel_libs.glob("libopus*.so*")) if wheel_libs.is_dir() else []
    name = str(candidates[0]) if candidates else ctypes.util.find_library("opus")
    if name is None:
        raise RuntimeError("no libopus found: neither in PyAV's wheel nor on the system")
    library = ctypes.CDLL(name)
    library.opus_decoder_create.restype = ctypes.c_void_p
    library.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    library.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
    library.opus_decode_float.restype = ctypes.c_int
    library.opus_decode_float.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_int32,
        ctypes.POINTER(ctypes.c_float),
        ctypes.c_int,
        ctypes.c_int,
    ]
    library.opus_packet_has_lbrr.restype = ctypes.c_int
    library.opus_packet_has_lbrr.argtypes = [ctypes.c_char_p, ctypes.c_int32]
    library.opus_strerror.restype = ctypes.c_char_p
    library.opus_strerror.argtypes = [ctypes.c_int]
    return library


class ConcealingOpusDecoder:
    """One stream's decoder (libopus keeps state between packets, which is what makes PLC and FEC sound right)."""

    def __init__(self) -> None:
        self._lib = libopus()
        error = ctypes.c_int(0)
        self._state = self._lib.opus_decoder_create(SAMPLE_RATE, CHANNELS, ctypes.byref(error))
        if error.value != 0 or not self._state:
            raise RuntimeError(f"opus_decoder_create failed: {self._lib.opus_strerror(error.value).decode()}")
        self._buffer = (ctypes.c_float * MAX_PACKET_SAMPLES)()

    def __del__(self) -> None:
        state, self._state = getattr(self, "_state", None), None
        if state:
            self._lib.opus_decoder_destroy(state)

    def decode(self, packet: bytes) -> np.ndarray:
        """The packet's samples (any duration Opus allows); OpusError for a packet libopus refuses."""
        if not packet or len(packet) > MAX_PACKET_BYTES * 6:  # up to six 20 ms frames in one 120 ms packet
            raise OpusError(f"an Opus packet of {len(packet)} bytes")
        return self._run(packet, MAX_PACKET_SAMPLES, fec=False)

    def conceal(self, samples: int, next_packet: bytes | None = None) -> np.ndarray:
        """`samples` of audio for a lost stretch: rebuilt from `next_packet`'s in-band FEC when it carries some (it
        covers the last 20 ms before that packet at most; the rest is PLC), else extrapolated by PLC."""
        if samples <= 0:
            return np.zeros(0, np.float32)
        if next_packet and self.has_fec(next_packet):
            fec_samples = min(samples, SAMPLE_RATE // 50)
            plc = self._plc(samples - fec_samples)
            return np.concatenate([plc, self._run(next_packet, fec_samples, fec=True)])
        return self._plc(samples)

    def has_fec(self, packet: bytes) -> bool:
        return self._lib.opus_packet_has_lbrr(packet, len(packet)) == 1

    def _plc(self, samples: int) -> np.ndarray:
        # libopus conceals in steps of 2.5 ms multiples up to a packet's length: ask for 20 ms at a time.
        step = SAMPLE_RATE // 50
        parts = [self._run(None, min(step, samples - done), fec=False) for done in range(0, samples, step)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def _run(self, packet: bytes | None, frame_size: int, fec: bool) -> np.ndarray:
        size = len(packet) if packet is not None else 0
        decoded = self._lib.opus_decode_float(self._state, packet, size, self._buffer, frame_size, int(fec))
        if decoded < 0:
            raise OpusError(f"libopus refused a {size}-byte packet: {self._lib.opus_strerror(decoded).decode()}")
        return np.ctypeslib.as_array(self._buffer)[:decoded].copy()
