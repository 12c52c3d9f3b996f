"""Load tool: N concurrent real-time streams through the WebSocket protocol (/v1/stream), or calls over RTP
(/v1/rtp) or WebRTC (/v1/rtc), of any deployment; per run the block latency (server and client side), deadline
misses, refusals and bandwidth per stream each way.

Usage (from the repo root):

    # Any deployment (a cluster, or `serve run serve_config.yaml`), with a voice already there or uploaded first:
    .venv/bin/python -m bench.load --url https://vc.example.com --api-key KEY --voice VOICE_ID --streams 16 --seconds 30
    .venv/bin/python -m bench.load --url http://127.0.0.1:8000 --api-key local-development-key --reference ref.wav
    # A local Serve app this tool starts itself (local Ray, the tiny fixture bundle; identity converter by default):
    .venv/bin/python -m bench.load --local --streams 8 --seconds 10 --json /tmp/load.json
    .venv/bin/python -m bench.load --local --converter model --streams 2     # the tiny model really converting
    .venv/bin/python -m bench.load --local --converter model --streams 1 --transport rtp     # or webrtc
    # The full-size model (random weights, written as a temporary bundle) serving its CPU real-time profile, as
    # `serve run serve_config.yaml` does on a machine without a GPU (README, "CPU real-time profile"):
    .venv/bin/python -m bench.load --local --converter model --model full-size --precision auto --threads 2 \
        --cpu-profile --streams 1 --seconds 30
    # On a machine other Ray users share: a private network namespace, so that port 8000 is this tool's own
    unshare -n sh -c 'ip link set lo up && .venv/bin/python -m bench.load --local --streams 4'

Options: --streams N (4), --seconds of input per stream (10), --capacity C (with --local: sessions the converter
holds; below N it is an overload test), --ramp S (stream i starts i * S / N seconds after the
first; 0.18, one default block; 0 starts all at once), --input FILE (any audio; default the fixture's source,
looped), --setting KEY=VALUE (repeatable: settings every stream sends; none by default, so the server's defaults
apply), --json OUT. With --local: --model (tiny: the fixture bundle; full-size: bench/full_size.py's random-weight
model, written to a temporary bundle for the run, ~0.85 GB; or a bundle directory), --precision (fp32), --threads
(the converter's torch threads, 1), --cpu-profile (the converter serves its CPU real-time profile to streams that
send no settings, as serve_config.yaml does without a GPU; by default the README settings, as in the tests),
--transport (websocket; rtp or webrtc: bench/udp_calls.py, the same input as calls; with --local the ingress serves
RTP and ICE on 127.0.0.1).

What runs: every stream is the client library's own (client/stream_client.py: run_stream), so the protocol is the
real one: a start message, the input as 20 ms Opus packets (32 kbit/s, the client's encoder) sent in real time
against an absolute clock, `realtime: true` (the server paces its output at 20 ms a packet), then `end`. `--local`
starts Ray and the app as bench/serving_overhead.py does (bench/local_app.py: one converter replica with
serve_config.yaml's deployment options, replicas at num_cpus 0 and one torch thread, room for 2N + 1 sessions so that
restarts in bench/soak.py are not refused) and runs one 1.5 s warm-up stream first.

What it reports, over the blocks whose input was complete before the end message (the padded last block and the
blocks that flush the lookahead come at once after it and are left out):
- latency per block, p50/p90/p99/max: `server` is the block event's latency_ms (the packet that completed the block
  arrives at the ingress -> the converted block is ready there; app/serving/live.py); `client` is this process's
  clock from sending the packet that completes the block (its last 180 ms of audio plus the 48 -> 16 kHz
  resampler's 19-sample lookahead: the packet the server's clock starts on) to receiving the block's first output
  packet, which is the first binary message after its block event. It adds the network both ways, the ingress's
  receive and send path and the output pacing: what a listener hears.
- deadline misses: blocks whose server latency exceeds the block's duration (`miss`; `client miss` with the client
  latency), and blocks the server dropped because the stream fell behind (answered with silence: a block event with
  silent, latency 0 and queue 0; also counted as `late` events and their dropped_ms). Dropped blocks are not in the
  latency figures.
- refusals: error events `overloaded` / `rate_limited` (with their retry_after_s), apart from every other error
  (other error events, connections that fail or break).
- bandwidth per stream, each way, in kbit/s per second of audio: Opus payload (the binary messages' bytes over 20 ms
  per packet), and WebSocket (the same plus every text message, each with its RFC 6455 frame header: 2 bytes, + 2
  from 126 bytes on, + a 4-byte mask client -> server; computed from the message sizes, exact for this protocol,
  which uses no extension). Below that, TCP/IP adds ~52 bytes per segment (up to ~21 kbit/s at 50 messages a
  second when each rides its own segment) and TLS ~25 bytes per record: not counted. RTP and WebRTC calls add UDP:
  their datagrams with UDP and IPv4 headers (RTP: RTP header + Opus; WebRTC: SRTP, SRTCP and DTLS; see
  bench/udp_calls.py), their WebSocket figure being the control socket's (events). `total` is WebSocket + UDP, what
  the goal is about: <= 64 kbit/s each way; the table prints the median and the worst stream against it. Client
  latency is measured on WebSocket streams only (the first output message of a block).
The machine this runs on may be shared: the 1-minute load average before and after is in the header.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from websockets.exceptions import InvalidHandshake, InvalidURI

from app.audio.files import read_audio, resample
from app.audio.opus import FRAME_SAMPLES, SAMPLE_RATE
from app.audio.stream_resample import StreamingResampler
from app.environment import CLIENT_API_KEY, client_api_key
from app.model.precision import Precision
from app.serving.config import CPU_REALTIME_PROFILE
from app.streaming.settings import CONTENT_RATE, StreamSettings
from app.transport.protocol import FRAME_MS, ErrorCode
from app.transport.webrtc import restrict_ice_host_addresses
from bench import client_pool, udp_calls
from bench.common import distribution, figure, machine_meta, write_json
from bench.cpu_usage import cpu_snapshot, format_cpu, neighbour_cpu, own_tree
from bench.fixtures import PARITY_A, PARITY_A_SOURCE
from bench.full_size import write_full_size_bundle
from bench.harness import API_KEY, BASE_URL, local_ray
from bench.local_app import deploy
from bench.parity import ParitySet
from bench.streams import dropped_block, kept_block, looped, phases
from client.api import ClientError, get_token, upload_voice
from client.stream_client import (
    Event,
    Outgoing,
    StreamError,
    encode_packets,
    paced_packets,
    parse_setting,
    run_stream,
    start_message,
)

GOAL_KBPS = 64.0  # issue 6: at most this each way per stream
QUANTILES = (50, 90, 99)
REFUSAL_CODES = frozenset({ErrorCode.overloaded.value, ErrorCode.rate_limited.value})
DEFAULT_INPUT = PARITY_A_SOURCE
# Tokens expire (900 s by default); a soak outlives several. A fresh one well before then costs one HTTP call.
TOKEN_REFRESH_S = 300.0
# The connection failures a load run counts as errors and goes on; anything else is a bug in this tool.
STREAM_FAILURES = (StreamError, OSError, InvalidHandshake, InvalidURI)
Outcome = Literal["ok", "miss", "dropped"]
Transport = Literal["websocket", "rtp", "webrtc"]
UDP_CALLS = {"rtp": udp_calls.rtp_call, "webrtc": udp_calls.webrtc_call}
# With --local and an RTP or WebRTC transport: the ingress serves both on loopback, the only interface there may be.
LOOPBACK_UDP_INGRESS = {
    "rtp_enabled": True,
    "rtp_host": "127.0.0.1",
    "rtp_bind_address": "127.0.0.1",
    "ice_host_addresses": ["127.0.0.1"],
    "outbound_networks": ["127.0.0.0/8"],
}


# ---- pure accounting ----------------------------------------------------------------------------------------------


def ws_frame_bytes(payload: int, masked: bool) -> int:
    """One unfragmented WebSocket message on the wire (RFC 6455 section 5.2): header, optional mask, payload."""
    length_bytes = 0 if payload < 126 else 2 if payload < 65536 else 8
    return 2 + length_bytes + (4 if masked else 0) + payload


def kbit_per_s(payload_bytes: int, packets: int) -> float | None:
    """Bit rate per second of audio: the bytes that carried `packets` 20 ms packets, in kbit/s (None without audio)."""
    if packets <= 0:
        return None
    return 8 * payload_bytes / (packets * FRAME_MS / 1000) / 1000


def completing_packet(index: int, block_ms: float, lookahead_48k: int) -> int:
    """The input packet whose arrival completes block `index` at the server: the one carrying the block's last sample
    plus the input resampler's lookahead (`lookahead_48k` samples at 48 kHz), which the server must hold first."""
    last_needed = round((index + 1) * block_ms * SAMPLE_RATE / 1000) + lookahead_48k  # samples, counted from 1
    return -(-last_needed // FRAME_SAMPLES) - 1


@dataclass(frozen=True)
class BlockSample:
    """One live block of one stream: the server's latency_ms, the client's (None when its audio never came)."""

    stream: int
    index: int
    block_ms: float
    server_ms: float
    client_ms: float | None
    dropped: bool
    queue_ms: float = 0.0  # of server_ms, the wait for a batched model step (the rest: the step and the ingress)
    steps: int = 0  # diffusion steps the step ran (0: dropped or silent)


def block_outcome(sample: BlockSample) -> Outcome:
    """dropped (the server gave up on it), miss (converted later than the block lasts: the stream falls behind) or
    ok. By the server's latency: the client's adds the network, which the service does not control."""
    if sample.dropped:
        return "dropped"
    return "miss" if sample.server_ms > sample.block_ms else "ok"


def is_refusal(event: Event) -> bool:
    """An error event that asks the client to come back later (capacity or rate), not a failure."""
    return event.get("type") == "error" and event.get("code") in REFUSAL_CODES


@dataclass(frozen=True)
class Flatness:
    first: float | None
    last: float | None
    ratio: float | None  # last / first
    flat: bool | None  # None: not enough data to say


def flatness(first: float | None, last: float | None, limit: float) -> Flatness:
    """Did a figure stay flat from the first interval to the last: last / first at most `limit`?"""
    if first is None or last is None or first <= 0:
        return Flatness(first, last, None, None)
    ratio = last / first
    return Flatness(first, last, ratio, ratio <= limit)


@dataclass
class Traffic:
    """Bytes one stream moved each way: Opus payload, WebSocket (every message with its frame header) and, for RTP
    and WebRTC calls, UDP (every datagram with its UDP and IPv4 headers)."""

    stream: int
    packets_up: int = 0
    opus_up: int = 0
    ws_up: int = 0
    udp_up: int = 0
    packets_down: int = 0
    opus_down: int = 0
    ws_down: int = 0
    udp_down: int = 0

    def datagrams(self, up: bool, count: int, udp_payload_bytes: int) -> None:
        on_the_wire = udp_payload_bytes + count * udp_calls.UDP_IPV4_HEADER_BYTES
        if up:
            self.udp_up += on_the_wire
        else:
            self.udp_down += on_the_wire

    def audio(self, up: bool, packets: int, opus_bytes: int) -> None:
        """Audio that went in datagrams (a WebSocket stream's is counted from its binary messages)."""
        if up:
            self.packets_up, self.opus_up = self.packets_up + packets, self.opus_up + opus_bytes
        else:
            self.packets_down, self.opus_down = self.packets_down + packets, self.opus_down + opus_bytes

    def sent(self, message: bytes | str) -> None:
        self._count(message, up=True)

    def received(self, message: bytes | str) -> None:
        self._count(message, up=False)

    def _count(self, message: bytes | str, up: bool) -> None:
        size = len(message) if isinstance(message, bytes) else len(message.encode())
        framed = ws_frame_bytes(size, masked=up)  # a client masks what it sends, a server does not
        audio = isinstance(message, bytes)
        if up:
            self.ws_up += framed
            self.packets_up += audio
            self.opus_up += size if audio else 0
        else:
            self.ws_down += framed
            self.packets_down += audio
            self.opus_down += size if audio else 0

    def rates(self) -> dict[str, float | None]:
        """kbit/s per second of audio each way; the other rates over the same audio as the payload's (UDP: None for
        a WebSocket stream, which sends none)."""
        udp = self.udp_up > 0 or self.udp_down > 0
        return {
            "opus_up_kbps": kbit_per_s(self.opus_up, self.packets_up),
            "ws_up_kbps": kbit_per_s(self.ws_up, self.packets_up),
            "udp_up_kbps": kbit_per_s(self.udp_up, self.packets_up) if udp else None,
            "total_up_kbps": kbit_per_s(self.ws_up + self.udp_up, self.packets_up),
            "opus_down_kbps": kbit_per_s(self.opus_down, self.packets_down),
            "ws_down_kbps": kbit_per_s(self.ws_down, self.packets_down),
            "udp_down_kbps": kbit_per_s(self.udp_down, self.packets_down) if udp else None,
            "total_down_kbps": kbit_per_s(self.ws_down + self.udp_down, self.packets_down),
        }


RATE_KEYS = (
    "opus_up_kbps",
    "ws_up_kbps",
    "udp_up_kbps",
    "total_up_kbps",
    "opus_down_kbps",
    "ws_down_kbps",
    "udp_down_kbps",
    "total_down_kbps",
)


def bandwidth(traffic: Sequence[Traffic]) -> dict[str, dict[str, float | bool | None]]:
    """Per rate, the median and worst stream, and whether the worst is within the goal. Over the streams that got
    audio back: a refused one sent its start message and at most the packet its client had in hand, whose rate over
    20 ms of audio says nothing about a stream."""
    served = [t for t in traffic if t.packets_down]
    result: dict[str, dict[str, float | bool | None]] = {}
    for key in RATE_KEYS:
        values = [rate for t in served if (rate := t.rates()[key]) is not None]
        worst = max(values) if values else None
        result[key] = {
            "median": float(np.median(values)) if values else None,
            "max": worst,
            "within_goal": None if worst is None else worst <= GOAL_KBPS,
        }
    return result


@dataclass
class Tally:
    """What the streams of a run (or of one soak interval) saw."""

    blocks: list[BlockSample] = field(default_factory=list)
    streams_started: int = 0
    streams_ended: int = 0  # with the server's end event
    refusals: Counter[str] = field(default_factory=Counter)
    retry_after_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    late_events: int = 0
    dropped_ms: int = 0
    open_ms: list[float] = field(default_factory=list)  # connect -> ready
    traffic: list[Traffic] = field(default_factory=list)  # of the streams that finished
    settings: dict[str, Any] | None = None  # the effective stream settings, from the last ready event

    @classmethod
    def merged(cls, tallies: Sequence[Tally]) -> Tally:
        total = cls()
        for tally in tallies:
            total.blocks += tally.blocks
            total.streams_started += tally.streams_started
            total.streams_ended += tally.streams_ended
            total.refusals.update(tally.refusals)
            total.retry_after_s += tally.retry_after_s
            total.errors += tally.errors
            total.late_events += tally.late_events
            total.dropped_ms += tally.dropped_ms
            total.open_ms += tally.open_ms
            total.traffic += tally.traffic
            total.settings = tally.settings or total.settings
        return total

    def summary(self) -> dict[str, Any]:
        outcomes = Counter(block_outcome(sample) for sample in self.blocks)
        converted = [sample for sample in self.blocks if not sample.dropped]
        client = [s.client_ms for s in converted if s.client_ms is not None]
        return {
            "streams_started": self.streams_started,
            "streams_ended": self.streams_ended,
            "blocks": len(self.blocks),
            "server_ms": distribution([s.server_ms for s in converted], QUANTILES),
            "client_ms": distribution(client, QUANTILES),
            "misses": outcomes["miss"],
            "client_misses": sum(1 for s in converted if s.client_ms is not None and s.client_ms > s.block_ms),
            "dropped_blocks": outcomes["dropped"],
            "late_events": self.late_events,
            "dropped_ms": self.dropped_ms,
            "refusals": dict(self.refusals),
            "retry_after_s": sorted(set(self.retry_after_s)),
            "errors": len(self.errors),
            "error_messages": self.errors[:10],
            "open_ms": distribution(self.open_ms, QUANTILES),
            "bandwidth_kbps": bandwidth(self.traffic),
            "settings": self.settings,
        }


class Ledger:
    """Where the streams write what they see: `current`, which a soak swaps for a fresh one every interval."""

    def __init__(self) -> None:
        self.current = Tally()

    def rotate(self) -> Tally:
        done, self.current = self.current, Tally()
        return done


# ---- streams ------------------------------------------------------------------------------------------------------


class Tokens:
    """Session tokens for one API key, renewed every TOKEN_REFRESH_S (a token is checked when a stream starts).

    A thread lock, and the fetch on a worker thread: the event loop that paces every stream never waits on HTTP,
    N streams restarting together fetch one token, and one Tokens serves the several event loops a run uses."""

    def __init__(self, base_url: str, api_key: str, token: str | None = None) -> None:
        self.base_url, self.api_key = base_url, api_key
        self._token, self._issued = token, time.monotonic()
        self._lock = threading.Lock()

    async def get(self) -> str:
        return await asyncio.to_thread(self._current)

    def _current(self) -> str:
        with self._lock:
            if self._token is None or time.monotonic() - self._issued > TOKEN_REFRESH_S:
                self._token = get_token(self.base_url, self.api_key)
                self._issued = time.monotonic()
            return self._token


def input_lookahead_48k() -> int:
    """Samples at 48 kHz the server's input resampler holds back before a 16 kHz sample is final."""
    return StreamingResampler(SAMPLE_RATE, CONTENT_RATE).delay_in_samples


@dataclass
class Target:
    base_url: str
    voice_id: str
    tokens: Tokens
    description: str
    settings: dict[str, Any] | None = None  # what every stream's start message asks for; None: the server's defaults
    # Where the server's clock of a block starts (see completing_packet); 0 for a server that cuts 48 kHz blocks.
    lookahead_48k: int = field(default_factory=input_lookahead_48k)
    transport: Transport = "websocket"


class StreamProbe:
    """The hooks of one stream: when each input packet went out, when each block's first output packet came back,
    the events, and the bytes each way. Live blocks go to the ledger as soon as their first audio arrives."""

    def __init__(self, stream: int, packets: Sequence[bytes], ledger: Ledger, lookahead_48k: int) -> None:
        self.stream = stream
        self.packets = packets
        self.ledger = ledger
        self.lookahead_48k = lookahead_48k
        self.traffic = Traffic(stream)
        self.sent_at: list[float] = []
        self.block_ms: float | None = None
        self.retry_after_s: float | None = None  # set when the server refused the stream
        self._pending: Event | None = None  # the last block event, until its first audio packet
        self._connect_at = time.monotonic()

    async def outgoing(self) -> AsyncGenerator[Outgoing, None]:
        """The packets in real time; each one's send time is taken as the sender takes it (it sends at once)."""
        async for packet in paced_packets(self.packets, realtime=True):
            assert isinstance(packet, bytes)  # no set_voice here
            self.sent_at.append(time.monotonic())
            self.traffic.sent(packet)
            yield packet
        self.traffic.sent(json.dumps({"type": "end"}))  # what the client sends once this generator is done

    def on_message(self, message: bytes | str) -> None:
        self.traffic.received(message)
        if isinstance(message, bytes) and self._pending is not None:
            self._settle(self._pending, time.monotonic())
            self._pending = None

    def on_event(self, event: Event) -> None:
        tally = self.ledger.current
        kind = event["type"]
        if kind == "ready":
            self.block_ms = float(event["block_ms"])
            tally.settings = event.get("settings")
            tally.open_ms.append(1000 * (time.monotonic() - self._connect_at))
        elif kind == "block":
            if self._pending is not None:  # a block without audio: it has no client latency
                self._settle(self._pending, None)
            self._pending = event
        elif kind == "late":
            tally.late_events += 1
            tally.dropped_ms += int(event["dropped_ms"])
        elif kind == "end":
            tally.streams_ended += 1
        elif is_refusal(event):
            tally.refusals[event["code"]] += 1
            self.retry_after_s = float(event.get("retry_after_s") or 1.0)
            tally.retry_after_s.append(self.retry_after_s)
        elif kind == "error":
            tally.errors.append(f"stream {self.stream}: {event.get('code')}: {event.get('message')}")

    def finish(self) -> None:
        if self._pending is not None:
            self._settle(self._pending, None)
            self._pending = None
        self.ledger.current.traffic.append(self.traffic)

    def _settle(self, event: Event, first_audio_at: float | None) -> None:
        input_ms = len(self.packets) * FRAME_MS
        if self.block_ms is None or not kept_block(event, self.block_ms, input_ms):
            return  # a padded or flush block: converted after the end message, not live
        packet = completing_packet(event["index"], self.block_ms, self.lookahead_48k)
        client_ms = None
        if first_audio_at is not None and packet < len(self.sent_at):
            client_ms = 1000 * (first_audio_at - self.sent_at[packet])
        sample = BlockSample(
            self.stream,
            event["index"],
            self.block_ms,
            float(event["latency_ms"]),
            client_ms,
            dropped_block(event),
            float(event.get("queue_ms", 0.0)),
            int(event.get("steps", 0)),
        )
        self.ledger.current.blocks.append(sample)


async def run_one_stream(target: Target, stream: int, packets: Sequence[bytes], ledger: Ledger) -> float | None:
    """One stream from connect to end; returns the retry_after_s of a refusal, else None."""
    ledger.current.streams_started += 1
    try:
        token = await target.tokens.get()
        start = start_message(token, target.voice_id, realtime=True, seed=stream, settings=target.settings)
    except ClientError as error:
        ledger.current.errors.append(f"stream {stream}: no token: {error}")
        return None
    probe = StreamProbe(stream, packets, ledger, target.lookahead_48k)  # its clock of the session opening starts here
    try:
        if target.transport == "websocket":
            probe.traffic.sent(json.dumps(start))  # the client sends it exactly so
            await run_stream(
                target.base_url, start, probe.outgoing(), on_event=probe.on_event, on_message=probe.on_message
            )
        else:
            await UDP_CALLS[target.transport](target.base_url, start, packets, probe)
    except STREAM_FAILURES as error:
        ledger.current.errors.append(f"stream {stream}: {type(error).__name__}: {error}")
    finally:
        probe.finish()
    return probe.retry_after_s


async def load_run(target: Target, packets: Sequence[bytes], streams: int, ramp_s: float, ledger: Ledger) -> None:
    """`streams` streams of `packets` at once, stream i starting i * ramp_s / streams seconds after the first."""

    async def delayed(stream: int, offset: float) -> None:
        await asyncio.sleep(offset)
        await run_one_stream(target, stream, packets, ledger)

    offsets = phases(streams, ramp_s, aligned=ramp_s == 0)
    await asyncio.gather(*(delayed(stream, offset) for stream, offset in enumerate(offsets)))


def warm_up(target: Target, audio_48k: np.ndarray) -> None:
    """bench.client_pool's warm-up stream, with the settings the target's streams send."""
    token = asyncio.run(target.tokens.get())
    client_pool.warm_up(target.base_url, token, target.voice_id, audio_48k, target.settings)


# ---- targets ------------------------------------------------------------------------------------------------------


def port_in_use(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((parts.hostname or "127.0.0.1", parts.port or 80)) == 0


@dataclass(frozen=True)
class LocalModel:
    """What the local app's converter runs (with --local)."""

    model: str = "tiny"  # tiny (the fixture bundle), full-size (random weights, a temporary bundle) or a bundle dir
    precision: str | None = None  # None: the harness's (fp32)
    threads: int = 1  # the converter's torch threads
    cpu_profile: bool = False  # serve the CPU real-time profile to streams that send no settings

    def describe(self, converter: str) -> str:
        parts = [f"{converter} converter", f"{self.model} model", f"{self.threads} torch thread(s)"]
        parts += [self.precision or "fp32", "CPU profile" if self.cpu_profile else "README settings by default"]
        return ", ".join(parts)


@contextlib.contextmanager
def model_bundle(model: str) -> Iterator[str | None]:
    """The bundle directory the converter loads; None: the tiny fixture bundle. `full-size` is written for the run
    into a temporary directory (random weights are never committed) and removed after."""
    if model == "tiny":
        yield None
    elif model == "full-size":
        with tempfile.TemporaryDirectory(prefix="load-model-") as directory:
            print("writing the full-size random-weight model as a temporary bundle ...", file=sys.stderr)
            yield str(write_full_size_bundle(Path(directory) / "model"))
    else:
        yield model


@contextlib.contextmanager
def local_target(
    converter: str,
    max_sessions: int,
    local: LocalModel | None = None,
    settings: dict[str, Any] | None = None,
    transport: Transport = "websocket",
) -> Iterator[Target]:
    """A local Ray with the app on it (the tiny fixture bundle unless `local` says otherwise; `converter` identity or
    model), torn down after."""
    local = local or LocalModel()
    ingress = None
    if transport != "websocket":
        ingress = LOOPBACK_UDP_INGRESS
        restrict_ice_host_addresses(["127.0.0.1"])  # this process's WebRTC caller too: loopback may be all there is
    if port_in_use(BASE_URL):
        raise SystemExit(
            f"something already listens on {BASE_URL} (another Serve?): run in a private network namespace, "
            "unshare -n sh -c 'ip link set lo up && ...'"
        )
    with (
        model_bundle(local.model) as bundle,
        tempfile.TemporaryDirectory(prefix="load-voices-") as voices,
        local_ray(),
    ):
        identity = converter == "identity"
        overrides: dict[str, Any] = {"torch_threads": local.threads}
        overrides |= {"model": bundle} if bundle is not None else {}
        overrides |= {"precision": local.precision} if local.precision is not None else {}
        overrides |= {"cpu_settings": CPU_REALTIME_PROFILE} if local.cpu_profile else {}
        app, _ = deploy(ParitySet(PARITY_A), Path(voices), max_sessions, 1, identity, ingress, **overrides)
        tokens = Tokens(app.base_url, API_KEY, app.token)
        description = f"local app, {local.describe(converter)}, 1 replica, {transport}"
        yield Target(app.base_url, app.voice_id, tokens, description, settings, transport=transport)


def remote_target(
    url: str,
    api_key: str,
    voice: str | None,
    reference: Path | None,
    settings: dict[str, Any] | None = None,
    transport: Transport = "websocket",
) -> Target:
    tokens = Tokens(url, api_key)
    voice_id = voice
    if reference is not None:
        uploaded = upload_voice(url, asyncio.run(tokens.get()), reference, reference.stem)
        voice_id = uploaded["voice_id"]
        print(f"uploaded {reference} as voice {voice_id} ({uploaded['seconds']:.1f} s)", file=sys.stderr)
    assert voice_id is not None
    return Target(url, voice_id, tokens, f"{url}, {transport}", settings, transport=transport)


@contextlib.contextmanager
def open_target(args: argparse.Namespace, max_sessions: int) -> Iterator[Target]:
    settings = dict(args.setting) or None
    if args.local:
        local = LocalModel(args.model, args.precision, args.threads, args.cpu_profile)
        with local_target(args.converter, max_sessions, local, settings, args.transport) as target:
            yield target
    else:
        yield remote_target(args.url, args.api_key, args.voice, args.reference, settings, args.transport)


def read_input(path: Path, seconds: float) -> np.ndarray:
    """Any audio file as 48 kHz mono, looped or cut to `seconds`."""
    audio = read_audio(path)
    samples = resample(torch.from_numpy(audio.samples), audio.rate, SAMPLE_RATE).numpy()
    return looped(samples, seconds, SAMPLE_RATE)


# ---- command line -------------------------------------------------------------------------------------------------


def add_target_args(parser: argparse.ArgumentParser) -> None:
    """Where the streams go and what they send: shared with bench/soak.py."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="the deployment's base URL, e.g. https://vc.example.com")
    where.add_argument("--local", action="store_true", help="start a local Ray + app (tiny fixture bundle)")
    parser.add_argument("--api-key", default=client_api_key(), help=f"with --url (${CLIENT_API_KEY})")
    parser.add_argument("--voice", help="with --url: id of a voice on the server")
    parser.add_argument("--reference", type=Path, help="with --url: upload this recording as the voice first")
    parser.add_argument("--converter", choices=("identity", "model"), default="identity", help="with --local")
    parser.add_argument("--model", default="tiny", help="with --local: tiny, full-size or a bundle dir (%(default)s)")
    parser.add_argument("--precision", choices=[p.value for p in Precision], help="with --local (fp32)")
    parser.add_argument("--threads", type=int, default=1, help="with --local: converter torch threads (%(default)s)")
    parser.add_argument(
        "--cpu-profile", action="store_true", help="with --local: the converter serves its CPU real-time profile"
    )
    parser.add_argument(
        "--setting", type=parse_setting, action="append", default=[], metavar="KEY=VALUE", help="sent by every stream"
    )
    parser.add_argument("--streams", type=int, default=4, help="concurrent streams (%(default)s)")
    parser.add_argument("--ramp", type=float, default=0.18, help="seconds over which the starts spread (%(default)s)")
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="audio to send, looped (the fixture's)")
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    parser.add_argument(
        "--transport", choices=("websocket", "rtp", "webrtc"), default="websocket", help="how streams connect"
    )


def check_target_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.url is not None and (args.api_key is None or (args.voice is None) == (args.reference is None)):
        parser.error(f"--url needs --api-key (or ${CLIENT_API_KEY}) and one of --voice, --reference")
    if args.streams < 1 or args.ramp < 0:
        parser.error("--streams must be at least 1 and --ramp not negative")
    local_only = args.model != "tiny" or args.precision is not None or args.threads != 1 or args.cpu_profile
    if local_only and not args.local:
        parser.error("--model, --precision, --threads and --cpu-profile need --local")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_target_args(parser)
    parser.add_argument("--seconds", type=float, default=10.0, help="input per stream, in seconds (%(default)s)")
    parser.add_argument(
        "--capacity",
        type=int,
        help="with --local: sessions the converter holds (default 2N + 1); fewer than --streams is an overload test: "
        "the excess is refused at once with a retry-after while the admitted streams go on",
    )
    args = parser.parse_args(argv)
    check_target_args(parser, args)
    if args.seconds < 1:
        parser.error("--seconds must be at least 1")
    if args.capacity is not None and (args.capacity < 1 or not args.local):
        parser.error("--capacity needs --local and at least 1")
    return args


def format_report(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    block_ms = meta["block_ms"]
    lines = [
        f"{meta['title']} | {meta['target']} | {meta['streams']} streams x {meta['seconds']:.0f} s, real time, ramp "
        f"{meta['ramp_s']:.2f} s | {meta['cpus']} CPUs | load avg {meta['load_average_1min'][0]:.2f} -> "
        f"{meta['load_average_1min'][1]:.2f}",
        f"streams: {summary['streams_started']} started, {summary['streams_ended']} ended normally; session open "
        f"p50/max {figure(summary['open_ms']['p50'])}/{figure(summary['open_ms']['max'])} ms",
        "",
        f"latency per block, ms {'blocks':>8}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}",
    ]
    converted = summary["blocks"] - summary["dropped_blocks"]
    for name, key in (("server latency_ms", "server_ms"), ("client last in->first out", "client_ms")):
        d = summary[key]
        lines.append(
            f"  {name:<26}{converted:>5}{figure(d['p50']):>8}{figure(d['p90']):>8}{figure(d['p99']):>8}"
            f"{figure(d['max']):>8}"
        )
    refusals = summary["refusals"]
    by_code = ", ".join(f"{code} {count}" for code, count in refusals.items())
    refused = f" ({by_code}; retry_after {summary['retry_after_s']} s)" if refusals else ""
    lines += [
        "",
        f"deadline misses (block {block_ms:.0f} ms): server latency > block {summary['misses']}, client latency > "
        f"block {summary['client_misses']}; dropped by the server {summary['dropped_blocks']} "
        f"(late events {summary['late_events']}, {summary['dropped_ms']} ms of input)",
        f"refusals: {sum(refusals.values())}{refused}; other errors: {summary['errors']}",
        "",
        f"bandwidth per stream, kbit/s per second of audio {'median':>8}{'worst':>8}   goal <= {GOAL_KBPS:.0f}",
    ]
    labels = {
        "opus_up_kbps": "up   (client -> server), Opus payload",
        "ws_up_kbps": "up   WebSocket (+ frames, start, end)",
        "udp_up_kbps": "up   UDP datagrams (+ UDP/IPv4 headers)",
        "total_up_kbps": "up   total: WebSocket + UDP",
        "opus_down_kbps": "down (server -> client), Opus payload",
        "ws_down_kbps": "down WebSocket (+ frames, events)",
        "udp_down_kbps": "down UDP datagrams (+ UDP/IPv4 headers)",
        "total_down_kbps": "down total: WebSocket + UDP",
    }
    for key, label in labels.items():
        b = summary["bandwidth_kbps"][key]
        if b["median"] is None and key.startswith("udp"):
            continue  # a WebSocket stream sends no datagrams
        verdict = "-" if b["within_goal"] is None else "ok" if b["within_goal"] else "OVER"
        lines.append(f"  {label:<46}{figure(b['median']):>8}{figure(b['max']):>8}   {verdict}")
    lines.append("  (TCP/IP and TLS headers below the WebSocket are not counted; see the docstring)")
    lines.append(format_cpu(meta["cpu_percent"]))
    for message in summary["error_messages"][:5]:
        lines.append(f"error: {message}")
    return "\n".join(lines)


def report_meta(
    title: str,
    args: argparse.Namespace,
    target: Target,
    seconds: float,
    block_ms: float,
    load: tuple[float, float],
    cpu: Mapping[str, float],
) -> dict[str, Any]:
    return {
        "title": title,
        "target": target.description,
        "streams": args.streams,
        "seconds": seconds,
        "ramp_s": args.ramp,
        "block_ms": block_ms,
        **machine_meta(load),
        "input": str(args.input),
        "goal_kbps": GOAL_KBPS,
        "cpu_percent": dict(cpu),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the load and prints the report; returns it (meta, summary, per-stream bandwidth, per-block rows)."""
    args = parse_args(argv)
    audio = read_input(args.input, args.seconds)
    packets = encode_packets(audio)
    ledger = Ledger()
    # The warm-up stream needs a slot of its own, and ends before the load starts.
    with open_target(args, max_sessions=args.capacity or 2 * args.streams + 1) as target:
        warm_up(target, audio)
        load_before, cpu_before = os.getloadavg()[0], cpu_snapshot()
        asyncio.run(load_run(target, packets, args.streams, args.ramp, ledger))
        load_after, cpu_after = os.getloadavg()[0], cpu_snapshot()
        cpu = neighbour_cpu(cpu_before, cpu_after, own_tree())  # while the app's processes still exist
    tally = ledger.current
    block_ms = tally.blocks[0].block_ms if tally.blocks else 1000 * StreamSettings().block_time
    report: dict[str, Any] = {
        "meta": report_meta("Load", args, target, args.seconds, block_ms, (load_before, load_after), cpu),
        "summary": tally.summary(),
        "streams": [{"stream": t.stream, **t.rates()} for t in sorted(tally.traffic, key=lambda t: t.stream)],
        "blocks": [asdict(sample) for sample in tally.blocks],
    }
    print(format_report(report["summary"], report["meta"]))
    if args.json is not None:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
