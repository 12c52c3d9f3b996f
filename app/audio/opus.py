"""Opus packets to and from 48 kHz mono float32 frames of 20 ms, on the libopus bundled with PyAV.

One packet is one 20 ms frame: what browsers send when WebCodecs' `AudioEncoder` is configured with
`opus: {frameDuration: 20000}` and what WebRTC uses by default. Packets are raw Opus (no Ogg, no OpusHead), so the
decoder applies no pre-skip: decoded audio lags the encoder's input by `LOOKAHEAD_SAMPLES`.

Behaviour of PyAV 18.1 / FFmpeg's libopus wrapper (libopus 1.6.1), measured when this was written:
- the encoder returns exactly one packet for each 960-sample frame, at once: FFmpeg queues nothing beyond libopus'
  own lookahead, which lives inside the libopus state. Frame timestamps are not needed for this (the first packet's
  pts is -312 when they are set, which is how FFmpeg reports the lookahead as initial padding);
- FFmpeg's libopus decoder outputs int16 unless `request_sample_fmt` asks for float;
- an empty packet is FFmpeg's end-of-stream signal: after it the decoder context refuses every packet, so empty
  packets never reach it;
- many malformed packets still decode (Opus has no checksum); libopus rejects only structurally invalid ones.
"""

from __future__ import annotations

import av
import numpy as np

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms at 48 kHz
# RFC 6716 section 3.2.1: one compressed Opus frame is at most 1275 bytes. A packet carrying one frame (code 0) adds
# its one-byte table-of-contents header. Anything longer for 20 ms is padding (only CBR above 510 kbit/s writes it)
# or not Opus at all, and is refused before it reaches libopus.
MAX_FRAME_BYTES = 1275
MAX_PACKET_BYTES = 1 + MAX_FRAME_BYTES
# libopus' encoder lookahead (OPUS_GET_LOOKAHEAD) in the default "audio" application at 48 kHz: 2.5 ms of MDCT
# overlap (120 samples) plus 4 ms of delay compensation (192 samples). Measured here by cross-correlating a broadband
# signal with its decoded round trip: the decoded audio is exactly 312 samples late.
LOOKAHEAD_SAMPLES = 312
# Opus' lowest rate (RFC 6716 abstract) and FFmpeg's cap for one channel (avcodec_open2 fails above it).
MIN_BITRATE = 6000
MAX_BITRATE = 256000


class OpusError(ValueError):
    """A packet that cannot be decoded into one 20 ms frame."""


class OpusDecoder:
    """Decodes a stream of 20 ms Opus packets. One decoder per stream: libopus carries state between packets."""

    def __init__(self) -> None:
        self._context = av.CodecContext.create("libopus", "r")
        self._context.sample_rate = SAMPLE_RATE
        self._context.layout = "mono"
        self._context.options = {"request_sample_fmt": "flt"}
        self._context.open()
        if self._context.format.name != "flt":
            # A fixed-point libopus build would hand back int16 whatever was requested.
            raise RuntimeError(f"libopus decodes to {self._context.format.name}, not float32")

    def decode(self, packet: bytes) -> np.ndarray:
        """Returns the packet's (FRAME_SAMPLES,) float32 samples; raises OpusError for a packet it cannot use."""
        if not packet:
            raise OpusError("empty Opus packet")
        if len(packet) > MAX_PACKET_BYTES:
            raise OpusError(
                f"Opus packet of {len(packet)} bytes is above the {MAX_PACKET_BYTES}-byte limit of one frame"
            )
        try:
            frames = self._context.decode(av.Packet(packet))
        except av.error.InvalidDataError as error:
            # libopus rejected the packet before touching its state, so the next packet decodes normally. The message
            # goes to the client: FFmpeg's wording of the error stays out of it.
            raise OpusError(f"a {len(packet)}-byte packet is not valid Opus") from error
        # Each frame is (1, n): one channel, packed.
        samples = np.concatenate([frame.to_ndarray().reshape(-1) for frame in frames]) if frames else np.empty(0)
        if samples.size != FRAME_SAMPLES:
            raise OpusError(
                f"Opus packet holds {samples.size} samples; the stream must use 20 ms ({FRAME_SAMPLES}) frames"
            )
        return samples


class OpusEncoder:
    """Encodes 20 ms frames into Opus packets, one packet per frame. One encoder per stream."""

    delay_samples = LOOKAHEAD_SAMPLES

    def __init__(self, bitrate: int = 32000, expected_loss_percent: int = 0) -> None:
        """`expected_loss_percent` > 0 turns on in-band FEC (for UDP): each packet then also carries a coarse copy
        of the previous frame, sized for that loss, which a receiver decodes when the previous packet is lost."""
        if not MIN_BITRATE <= bitrate <= MAX_BITRATE:
            raise ValueError(f"Opus bitrate {bitrate} is outside [{MIN_BITRATE}, {MAX_BITRATE}] bit/s")
        self._context = av.CodecContext.create("libopus", "w")
        self._context.sample_rate = SAMPLE_RATE
        self._context.layout = "mono"
        self._context.format = "flt"
        self._context.bit_rate = bitrate
        # Constrained VBR: libopus's default VBR took tonal audio (converted voices are) to twice the target, 67
        # kbit/s for a 32 kbit/s target; constrained keeps a stream near its target, which is what capacity plans use.
        options = {"vbr": "constrained"}
        if expected_loss_percent > 0:
            options |= {"fec": "1", "packet_loss": str(expected_loss_percent)}
        self._context.options = options
        self._context.open()

    def encode(self, frame: np.ndarray) -> bytes:
        """Encodes FRAME_SAMPLES mono samples in [-1, 1]. The last `delay_samples` of a stream only come out once
        one more frame (silence, for instance) has been encoded after them."""
        if frame.shape != (FRAME_SAMPLES,):
            raise ValueError(f"an Opus frame is {FRAME_SAMPLES} mono samples, got shape {frame.shape}")
        if not np.isfinite(frame).all():
            raise ValueError("Opus frame contains NaN or infinite samples")
        samples = np.ascontiguousarray(frame, dtype=np.float32).reshape(1, FRAME_SAMPLES)  # (channels, samples)
        av_frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        av_frame.sample_rate = SAMPLE_RATE
        packets = self._context.encode(av_frame)
        if len(packets) != 1:
            # Never observed (see the module docstring); a silent gap or a merged packet would corrupt the stream.
            raise RuntimeError(f"libopus returned {len(packets)} packets for one frame instead of one")
        return bytes(packets[0])
