"""bench/load.py and bench/soak.py: their accounting on hand-made inputs, and the stream probe against the fake echo
server of the client tests (real WebSockets on loopback, no Ray)."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest
import torch

from app.audio.framing import Chunker
from app.audio.opus import FRAME_SAMPLES, SAMPLE_RATE
from app.audio.stream_resample import StreamingResampler
from app.processes import descendants
from app.streaming.settings import CONTENT_RATE
from bench import load, soak
from bench.cpu_usage import CpuSnapshot, neighbour_cpu
from bench.load import (
    BlockSample,
    Flatness,
    Ledger,
    StreamProbe,
    Tally,
    Target,
    Tokens,
    Traffic,
    block_outcome,
    completing_packet,
    flatness,
    is_refusal,
    kbit_per_s,
    ws_frame_bytes,
)
from client.stream_client import encode_packets
from tests.test_stream_client_unit import BLOCK_FRAMES, EchoConverter, serving, sine


def sample(server_ms: float, client_ms: float | None = None, dropped: bool = False, index: int = 0) -> BlockSample:
    return BlockSample(stream=0, index=index, block_ms=180.0, server_ms=server_ms, client_ms=client_ms, dropped=dropped)


# ---- pure accounting ----------------------------------------------------------------------------------------------


def test_websocket_frames_add_the_rfc_6455_header_and_the_client_mask() -> None:
    assert ws_frame_bytes(100, masked=False) == 102
    assert ws_frame_bytes(100, masked=True) == 106
    assert ws_frame_bytes(125, masked=False) == 127  # the last length that fits the first two bytes
    assert ws_frame_bytes(126, masked=False) == 130  # 16-bit extended length
    assert ws_frame_bytes(70_000, masked=True) == 70_000 + 2 + 8 + 4  # 64-bit extended length


def test_bit_rate_is_per_second_of_audio_not_of_wall_time() -> None:
    assert kbit_per_s(50 * 80, 50) == pytest.approx(32.0)  # 80 bytes every 20 ms
    assert kbit_per_s(100, 1) == pytest.approx(40.0)
    assert kbit_per_s(0, 0) is None


def test_traffic_counts_payload_and_framed_bytes_each_way() -> None:
    traffic = Traffic(stream=3)
    for _ in range(50):
        traffic.sent(bytes(80))
        traffic.received(bytes(100))
    traffic.sent('{"type":"end"}')  # 14 bytes of text: framed, but not audio
    traffic.received("x" * 200)  # an event of 200 bytes: 16-bit length
    assert (traffic.packets_up, traffic.opus_up, traffic.ws_up) == (50, 4000, 50 * 86 + 20)
    assert (traffic.packets_down, traffic.opus_down, traffic.ws_down) == (50, 5000, 50 * 102 + 204)
    rates = traffic.rates()
    assert rates["opus_up_kbps"] == pytest.approx(32.0)
    assert rates["ws_up_kbps"] == pytest.approx(8 * (50 * 86 + 20) / 1000)
    assert rates["opus_down_kbps"] == pytest.approx(40.0)
    assert rates["ws_down_kbps"] == pytest.approx(8 * (50 * 102 + 204) / 1000)
    assert rates["udp_up_kbps"] is None and rates["total_up_kbps"] == rates["ws_up_kbps"]  # a WebSocket stream


def test_a_call_adds_its_datagrams_with_udp_and_ipv4_headers() -> None:
    traffic = Traffic(stream=0)
    traffic.sent("x" * 300)  # the control socket's start message: 300 + 4 + 4 bytes
    for _ in range(50):
        traffic.datagrams(up=True, count=1, udp_payload_bytes=12 + 80)  # RTP header + Opus
        traffic.audio(up=True, packets=1, opus_bytes=80)
    traffic.datagrams(up=False, count=50, udp_payload_bytes=50 * 110)  # as WebRTC's statistics give them
    traffic.audio(up=False, packets=50, opus_bytes=50 * 80)
    rates = traffic.rates()
    assert rates["opus_up_kbps"] == rates["opus_down_kbps"] == pytest.approx(32.0)
    assert rates["udp_up_kbps"] == pytest.approx(8 * 50 * (92 + 28) / 1000)
    assert rates["udp_down_kbps"] == pytest.approx(8 * 50 * (110 + 28) / 1000)
    assert rates["total_up_kbps"] == pytest.approx(8 * (308 + 50 * 120) / 1000)
    assert rates["ws_down_kbps"] == 0.0 and rates["total_down_kbps"] == rates["udp_down_kbps"]


def test_bandwidth_takes_the_median_and_the_worst_served_stream_against_the_goal() -> None:
    streams = []
    for stream, size in enumerate((80, 120, 200)):  # 32, 48 and 80 kbit/s up
        traffic = Traffic(stream)
        for _ in range(50):
            traffic.sent(bytes(size))
            traffic.received(bytes(80))
        streams.append(traffic)
    refused = Traffic(3)
    refused.sent('{"type": "start"}')
    refused.sent(bytes(80))  # the packet its client had in hand: 20 ms of "audio" with a start message on top
    result = load.bandwidth([*streams, refused])
    assert result["opus_up_kbps"] == {"median": pytest.approx(48.0), "max": pytest.approx(80.0), "within_goal": False}
    assert load.bandwidth(streams[:2])["opus_up_kbps"]["within_goal"] is True
    assert result["opus_down_kbps"]["median"] == pytest.approx(32.0)
    assert load.bandwidth([refused])["ws_up_kbps"] == {"median": None, "max": None, "within_goal": None}


def test_the_completing_packet_is_the_one_the_servers_input_path_completes_the_block_on() -> None:
    """Replays the ingress's input path (48 -> 16 kHz stream resampler, then blocks of 180 ms) packet by packet."""
    resampler, chunker = StreamingResampler(SAMPLE_RATE, CONTENT_RATE), Chunker(round(0.18 * CONTENT_RATE))
    completed_on = []
    for packet in range(60):
        blocks = chunker.push(resampler.push(torch.zeros(FRAME_SAMPLES)).numpy())
        completed_on += [packet] * len(blocks)
    lookahead = load.input_lookahead_48k()
    assert lookahead > 0
    assert completed_on == [completing_packet(index, 180.0, lookahead) for index in range(len(completed_on))]
    # Without the lookahead the block's own last packet would do: the lookahead pushes it one packet on.
    assert [completing_packet(index, 180.0, 0) for index in range(3)] == [8, 17, 26]
    assert [completing_packet(index, 180.0, lookahead) for index in range(3)] == [9, 18, 27]


def test_a_block_is_dropped_missed_or_on_time() -> None:
    assert block_outcome(sample(0.0, dropped=True)) == "dropped"
    assert block_outcome(sample(180.5)) == "miss"
    assert block_outcome(sample(180.0)) == "ok"  # exactly one block of latency still keeps up
    assert block_outcome(sample(12.0, client_ms=400.0)) == "ok"  # judged by the server's latency


def test_refusals_are_overloaded_and_rate_limited_only() -> None:
    assert is_refusal({"type": "error", "code": "overloaded", "retry_after_s": 5.0})
    assert is_refusal({"type": "error", "code": "rate_limited", "retry_after_s": 1.0})
    assert not is_refusal({"type": "error", "code": "internal"})
    assert not is_refusal({"type": "late", "code": "overloaded"})


def test_tally_summary_percentiles_misses_and_drops() -> None:
    tally = Tally()
    # Server 10, 20, ..., 100 ms; client 5 ms more; one miss (200 ms) and one drop on top.
    tally.blocks = [sample(10.0 * i, 10.0 * i + 5, index=i) for i in range(1, 11)]
    tally.blocks += [sample(200.0, 190.0, index=11), sample(0.0, None, dropped=True, index=12)]
    summary = tally.summary()
    assert summary["blocks"] == 12 and summary["dropped_blocks"] == 1
    assert summary["misses"] == 1 and summary["client_misses"] == 1
    values = [10.0 * i for i in range(1, 11)] + [200.0]
    assert summary["server_ms"]["p50"] == pytest.approx(float(np.percentile(values, 50)))
    assert summary["server_ms"]["p90"] == pytest.approx(float(np.percentile(values, 90)))
    assert summary["server_ms"]["p99"] == pytest.approx(float(np.percentile(values, 99)))
    assert summary["server_ms"]["max"] == 200.0  # the dropped block's 0 is left out: it was never converted
    assert summary["client_ms"]["p50"] == pytest.approx(float(np.percentile([v + 5 for v in values[:-1]] + [190], 50)))
    empty = Tally().summary()
    assert empty["server_ms"] == {"p50": None, "p90": None, "p99": None, "max": None}


def test_merged_tallies_add_up() -> None:
    one, two = Tally(streams_started=2, late_events=1, dropped_ms=180), Tally(streams_started=1, errors=["x"])
    one.refusals["overloaded"] += 2
    two.refusals["overloaded"] += 1
    one.blocks, two.blocks = [sample(1.0)], [sample(2.0), sample(3.0)]
    total = Tally.merged([one, two])
    assert (total.streams_started, total.late_events, total.dropped_ms) == (3, 1, 180)
    assert total.refusals == {"overloaded": 3} and total.errors == ["x"] and len(total.blocks) == 3


# ---- the stream probe ---------------------------------------------------------------------------------------------


def test_the_probe_times_a_block_from_its_completing_packet_to_its_first_audio() -> None:
    ledger = Ledger()
    probe = StreamProbe(stream=1, packets=[b"x"] * 50, ledger=ledger, lookahead_48k=0)
    probe.on_event({"type": "ready", "block_ms": 100})
    now = time.monotonic()
    probe.sent_at = [now - 1.0 + 0.02 * i for i in range(50)]  # packet 4 completes block 0: sent at now - 0.92
    probe.on_event({"type": "block", "index": 0, "latency_ms": 30.0, "queue_ms": 1.0, "silent": False})
    probe.on_message(b"audio")
    probe.on_message(b"audio")  # only the first packet of a block times it
    probe.on_event({"type": "block", "index": 1, "latency_ms": 0.0, "queue_ms": 0.0, "silent": True})
    probe.on_event({"type": "block", "index": 2, "latency_ms": 20.0, "queue_ms": 0.0, "silent": False})
    probe.finish()  # block 2's audio never came
    first, dropped, no_audio = ledger.current.blocks
    assert first.server_ms == 30.0 and first.client_ms == pytest.approx(920.0, abs=50.0)
    assert dropped.dropped and dropped.client_ms is None
    assert no_audio.client_ms is None and not no_audio.dropped
    assert ledger.current.traffic == [probe.traffic] and probe.traffic.packets_down == 2


def test_the_probe_counts_refusals_apart_from_errors_and_leaves_out_the_flush_blocks() -> None:
    ledger = Ledger()
    probe = StreamProbe(stream=0, packets=[b"x"] * 10, ledger=ledger, lookahead_48k=0)  # 200 ms of input
    probe.on_event({"type": "error", "code": "overloaded", "message": "full", "retry_after_s": 5.0})
    probe.on_event({"type": "error", "code": "internal", "message": "boom"})
    probe.on_event({"type": "late", "dropped_ms": 180, "total_dropped_ms": 180})
    probe.on_event({"type": "ready", "block_ms": 100})
    for index in range(3):  # block 1 ends at 200 ms: only the end message's flush completed it
        probe.on_event({"type": "block", "index": index, "latency_ms": 5.0, "queue_ms": 0.0, "silent": False})
    probe.finish()
    tally = ledger.current
    assert tally.refusals == {"overloaded": 1} and tally.retry_after_s == [5.0] and probe.retry_after_s == 5.0
    assert tally.errors == ["stream 0: internal: boom"]
    assert (tally.late_events, tally.dropped_ms) == (1, 180)
    assert [block.index for block in tally.blocks] == [0]


def test_a_load_run_against_the_echo_server_reports_every_stream() -> None:
    converter = EchoConverter()
    packets = encode_packets(sine(1.0))
    ledger = Ledger()
    with serving(converter) as url:
        # The echo answers a block on its last packet: no resampler lookahead.
        target = Target(url, "voice-a", Tokens(url, "key", token="token-1"), "echo", lookahead_48k=0)
        asyncio.run(load.load_run(target, packets, streams=3, ramp_s=0.06, ledger=ledger))
    summary = ledger.current.summary()
    assert summary["streams_started"] == summary["streams_ended"] == 3 and summary["errors"] == 0
    kept = (len(packets) * 20 - 40) // (20 * BLOCK_FRAMES)  # blocks complete 40 ms before the input's end
    assert summary["blocks"] == 3 * kept
    assert summary["server_ms"]["max"] == 10.0 * kept  # the echo reports 10 ms x (index + 1)
    assert all(block.client_ms is not None and 0 <= block.client_ms < 100 for block in ledger.current.blocks)
    assert (summary["late_events"], summary["dropped_ms"]) == (3, 60)  # one late event of 20 ms per stream
    # The echo sends back the very packets: the same payload rate both ways; events make the WebSocket rate higher.
    for traffic in ledger.current.traffic:
        rates = traffic.rates()
        up, down, ws_down = rates["opus_up_kbps"], rates["opus_down_kbps"], rates["ws_down_kbps"]
        assert up is not None and down is not None and ws_down is not None  # None: no audio went that way
        assert up == pytest.approx(down)
        assert ws_down > down > 0


# ---- soak ---------------------------------------------------------------------------------------------------------


def test_flatness_is_last_over_first_within_a_limit() -> None:
    result = flatness(10.0, 12.0, 1.25)
    assert (result.first, result.last, result.flat) == (10.0, 12.0, True) and result.ratio == pytest.approx(1.2)
    assert flatness(10.0, 13.0, 1.25).flat is False
    assert flatness(10.0, 5.0, 1.25).flat is True  # getting faster is flat enough
    assert flatness(None, 5.0, 1.25).flat is None and flatness(0.0, 5.0, 1.25).flat is None
    assert soak.overall([Flatness(1, 1, 1, True), Flatness(None, None, None, None)]) is True
    assert soak.overall([Flatness(1, 1, 1, True), Flatness(1, 2, 2, False)]) is False
    assert soak.overall([Flatness(None, None, None, None)]) is None


def row(p50: float, ingress: float, converter: float, proxy: float | None = 100.0, machine: float = 100.0) -> dict:
    rss = {soak.INGRESS: ingress, soak.CONVERTER: converter, soak.PROXY: proxy}
    cpu = {"machine": machine, "this_tool": 50.0, "others": machine - 50.0}
    return {"server_p50_ms": p50, "server_p99_ms": 2 * p50, "rss_mib": rss, "cpu_percent": cpu}


def test_the_soak_verdict_judges_p50_latency_and_the_ingress_and_converter_rss() -> None:
    flat = soak.verdict([row(10, 800, 800), row(30, 1, 1), row(11, 810, 820)], cores=2)
    assert flat["flat"] is True and flat["saturated"] == [False, False]  # first vs last only
    assert soak.verdict([row(10, 800, 800), row(14, 800, 800)], cores=2)["flat"] is False  # latency x1.4
    leaking = soak.verdict([row(10, 800, 800), row(10, 800, 1000)], cores=2)
    assert leaking["flat"] is False and leaking["rss"][soak.CONVERTER].ratio == pytest.approx(1.25)
    assert soak.verdict([row(10, 800, 800, proxy=100), row(10, 800, 800, proxy=500)], cores=2)["flat"] is True
    assert soak.verdict([], cores=2)["flat"] is None
    crowded = soak.verdict([row(10, 800, 800, machine=120), row(30, 800, 800, machine=199)], cores=2)
    assert crowded["saturated"] == [False, True] and crowded["others_cpu_percent"] == [70.0, 149.0]
    assert "saturated" in soak.format_verdict(crowded) and "saturated" not in soak.format_verdict(flat)


def test_descendants_follow_the_process_tree_down_only() -> None:
    parents = {10: 1, 11: 10, 12: 11, 13: 10, 20: 1, 21: 20}
    assert descendants(parents, 10) == {11, 12, 13}
    assert descendants(parents, 12) == set()
    assert descendants(parents, 1) == {10, 11, 12, 13, 20, 21}


def test_replica_rss_reads_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    # This process's own entry stands in for a converter replica.
    me = os.getpid()
    table = [(pid, soak.CONVERTER if pid == me else group, fields) for pid, group, fields in soak.process_table()]
    monkeypatch.setattr(soak, "process_table", lambda: table)
    everywhere = soak.replica_rss_mib(only_under=None)
    converter_mib = everywhere[soak.CONVERTER]
    assert converter_mib is not None and converter_mib > 10  # MiB: torch is loaded
    assert soak.replica_rss_mib(only_under=me)[soak.CONVERTER] is None  # a process is not its own descendant


def test_cpu_is_split_into_this_tools_processes_and_everyone_elses() -> None:
    before = CpuSnapshot(wall=100.0, machine_busy_s=50.0, processes={1: ("bench", 10.0), 2: ("other", 5.0)}, threads={})
    after = CpuSnapshot(
        wall=110.0,
        machine_busy_s=65.0,  # 15 CPU seconds in 10 s: 150 % of one core
        processes={1: ("bench", 14.0), 2: ("other", 9.0), 3: ("ingress", 2.0)},  # 3 started meanwhile
        threads={},
    )
    cpu = neighbour_cpu(before, after, ours={1, 3})
    assert cpu == {"machine": pytest.approx(150.0), "this_tool": pytest.approx(60.0), "others": pytest.approx(90.0)}
