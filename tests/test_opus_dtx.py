"""DTX on the converted voice (app/audio/opus.py, with real libopus): silence costs almost no bytes on RTP and
WebRTC, the receiver's timeline keeps its length, and the pause decodes as silence."""

from __future__ import annotations

import asyncio

import numpy as np
from aiortc.rtp import RtpPacket

from app.audio.opus import DTX_AFTER_SILENT_FRAMES, DTX_REFRESH_FRAMES, FRAME_SAMPLES, SAMPLE_RATE, OpusEncoder
from app.audio.opus_concealment import EXPECTED_LOSS_PERCENT
from app.transport.rtc_opus import OpusPackets
from app.transport.webrtc import ConvertedAudioTrack
from tests.rtp_peer import decode_by_timestamps

PAUSE_FRAMES = 100  # 2 s


def talk_pause_talk() -> np.ndarray:
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    rng = np.random.default_rng(0)
    voice = (0.2 * np.sin(2 * np.pi * 180 * t) + 0.02 * rng.standard_normal(len(t))).astype(np.float32)
    return np.concatenate([voice, np.zeros(PAUSE_FRAMES * FRAME_SAMPLES, np.float32), voice])


def frames_of(audio: np.ndarray) -> list[np.ndarray]:
    return [audio[start : start + FRAME_SAMPLES] for start in range(0, len(audio), FRAME_SAMPLES)]


def as_rtp(payloads: list[bytes]) -> list[bytes]:
    """RTP as the RTP call sends it: a packet per payload, the timestamp counting every frame, sent or not."""
    return [
        RtpPacket(payload_type=96, sequence_number=sent, timestamp=index * FRAME_SAMPLES, payload=payload).serialize()
        for sent, (index, payload) in enumerate((i, p) for i, p in enumerate(payloads) if p)
    ]


def test_silence_costs_far_fewer_bytes_and_the_timeline_keeps_its_length() -> None:
    audio = talk_pause_talk()
    without, encoder = OpusEncoder(32000, EXPECTED_LOSS_PERCENT), OpusEncoder(32000, EXPECTED_LOSS_PERCENT, dtx=True)
    plain = [without.encode(f) for f in frames_of(audio)]
    dtx = [encoder.encode(f) for f in frames_of(audio)]
    pause = slice(50, 50 + PAUSE_FRAMES)
    sent_in_pause = [p for p in dtx[pause] if p]
    # Full packets for the first silent frames, one TOC-only packet, then one every 400 ms.
    assert len(sent_in_pause) <= DTX_AFTER_SILENT_FRAMES + 1 + PAUSE_FRAMES // DTX_REFRESH_FRAMES
    assert [len(p) for p in dtx[pause]][DTX_AFTER_SILENT_FRAMES] == 1
    assert sum(map(len, dtx[pause])) < sum(map(len, plain[pause])) / 3
    assert dtx[:50] == plain[:50]  # sound is encoded exactly as without DTX

    decoded = decode_by_timestamps(as_rtp(dtx))
    assert len(decoded) == len(audio)  # the pause is concealed to its full length: nothing shrinks
    quiet = decoded[(50 + DTX_AFTER_SILENT_FRAMES) * FRAME_SAMPLES : (50 + PAUSE_FRAMES) * FRAME_SAMPLES]
    assert np.max(np.abs(quiet)) < 10 ** (-50 / 20)  # the concealed pause is silence, not an echo of the voice
    talk = decode_by_timestamps(as_rtp(plain))[-SAMPLE_RATE // 2 :]
    after = decoded[-SAMPLE_RATE // 2 :]
    assert np.sqrt(np.mean((after - talk) ** 2)) < 0.25 * np.sqrt(np.mean(talk**2))  # the voice resumes


def test_the_webrtc_track_sends_no_packets_for_silence_and_keeps_the_clock() -> None:
    async def run() -> list[int | None]:
        track = ConvertedAudioTrack(max_buffered_frames=64)
        for frame in frames_of(talk_pause_talk()[: 60 * FRAME_SAMPLES]):
            track.push(frame)
        # 50 frames of voice, then silence (pushed, then the track's own): DTX after 10 silent frames
        return [(await track.recv()).pts for _ in range(50 + DTX_AFTER_SILENT_FRAMES + 2)]

    stamps = asyncio.run(run())
    assert None not in stamps
    gaps = np.diff(np.array(stamps, dtype=np.int64)) // FRAME_SAMPLES
    assert set(gaps[: 50 + DTX_AFTER_SILENT_FRAMES]) == {1}
    assert gaps[50 + DTX_AFTER_SILENT_FRAMES] == DTX_REFRESH_FRAMES  # the pts jumps over what was not sent


def test_opus_packets_are_none_only_in_dtx() -> None:
    packets = OpusPackets(32000)
    silent = np.zeros(FRAME_SAMPLES, np.float32)
    sent = [packets.packet(silent, index) for index in range(DTX_AFTER_SILENT_FRAMES + 3)]
    assert all(packet is not None for packet in sent[: DTX_AFTER_SILENT_FRAMES + 1])
    assert sent[-1] is None
