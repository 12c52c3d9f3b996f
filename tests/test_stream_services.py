"""What both live transports share (app/transport/sessions.py, `StreamServices`), against a real converter service.

Regression found by the fuzz tests: settings inside the protocol's live ranges that the model still cannot stream
made the converter raise `SettingsError`, which reached the transports' catch-all and was reported as `internal`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from app.auth.tokens import TokenSigner
from app.model.seedvc import SeedVC
from app.serving.config import ConverterConfig
from app.serving.converter import ConverterService
from app.serving.live import BlockReport
from app.serving.local import LocalConverterClient
from app.streaming.settings import StreamSettings
from app.transport.protocol import ErrorCode, ProtocolError, StartMessage, parse_client_message
from app.transport.sessions import BlockEvents, StreamServices
from app.voices.store import VoiceStore
from bench.parity import ParitySet


def test_settings_the_model_cannot_stream_are_bad_settings(model: SeedVC, parity: ParitySet, tmp_path: Path) -> None:
    root = str(tmp_path / "voices")
    voice = VoiceStore(root).add((parity.root / parity.bundle["files"]["reference_22k"]).read_bytes(), owner="k")
    config = ConverterConfig(voice_store=root, silence_gate_dbfs=None, identity=True, replica_tag="a")
    converter = ConverterService(config, model=model)
    tokens = TokenSigner(b"a test secret of at least 32 bytes")
    services = StreamServices(
        client=LocalConverterClient({"a": converter}), tokens=tokens, voices=converter.store, defaults=StreamSettings()
    )
    # dit_context 0 is within DIT_CONTEXT_RANGE, but with the default block the vocoder then gets 22 mel frames,
    # 5632 samples, for a block that needs 5733.
    text = {"type": "start", "version": 1, "token": "t", "voice_id": voice.voice_id, "settings": {"dit_context": 0}}
    start = parse_client_message(json.dumps(text))
    assert isinstance(start, StartMessage)

    with pytest.raises(ProtocolError) as refused:
        asyncio.run(services.open_session(start, owner="k"))
    assert refused.value.code == ErrorCode.bad_settings
    assert "DiT context is too short" in refused.value.message
    assert len(converter.engine) == 0  # nothing was left open on the converter


def test_block_events_carry_times_to_a_tenth_of_a_millisecond() -> None:
    times = {"input_start_ms": 1260.4, "latency_ms": 45.678912341234, "queue_ms": 3.0499999}
    report = BlockReport(index=7, steps=10, silent=False, batch_size=1, rehomed=False, voice_id="v", **times)
    [text] = BlockEvents("v").of(report)
    event = json.loads(text)
    assert (event["input_start_ms"], event["latency_ms"], event["queue_ms"]) == (1260, 45.7, 3.0)
    assert len(text) < 126  # one WebSocket frame header of 2 bytes, not 4 (RFC 6455: 126 and longer take 4)
