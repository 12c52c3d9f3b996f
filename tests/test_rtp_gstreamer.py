"""Interop with real GStreamer (gst-launch-1.0; Debian: gstreamer1.0-tools, -plugins-base, -plugins-good): the two
pipelines the README gives users, against an RTP call converting with an identity converter (output = input,
delayed). The control socket is client.rtp_control's, as a user would hold it."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile

from app.audio.opus import SAMPLE_RATE
from app.serving.converter import ConverterService
from bench.parity import ParitySet
from client.rtp_control import rtp_call
from tests.test_rtp import local_server
from tests.test_webrtc_unit import correlation_at_best_lag, identity_converter, source_48k

__all__ = ["identity_converter"]  # a fixture, used by name

GST = "gst-launch-1.0"
PIPELINE_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def sender(wav: Path, host: str, port: int) -> list[str]:
    """The README's sending pipeline: any audio file as RTP Opus, in real time (udpsink syncs to the clock)."""
    return [
        GST, "-q", "filesrc", f"location={wav}", "!", "decodebin", "!", "audioconvert", "!", "audioresample", "!",
        "opusenc", "!", "rtpopuspay", "pt=96", "!", "udpsink", f"host={host}", f"port={port}",
    ]  # fmt: skip


def receiver(wav: Path, port: int) -> list[str]:
    """The README's receiving pipeline: RTP Opus on a UDP port into a WAV file (-e: finish the file on Ctrl+C)."""
    caps = "application/x-rtp,media=audio,encoding-name=OPUS,clock-rate=48000,payload=96"
    return [
        GST, "-q", "-e", "udpsrc", f"port={port}", f"caps={caps}", "!", "rtpjitterbuffer", "!", "rtpopusdepay", "!",
        "opusdec", "!", "audioconvert", "!", "wavenc", "!", "filesink", f"location={wav}",
    ]  # fmt: skip


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def running(command: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_gst_launch_pipelines_send_and_receive_the_converted_voice(
    identity_converter: tuple[ConverterService, str], parity: ParitySet, tmp_path: Path
) -> None:
    assert shutil.which(GST), f"{GST} is not installed: apt-get install gstreamer1.0-tools gstreamer1.0-plugins-good"
    converter, voice_id = identity_converter
    audio = source_48k(parity, 3.0)
    sent, received = tmp_path / "in.wav", tmp_path / "out.wav"
    soundfile.write(sent, audio, SAMPLE_RATE, subtype="PCM_16")
    reply_port = free_udp_port()

    async def run() -> tuple[dict, dict]:
        async with local_server(converter, voice_id) as server:
            base_url = server.url.removesuffix("/v1/rtp").replace("ws://", "http://")
            with running(receiver(received, reply_port)) as listening:
                async with rtp_call(base_url, server.token, voice_id, reply_to=("127.0.0.1", reply_port)) as call:
                    with running(sender(sent, call.host, call.port)) as sending:
                        output, _ = await asyncio.to_thread(sending.communicate, timeout=PIPELINE_TIMEOUT_S)
                        assert sending.returncode == 0, output.decode()
                    await asyncio.sleep(0.3)  # the last packets reach the server before `end`
                    end = await call.hang_up()
                    ready = call.events[0]
                await asyncio.sleep(0.3)  # and the last converted packets reach the receiver
                listening.send_signal(signal.SIGINT)  # -e: an end of stream, so that wavenc finishes the file
                output, _ = await asyncio.to_thread(listening.communicate, timeout=STOP_TIMEOUT_S)
                assert listening.returncode == 0, output.decode()
        return ready, end

    ready, end = asyncio.run(run())
    assert end["type"] == "end" and end["blocks"] > 0 and end["dropped_ms"] == 0, end
    stereo, rate = soundfile.read(received, dtype="float32", always_2d=True)  # opusdec decodes to stereo
    assert rate == SAMPLE_RATE
    output = stereo.mean(axis=1)
    block = ready["block_ms"] * SAMPLE_RATE // 1000
    assert np.sqrt(np.mean(output**2)) > 0.1 * np.sqrt(np.mean(audio**2))  # not silence
    correlation, delay = correlation_at_best_lag(audio[: len(audio) - block], output)
    assert correlation >= 0.9 and 0 <= delay < SAMPLE_RATE, (correlation, delay)
    # The input's length comes back, after the constant delay (model, codecs, both jitter buffers).
    assert abs(len(output) - delay - len(audio)) <= block, (len(output), delay, len(audio), block)
