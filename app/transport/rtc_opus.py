"""Opus on WebRTC calls, both ways, where aiortc's own handling falls short.

Down (the converted voice): aiortc's encoder is fixed at 96 kbit/s stereo. The output track hands aiortc Opus
packets of its own instead (aiortc sends a track's `av.Packet`s as they are): mono, at `ingress.opus_bitrate`, with
in-band FEC, so a browser rebuilds a lost packet from the next one.

Up (the microphone): aiortc decodes packet by packet and skips what was lost, so every lost 20 ms shortens the
input. Its receiver takes each codec's decoder from `aiortc.rtcrtpreceiver.get_decoder`; for Opus that becomes
`ConcealingDecoder`, which fills the gap a packet's RTP timestamp shows before it: from that packet's in-band FEC,
else by libopus' PLC. The answer asks the browser for FEC (`useinbandfec=1`), which it adds when it sees loss.
"""

from __future__ import annotations

import fractions
import re

import av
import numpy as np
from aiortc import RTCRtpCodecParameters, rtcrtpreceiver
from aiortc.codecs.base import Decoder
from aiortc.jitterbuffer import JitterFrame
from av import AudioFrame
from av.frame import Frame

from app.audio.opus import FRAME_SAMPLES, SAMPLE_RATE, OpusEncoder, OpusError
from app.audio.opus_concealment import EXPECTED_LOSS_PERCENT, ConcealingOpusDecoder
from app.transport.rtp_jitter import CONCEAL_STEP, TIMESTAMP_MODULO, unwrap

TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
S16_SCALE = 32768
# A longer gap is a pause (the sender muted, or its network stalled): conceal it, and a burst of made-up audio
# would reach the session at once, to be dropped as late. The timeline is cut there instead.
MAX_CONCEALED_SAMPLES = SAMPLE_RATE // 2
_AIORTC_GET_DECODER = rtcrtpreceiver.get_decoder


class OpusPackets:
    """The converted voice as the packets aiortc sends: 20 ms each, timestamped in samples."""

    def __init__(self, bitrate: int) -> None:
        self._encoder = OpusEncoder(bitrate, EXPECTED_LOSS_PERCENT)

    def packet(self, frame_48k: np.ndarray, index: int) -> av.Packet:
        packet = av.Packet(self._encoder.encode(frame_48k))
        packet.pts = index * FRAME_SAMPLES
        packet.time_base = TIME_BASE
        return packet


class ConcealingDecoder(Decoder):
    """aiortc's Opus decoder, concealing what its jitter buffer skipped (runs in aiortc's decoder thread)."""

    def __init__(self) -> None:
        self._decoder = ConcealingOpusDecoder()
        self._next: int | None = None  # the extended RTP timestamp the next packet should have
        self.concealed_samples = 0

    def decode(self, encoded_frame: JitterFrame) -> list[Frame]:
        timestamp = encoded_frame.timestamp
        frames: list[Frame] = []
        if self._next is not None:
            timestamp = unwrap(timestamp, self._next, TIMESTAMP_MODULO)
            gap = timestamp - self._next
            if gap < 0:
                return []  # older than what has been played: a duplicate, or later than its turn
            if CONCEAL_STEP <= gap <= MAX_CONCEALED_SAMPLES:
                concealed = self._decoder.conceal(gap - gap % CONCEAL_STEP, encoded_frame.data)
                self.concealed_samples += len(concealed)
                frames.append(_mono_frame(concealed, self._next))
        try:
            samples = self._decoder.decode(encoded_frame.data)
        except OpusError:
            return frames  # the decoder state is untouched: the next packet decodes
        frames.append(_mono_frame(samples, timestamp))
        self._next = timestamp + len(samples)
        return frames


def _mono_frame(samples: np.ndarray, pts: int) -> AudioFrame:
    pcm = np.clip(np.round(samples * S16_SCALE), -S16_SCALE, S16_SCALE - 1).astype(np.int16)
    frame = AudioFrame.from_ndarray(pcm[np.newaxis, :], format="s16", layout="mono")
    frame.sample_rate = SAMPLE_RATE
    frame.pts = pts % TIMESTAMP_MODULO
    frame.time_base = TIME_BASE
    return frame


def _decoder_for(codec: RTCRtpCodecParameters) -> Decoder:
    if codec.mimeType.lower() == "audio/opus":
        return ConcealingDecoder()
    return _AIORTC_GET_DECODER(codec)


def conceal_lost_audio() -> None:
    """Makes every WebRTC receiver of this process decode Opus with `ConcealingDecoder` (idempotent).

    aiortc takes no decoder from its caller: replacing the module function its receiver calls is the only way in,
    as for ICE's host addresses (webrtc.restrict_ice_host_addresses). Every codec but Opus keeps aiortc's decoder.
    """
    rtcrtpreceiver.get_decoder = _decoder_for


def with_opus_fec(sdp: str) -> str:
    """The SDP with `useinbandfec=1` on every Opus payload type: the caller may (and a browser then does, when it
    sees loss) add in-band FEC to its packets."""
    lines = sdp.split("\r\n")
    for payload_type in re.findall(r"^a=rtpmap:(\d+) opus/48000", sdp, flags=re.MULTILINE | re.IGNORECASE):
        prefix = f"a=fmtp:{payload_type} "
        fmtp = next((i for i, line in enumerate(lines) if line.startswith(prefix)), None)
        if fmtp is None:
            rtpmap = next(i for i, line in enumerate(lines) if line.startswith(f"a=rtpmap:{payload_type} "))
            lines.insert(rtpmap + 1, prefix + "useinbandfec=1")
        elif "useinbandfec=" not in lines[fmtp]:
            lines[fmtp] += ";useinbandfec=1"
    return "\r\n".join(lines)
