from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from pydantic import TypeAdapter

from app.serving.controls import StreamControls
from app.streaming.settings import StreamSettings
from app.transport.protocol import (
    BLOCK_TIME_RANGE,
    MAX_FRAME_BYTES,
    MAX_TEXT_BYTES,
    PITCH_SHIFT_RANGE,
    BlockEvent,
    ControlOverrides,
    EndEvent,
    EndMessage,
    ErrorCode,
    ErrorEvent,
    LateEvent,
    ProtocolError,
    ReadyEvent,
    ResumeRequest,
    ServerEvent,
    SettingsOverrides,
    SetVoiceMessage,
    StartMessage,
    VoiceSetEvent,
    WarningEvent,
    check_audio_frame,
    close_code,
    parse_client_message,
    published_limits,
)


def start(**fields: object) -> str:
    message = {"type": "start", "version": 1, "token": "tok", "voice_id": "v1"} | fields
    return json.dumps({key: value for key, value in message.items() if value is not ...})


def rejected(text: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse_client_message(text)
    return caught.value


# Client messages


def test_minimal_start_message_takes_defaults() -> None:
    message = parse_client_message(start())
    assert message == StartMessage(type="start", version=1, token="tok", voice_id="v1")
    assert message.realtime is True
    assert message.settings is None and message.seed is None and message.resume is None


def test_full_start_message() -> None:
    settings: dict[str, Any] = {
        "block_time": 0.24,
        "crossfade_time": 0.05,
        "ce_context": 3,  # an integer is a valid number
        "dit_context": 1.0,
        "lookahead": 0.1,
        "diffusion_steps": 8,
        "cfg_rate": 0.5,
        "max_prompt": 5.0,
    }
    message = parse_client_message(
        start(settings=settings, realtime=False, seed=7, resume={"session_id": "s1", "resume_token": "r1"})
    )
    assert isinstance(message, StartMessage)
    assert message.settings == SettingsOverrides(**settings)
    assert message.realtime is False and message.seed == 7
    assert message.resume == ResumeRequest(session_id="s1", resume_token="r1")


def test_set_voice_and_end_messages() -> None:
    assert parse_client_message('{"type": "set_voice", "voice_id": "v2"}') == SetVoiceMessage(
        type="set_voice", voice_id="v2"
    )
    assert parse_client_message('{"type": "end"}') == EndMessage(type="end")


@pytest.mark.parametrize(
    "message",
    [
        StartMessage(type="start", version=1, token="t", voice_id="v", settings=SettingsOverrides(cfg_rate=0.3)),
        SetVoiceMessage(type="set_voice", voice_id="v"),
        EndMessage(type="end"),
    ],
)
def test_client_messages_round_trip(message: StartMessage | SetVoiceMessage | EndMessage) -> None:
    assert parse_client_message(message.model_dump_json()) == message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{", "Invalid JSON"),
        ("[1]", "Input should be an object"),
        ('"start"', "Input should be an object"),
        ('{"voice_id": "v"}', "'type'"),
        ('{"type": "stop"}', "'stop'"),
        (start(token=...), "start.token: Field required"),
        (start(voice_id=...), "start.voice_id: Field required"),
        (start(voice_id=""), "start.voice_id: String should have at least 1 character"),
        (start(version=...), "start.version: Field required"),
        (start(version="1"), "start.version: Input should be a valid integer"),
        (start(version=True), "start.version: Input should be a valid integer"),
        (start(realtime="yes"), "start.realtime: Input should be a valid boolean"),
        (start(seed=-1), "start.seed: Input should be greater than or equal to 0"),
        (start(colour="blue"), "start.colour: Extra inputs are not permitted"),
        (start(resume={"session_id": "s"}), "start.resume.resume_token: Field required"),
        ('{"type": "end", "reason": "done"}', "end.reason: Extra inputs are not permitted"),
        ('{"type": "set_voice"}', "set_voice.voice_id: Field required"),
    ],
)
def test_bad_messages_name_the_problem(text: str, expected: str) -> None:
    error = rejected(text)
    assert error.code is ErrorCode.bad_message
    assert expected in str(error)


def test_unknown_type_lists_the_known_ones() -> None:
    assert "'start', 'set_voice', 'set_controls', 'end'" in str(rejected('{"type": "stop"}'))


def test_unsupported_version_wins_over_other_problems() -> None:
    # A newer client will also send fields this server does not know; the version is the problem to report.
    error = rejected(start(version=2, new_field=1))
    assert error.code is ErrorCode.unsupported_version
    assert str(error) == "protocol version 2 is not supported; this server speaks version 1"


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"block_time": 0.02}, "start.settings.block_time: Input should be greater than or equal to 0.08"),
        ({"block_time": 2}, "start.settings.block_time: Input should be less than or equal to 1"),
        ({"diffusion_steps": 31}, "start.settings.diffusion_steps: Input should be less than or equal to 30"),
        ({"diffusion_steps": 10.0}, "start.settings.diffusion_steps: Input should be a valid integer"),
        ({"cfg_rate": 1.6}, "start.settings.cfg_rate: Input should be less than or equal to 1.5"),
        ({"cfg_rate": "0.5"}, "start.settings.cfg_rate: Input should be a valid number"),
        ({"lookahead": 0.6}, "start.settings.lookahead: Input should be less than or equal to 0.5"),
        ({"ce_context": 0.4}, "start.settings.ce_context: Input should be greater than or equal to 0.5"),
        ({"dit_context": -0.1}, "start.settings.dit_context: Input should be greater than or equal to 0"),
        ({"crossfade_time": 0.3}, "start.settings.crossfade_time: Input should be less than or equal to 0.2"),
        ({"max_prompt": 11}, "start.settings.max_prompt: Input should be less than or equal to 10"),
        ({"steps": 10}, "start.settings.steps: Extra inputs are not permitted"),
        ([0.2], "start.settings: Input should be an object"),
    ],
)
def test_settings_out_of_range_are_bad_settings(settings: object, expected: str) -> None:
    error = rejected(start(settings=settings))
    assert error.code is ErrorCode.bad_settings
    assert expected in str(error)


def test_every_problem_is_reported() -> None:
    error = rejected(start(token=..., settings={"cfg_rate": 9}))
    assert error.code is ErrorCode.bad_message  # not only settings are wrong
    assert "start.token: Field required" in str(error)
    assert "start.settings.cfg_rate" in str(error)


def test_text_message_size_limit() -> None:
    fits = start(token="t" * (MAX_TEXT_BYTES - len(start(token=""))))
    assert len(fits.encode()) == MAX_TEXT_BYTES
    # At the limit the message reaches validation (and fails it: the token is far over its own length limit).
    assert rejected(fits).code is ErrorCode.bad_message
    error = rejected(fits + " ")
    assert error.code is ErrorCode.frame_too_large
    assert str(error) == f"text message is {MAX_TEXT_BYTES + 1} bytes; the limit is {MAX_TEXT_BYTES}"


def test_audio_frame_checks() -> None:
    check_audio_frame(b"\x00" * MAX_FRAME_BYTES)
    with pytest.raises(ProtocolError) as caught:
        check_audio_frame(b"\x00" * (MAX_FRAME_BYTES + 1))
    assert caught.value.code is ErrorCode.frame_too_large
    assert f"{MAX_FRAME_BYTES + 1} bytes" in str(caught.value)
    with pytest.raises(ProtocolError) as caught:
        check_audio_frame(b"")
    assert caught.value.code is ErrorCode.bad_audio


def test_raw_pcm_frames_do_not_fit() -> None:
    # A client that sends 20 ms of 16-bit PCM instead of Opus hears about it at once.
    assert MAX_FRAME_BYTES < 48_000 // 50 * 2


# Settings overrides


def test_overrides_field_names_are_the_stream_settings() -> None:
    assert set(SettingsOverrides.model_fields) == {field.name for field in dataclasses.fields(StreamSettings)}


def test_overrides_apply_only_what_is_set() -> None:
    base = StreamSettings()
    assert SettingsOverrides().apply(base) == base
    assert SettingsOverrides(block_time=0.3, diffusion_steps=4).apply(base) == dataclasses.replace(
        base, block_time=0.3, diffusion_steps=4
    )
    assert SettingsOverrides(cfg_rate=None).apply(base) == base  # null keeps the server's value


def test_overrides_default_settings_are_allowed_live() -> None:
    base = StreamSettings()
    assert SettingsOverrides(**dataclasses.asdict(base)).apply(base) == base
    assert BLOCK_TIME_RANGE.low <= base.block_time <= BLOCK_TIME_RANGE.high


def test_contradicting_overrides_are_bad_settings() -> None:
    # dit_context 3 is within its own range but exceeds the base's content-encoder context of 2.5 s.
    with pytest.raises(ProtocolError) as caught:
        SettingsOverrides(dit_context=3.0).apply(StreamSettings())
    assert caught.value.code is ErrorCode.bad_settings
    assert str(caught.value).startswith("DiT context (3.0 s) cannot exceed the content-encoder context (2.5 s)")
    assert SettingsOverrides(dit_context=3.0, ce_context=3.0).apply(StreamSettings()).dit_context == 3.0


# Server events


EVENTS = [
    ReadyEvent(session_id="s1", resume_token="r1", block_ms=180, settings=StreamSettings()),
    BlockEvent(index=3, input_start_ms=540, latency_ms=212.5, queue_ms=4.0, steps=10, silent=False),
    VoiceSetEvent(voice_id="v2", from_block=4),
    LateEvent(dropped_ms=180, total_dropped_ms=360),
    WarningEvent(code="output_backlog", message="the client reads audio slower than real time"),
    ErrorEvent(code=ErrorCode.overloaded, message="no capacity", retry_after_s=5.0),
    EndEvent(blocks=12, dropped_ms=360),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda event: event.type)
def test_events_round_trip(event: ServerEvent) -> None:
    assert TypeAdapter(ServerEvent).validate_json(event.model_dump_json()) == event


def test_ready_event_wire_format() -> None:
    settings = StreamSettings(block_time=0.24)
    wire = json.loads(ReadyEvent(session_id="s1", resume_token="r1", block_ms=240, settings=settings).model_dump_json())
    assert wire == {
        "type": "ready",
        "version": 1,
        "session_id": "s1",
        "resume_token": "r1",
        "sample_rate": 48_000,
        "frame_ms": 20,
        "block_ms": 240,
        "settings": dataclasses.asdict(settings),
        "resumed_at_block": None,
    }


def test_error_event_wire_format() -> None:
    wire = json.loads(ErrorEvent(code=ErrorCode.unauthorized, message="token expired").model_dump_json())
    assert wire == {"type": "error", "code": "unauthorized", "message": "token expired", "retry_after_s": None}


def test_protocol_error_becomes_error_event() -> None:
    error = rejected('{"type": "stop"}')
    assert error.event() == ErrorEvent(code=ErrorCode.bad_message, message=str(error))


# Close codes


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (ErrorCode.unauthorized, 1008),
        (ErrorCode.bad_message, 1008),
        (ErrorCode.bad_settings, 1008),
        (ErrorCode.unsupported_version, 1003),
        (ErrorCode.bad_audio, 1003),
        (ErrorCode.frame_too_large, 1009),
        (ErrorCode.overloaded, 1013),
        (ErrorCode.rate_limited, 1013),
        (ErrorCode.internal, 1011),
    ],
)
def test_close_codes(code: ErrorCode, expected: int) -> None:
    assert close_code(code) == expected


def test_every_error_code_has_a_close_code() -> None:
    for code in ErrorCode:
        assert close_code(code) in {1003, 1008, 1009, 1011, 1013}


# Published limits (GET /v1/limits: the page's fields take their ranges from them)


def schema_bounds(model: type[SettingsOverrides] | type[ControlOverrides]) -> dict[str, dict[str, float]]:
    """Each field's {"min", "max"} as the model's JSON schema states them: another reading of the same validators."""
    bounds = {}
    for name, spec in model.model_json_schema()["properties"].items():
        [kind] = [option for option in spec.get("anyOf", [spec]) if option.get("type") != "null"]
        bounds[name] = {key: kind[word] for key, word in (("min", "minimum"), ("max", "maximum")) if word in kind}
    return bounds


def test_published_limits_are_what_the_models_accept() -> None:
    limits = json.loads(json.dumps(published_limits()))  # what the endpoint sends
    assert limits["settings"] == schema_bounds(SettingsOverrides)
    ranges = {name: {k: v for k, v in spec.items() if k != "default"} for name, spec in limits["controls"].items()}
    assert ranges == schema_bounds(ControlOverrides)
    assert limits["controls"]["pitch_shift"] == {
        "min": PITCH_SHIFT_RANGE.low,
        "max": PITCH_SHIFT_RANGE.high,
        "default": 0.0,
    }
    assert {name: spec["default"] for name, spec in limits["controls"].items()} == dataclasses.asdict(StreamControls())
    with pytest.raises(ProtocolError):  # the published edge is the enforced one
        parse_client_message(start(controls={"pitch_shift": PITCH_SHIFT_RANGE.high + 0.5}))
    parse_client_message(start(controls={"pitch_shift": limits["controls"]["pitch_shift"]["max"]}))
    assert set(limits["start_retry"]) == {"retries", "default_s", "max_s"}
