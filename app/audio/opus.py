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
- many malformed packets still decode (Opus has no checksum); libopus rejects only structurally invalid ones;
- the wrapper has no option for libopus' DTX (OPUS_SET_DTX; unknown options are ignored without a word), and
  digital silence still costs a packet every 20 ms: 3 bytes in CELT, about 21 with in-band FEC (SILK). The encoder
  does what DTX does for such silence itself (`dtx=True`, see `OpusEncoder.encode`).
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
# Discontinuous transmission: a frame whose every sample rounds to 0 in 16 bits is silence. After
# DTX_AFTER_SILENT_FRAMES silent frames (libopus' own DTX waits as long: by then the receiver's decoder holds only
# silence, so concealing what is not sent gives silence, not an echo of the last sound), the encoder sends one
# TOC-only packet (a code-0 packet with an empty frame: the receiver's decoder conceals it, and a WebRTC receiver
# takes it as the start of DTX, as Chrome's sender does), then nothing, except a real packet every
# DTX_REFRESH_FRAMES (libopus' DTX interval, 400 ms), which keeps a receiver's clock and jitter estimate fed.
DTX_SILENCE_PEAK = 0.5 / 32768
DTX_AFTER_SILENT_FRAMES = 10
DTX_REFRESH_FRAMES = 20


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

    def __init__(self, bitrate: int = 32000, expected_loss_percent: int = 0, dtx: bool = False) -> None:
        """`expected_loss_percent` > 0 turns on in-band FEC (for UDP): each packet then also carries a coarse copy
        of the previous frame, sized for that loss, which a receiver decodes when the previous packet is lost.
        `dtx`: silence costs (almost) no packets; `encode` returns b"" for a frame that needs none (RTP, WebRTC)."""
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
        self._dtx = dtx
        self._silent_frames = 0  # in a row, this one included

    def encode(self, frame: np.ndarray) -> bytes:
        """Encodes FRAME_SAMPLES mono samples in [-1, 1]. The last `delay_samples` of a stream only come out once
        one more frame (silence, for instance) has been encoded after them. With `dtx`, b"" means: send nothing."""
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
        # Encoded even when it is not sent: the encoder's state runs on as if every frame went out, so the packet that
        # ends a silence is a normal one.
        packet = bytes(packets[0])
        return self._discontinuous(packet, frame) if self._dtx else packet

    def _discontinuous(self, packet: bytes, frame: np.ndarray) -> bytes:
        """DTX (DTX_SILENCE_PEAK): the packet, its TOC byte alone, or b"" for nothing to send."""
        silent = float(np.max(np.abs(frame))) < DTX_SILENCE_PEAK
        self._silent_frames = self._silent_frames + 1 if silent else 0
        into_dtx = self._silent_frames - DTX_AFTER_SILENT_FRAMES - 1  # the first silent frames are sent in full
        if into_dtx < 0:
            return packet
        if into_dtx == 0:
            return bytes([packet[0] & 0xFC])  # the same configuration, frame count code 0, no frame data
        return packet if into_dtx % DTX_REFRESH_FRAMES == 0 else b""
