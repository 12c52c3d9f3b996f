"""bench/load.py end to end: a short run of two streams against the local app it starts itself (real Ray Serve,
real WebSockets, identity converter). Run it alone, inside a private network namespace on a shared machine:
unshare -n sh -c 'ip link set lo up && .venv/bin/python -m pytest -q tests/serve/test_load_tool_run.py'"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import load

pytestmark = pytest.mark.serve


def test_two_local_streams_report_latency_and_bandwidth_within_the_goal(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    report = load.main(["--local", "--streams", "2", "--seconds", "3", "--json", str(out)])
    summary = report["summary"]
    assert summary["streams_started"] == summary["streams_ended"] == 2
    assert summary["errors"] == 0 and summary["refusals"] == {}, summary["error_messages"]
    assert sorted(stream["stream"] for stream in report["streams"]) == [0, 1]
    # 3 s of input is 16 live blocks of 180 ms per stream.
    assert summary["blocks"] == 2 * 16
    assert {block["stream"] for block in report["blocks"]} == {0, 1}
    assert 0 < summary["server_ms"]["p50"] <= summary["client_ms"]["p50"]
    for stream in report["streams"]:
        for key in load.RATE_KEYS:
            if key.startswith("udp_"):
                assert stream[key] is None, (key, stream)  # a WebSocket stream sends no datagrams
            else:
                assert 0 < stream[key] < load.GOAL_KBPS, (key, stream)
    assert json.loads(out.read_text())["summary"] == json.loads(json.dumps(summary))
