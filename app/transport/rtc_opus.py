"""Opus on WebRTC calls, both ways, where aiortc's own handling falls short.

Down (the converted voice): aiortc's encoder is fixed at 96 kbit/s stereo. The output track hands aiortc Opus
packets of its own instead (aiortc sends a track's `av.Packet`s as they are): mono, at `ingress.opus_bitrate`, with
in-band FEC, so a browser rebuilds a lost packet from the next one, and with DTX: silence sends (almost) no packets,
the next packet's RTP timestamp (its pts) saying how long the pause was.

Up (the microphone): aiortc's receive buffer for audio stalls at a lost packet until 16 are held and then throws
away the packets before the gap, one at a time (each loss cost four good packets more, and the call kept 300 ms more
delay); its decoder then skips what is missing, so every lost 20 ms shortened the input. Its receiver takes both
from module names, `aiortc.rtcrtpreceiver.JitterBuffer` and `get_decoder`: for audio the buffer becomes
`OrderingJitterBuffer` (sequence order, a missing packet given up once a few later ones are in, nothing else
dropped), and for Opus the decoder becomes `ConcealingDecoder`, which fills the gap a packet's RTP timestamp shows
before it: from that packet's in-band FEC, else by libopus' PLC. The answer asks the browser for FEC
(`useinbandfec=1`), which it adds when it sees loss.
"""

from __future__ import annotations

import fractions
import re

import av
import numpy as np
from aiortc import RTCRtpCodecParameters, rtcrtpreceiver
from aiortc.codecs.base import Decoder
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket
from av import AudioFrame
from av.frame import Frame

from app.audio.opus import FRAME_SAMPLES, SAMPLE_RATE, OpusEncoder, OpusError
from app.audio.opus_concealment import EXPECTED_LOSS_PERCENT, ConcealingOpusDecoder
from app.transport.rtp_jitter import CONCEAL_STEP, SEQUENCE_MODULO, TIMESTAMP_MODULO, unwrap

TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
S16_SCALE = 32768
# A longer gap is a pause (the sender muted, or its network stalled): conceal it, and a burst of made-up audio
# would reach the session at once, to be dropped as late. The timeline is cut there instead.
MAX_CONCEALED_SAMPLES = SAMPLE_RATE // 2
# A missing packet is given up as lost once this many later ones are in: 60 ms of reordering at 20 ms a packet,
# twice the 30 ms of jitter the service is tested with. It is also the most delay the buffer adds.
REORDER_PACKETS = 3
# A packet this far behind the one due means the sender started its sequence over (aiortc's own buffer's bound).
MAX_MISORDER = 100
_AIORTC_GET_DECODER = rtcrtpreceiver.get_decoder
_AIORTC_JITTER_BUFFER = rtcrtpreceiver.JitterBuffer


class OrderingJitterBuffer:
    """aiortc's receive buffer for audio, in its interface: `add` takes a packet and gives at most one frame.

    An Opus packet is a frame. Packets play in sequence order; a missing one waits until `REORDER_PACKETS` later ones
    are in, then is skipped (the decoder conceals it from the timestamps); late ones and duplicates are dropped, and
    no other. One frame out per packet in means the buffer never drains faster than packets arrive: it holds at most
    `REORDER_PACKETS`, so that much delay is all it adds.
    """

    def __init__(self) -> None:
        self._held: dict[int, RtpPacket] = {}  # by extended sequence number, relative to the first packet's
        self._first: int | None = None
        self._next = 0  # the extended sequence number that plays next
        self._newest = 0

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        """(whether to ask for a key frame: never for audio, the frame that plays next or None)"""
        if self._first is None:
            self._first = packet.sequence_number
        extended = unwrap(packet.sequence_number - self._first, self._newest, SEQUENCE_MODULO)
        if extended < self._next - MAX_MISORDER:  # the sender started over: so does the buffer
            self._held.clear()
            self._first, self._next, self._newest, extended = packet.sequence_number, 0, 0, 0
        if extended >= self._next:
            self._held.setdefault(extended, packet)
            self._newest = max(self._newest, extended)
        if self._next not in self._held and len(self._held) >= REORDER_PACKETS:
            self._next = min(self._held)  # given up as lost
        held = self._held.pop(self._next, None)
        if held is None:
            return False, None
        self._next += 1
        # The payload as is: aiortc depayloads every audio codec to the payload itself.
        return False, JitterFrame(held.payload, held.timestamp)


class OpusPackets:
    """The converted voice as the packets aiortc sends: 20 ms each, timestamped in samples."""

    def __init__(self, bitrate: int) -> None:
        self._encoder = OpusEncoder(bitrate, EXPECTED_LOSS_PERCENT, dtx=True)

    def packet(self, frame_48k: np.ndarray, index: int) -> av.Packet | None:
        """Frame `index`'s packet, or None where DTX sends nothing."""
        payload = self._encoder.encode(frame_48k)
        if not payload:
            return None
        packet = av.Packet(payload)
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


def _jitter_buffer_for(capacity: int, prefetch: int = 0, is_video: bool = False) -> JitterBuffer | OrderingJitterBuffer:
    if is_video:
        return _AIORTC_JITTER_BUFFER(capacity, prefetch, is_video)
    return OrderingJitterBuffer()


def conceal_lost_audio() -> None:
    """Makes every WebRTC receiver of this process made from now on buffer audio in `OrderingJitterBuffer` and
    decode Opus with `ConcealingDecoder` (idempotent).

    aiortc takes neither from its caller: replacing the module names its receiver uses is the only way in, as for
    ICE's host addresses (webrtc.restrict_ice_host_addresses). Video, and every codec but Opus, keep aiortc's own.
    """
    rtcrtpreceiver.get_decoder = _decoder_for
    rtcrtpreceiver.JitterBuffer = _jitter_buffer_for  # type: ignore[misc,assignment]  # a factory: the receiver only calls it


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
