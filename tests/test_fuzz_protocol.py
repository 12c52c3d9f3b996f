"""Fuzzing the protocol's text and binary checks (app/transport/protocol.py) with hypothesis.

Whatever a client sends, `parse_client_message` and `parse_rtc_message` return a message or raise `ProtocolError`
with a code a client can branch on and a message for people; nothing else may escape, since anything else would
reach the transports' catch-all and be reported as `internal`. Near-valid messages (a valid start message with one
part mutated) also get the code that names what is wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.streaming.settings import StreamSettings
from app.transport.protocol import (
    BLOCK_TIME_RANGE,
    CE_CONTEXT_RANGE,
    CFG_RATE_RANGE,
    CROSSFADE_TIME_RANGE,
    DIFFUSION_STEPS_RANGE,
    DIT_CONTEXT_RANGE,
    ID_MAX_CHARS,
    LOOKAHEAD_RANGE,
    MAX_FRAME_BYTES,
    MAX_PROMPT_RANGE,
    MAX_RTC_TEXT_BYTES,
    MAX_SDP_BYTES,
    MAX_TEXT_BYTES,
    TOKEN_MAX_CHARS,
    EndMessage,
    ErrorCode,
    OfferMessage,
    ProtocolError,
    Range,
    SettingsOverrides,
    SetVoiceMessage,
    StartMessage,
    check_audio_frame,
    parse_client_message,
    parse_rtc_message,
)

# No example database: the checkout is shared, and a failure prints its example (and a reproduction blob) anyway.
FUZZ = settings(max_examples=150, deadline=None, database=None, print_blob=True)
FEW = settings(FUZZ, max_examples=60, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# What text parsing may answer: every other code belongs to later checks (token, voice, capacity) or to audio.
PARSE_CODES = {ErrorCode.bad_message, ErrorCode.unsupported_version, ErrorCode.bad_settings, ErrorCode.frame_too_large}
SECRET_TOKEN = "tok-SECRET-0123456789abcdef"  # never to be echoed in an error message

Parser = Callable[[str], Any]
PARSERS = {"stream": (parse_client_message, MAX_TEXT_BYTES), "rtc": (parse_rtc_message, MAX_RTC_TEXT_BYTES)}

# Any code point, lone surrogates included (a WebSocket text frame cannot hold them, but a str can, and the size
# check encodes the text), weighted towards the characters JSON gives meaning to.
characters = st.one_of(
    st.characters(codec=None, exclude_categories=()),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    st.sampled_from('{}[]":,\\ \x00\n\t0123456789.eE+-truefalsenull'),
)
texts = st.text(characters, max_size=300)
# A long run of one character costs hypothesis little to generate, and crosses every size limit.
long_texts = st.builds(lambda char, count: char * count, characters, st.integers(0, 2 * MAX_RTC_TEXT_BYTES + 10))


def scalars(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(), text)


json_scalars = scalars(st.text(characters, max_size=40))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)


def utf8_size(text: str) -> int:
    return len(text.encode(errors="surrogatepass"))


def outcome(parse: Parser, limit: int, text: str) -> Any:
    """The parsed message, or the ProtocolError, after checking that the error is one a client can act on."""
    try:
        message = parse(text)
    except ProtocolError as error:
        assert error.code in PARSE_CODES, error.code
        assert isinstance(error.message, str) and error.message.strip()
        assert (error.code == ErrorCode.frame_too_large) == (utf8_size(text) > limit)
        assert error.event().model_dump_json()  # the event a client receives serialises
        return error
    assert utf8_size(text) <= limit
    # A parsed message is a value that round-trips: what the server acts on is exactly what was sent. (Through the
    # model, not the parser: the dump adds the defaults, which can push a message near the limit over it.)
    assert type(message).model_validate_json(message.model_dump_json()) == message
    if isinstance(message, StartMessage) and message.settings is not None:
        check_applied(message.settings)
    return message


def check_applied(overrides: SettingsOverrides) -> None:
    """Accepted overrides apply to the defaults, or contradict each other and say so with bad_settings."""
    try:
        applied = overrides.apply(StreamSettings())
    except ProtocolError as error:
        assert error.code == ErrorCode.bad_settings and error.message
        return
    assert isinstance(applied, StreamSettings)


@FUZZ
@given(text=st.one_of(texts, long_texts))
def test_any_text_is_a_message_or_a_protocol_error(text: str) -> None:
    for parse, limit in PARSERS.values():
        outcome(parse, limit, text)


@FUZZ
@given(value=json_values)
def test_any_json_value_is_a_message_or_a_protocol_error(value: Any) -> None:
    text = json.dumps(value)  # NaN and Infinity included, as JavaScript's JSON.stringify never writes but peers may
    for parse, limit in PARSERS.values():
        result = outcome(parse, limit, text)
        if not isinstance(value, dict) or value.get("type") not in ("start", "set_voice", "end", "offer"):
            assert isinstance(result, ProtocolError)  # no type, no message


@FUZZ
@given(depth=st.integers(1, 3000), opener=st.sampled_from(["[", '{"a":', '{"type":"start","settings":']))
def test_deep_nesting_is_refused_not_a_recursion_error(depth: int, opener: str) -> None:
    closer = {"[": "]", '{"a":': "}", '{"type":"start","settings":': "}"}[opener]
    text = opener * depth + "0" + closer * depth
    for parse, limit in PARSERS.values():
        outcome(parse, limit, text)


# Near-valid messages: a valid one, then one thing changed.

SETTINGS_RANGES: dict[str, Range] = {
    "block_time": BLOCK_TIME_RANGE,
    "crossfade_time": CROSSFADE_TIME_RANGE,
    "ce_context": CE_CONTEXT_RANGE,
    "dit_context": DIT_CONTEXT_RANGE,
    "lookahead": LOOKAHEAD_RANGE,
    "diffusion_steps": DIFFUSION_STEPS_RANGE,
    "cfg_rate": CFG_RATE_RANGE,
    "max_prompt": MAX_PROMPT_RANGE,
}


def in_range(name: str) -> st.SearchStrategy[Any]:
    low, high = SETTINGS_RANGES[name]
    if name == "diffusion_steps":
        return st.integers(int(low), int(high))
    return st.floats(low, high)


valid_settings = st.fixed_dictionaries({}, optional={name: in_range(name) for name in SETTINGS_RANGES})
ids = st.text(st.characters(codec="utf-8"), min_size=1, max_size=ID_MAX_CHARS)
valid_starts = st.fixed_dictionaries(
    {"type": st.just("start"), "version": st.just(1), "token": st.just(SECRET_TOKEN), "voice_id": ids},
    optional={
        "settings": st.one_of(st.none(), valid_settings),
        "realtime": st.booleans(),
        "seed": st.one_of(st.none(), st.integers(0, 2**63 - 1)),
        "resume": st.fixed_dictionaries({"session_id": ids, "resume_token": ids}),
    },
)
# Values of every JSON type, the wrong ones for any field included. Without lone surrogates: those make the whole
# text undecodable (bad_message), which would hide the code the mutated field itself earns.
valid_scalars = scalars(st.text(max_size=40))
junk_values = st.one_of(
    valid_scalars,
    st.lists(valid_scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), valid_scalars, max_size=3),
)


def dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, ensure_ascii=False)


def parsed_start(message: dict[str, Any]) -> Any:
    result = outcome(parse_client_message, MAX_TEXT_BYTES, dumps(message))
    assert outcome(parse_rtc_message, MAX_RTC_TEXT_BYTES, dumps(message)) == result or isinstance(result, ProtocolError)
    if isinstance(result, ProtocolError):
        # Whatever else is wrong, the error never repeats the session token.
        assert SECRET_TOKEN not in result.message
    return result


@FUZZ
@given(message=valid_starts)
def test_valid_start_messages_parse(message: dict[str, Any]) -> None:
    result = parsed_start(message)
    assert isinstance(result, StartMessage), result
    assert result.voice_id == message["voice_id"] and result.token == SECRET_TOKEN


@FUZZ
@given(message=valid_starts, data=st.data())
def test_a_missing_required_field_is_bad_message(message: dict[str, Any], data: st.DataObject) -> None:
    field = data.draw(st.sampled_from(["token", "voice_id", "version"]))
    del message[field]
    result = parsed_start(message)
    assert isinstance(result, ProtocolError) and result.code == ErrorCode.bad_message
    assert f"start.{field}" in result.message


@FUZZ
@given(message=valid_starts, data=st.data())
def test_a_wrongly_typed_field_is_refused(message: dict[str, Any], data: st.DataObject) -> None:
    field = data.draw(st.sampled_from(["token", "voice_id", "version", "realtime", "seed", "settings", "resume"]))
    message[field] = data.draw(junk_values)
    result = parsed_start(message)
    if isinstance(result, StartMessage):
        return  # the junk happened to be a valid value (null settings, a small seed, a short string...)
    expected = {ErrorCode.bad_message}
    if field == "settings":
        expected = {ErrorCode.bad_settings}
    if field == "version" and isinstance(message["version"], int) and not isinstance(message["version"], bool):
        expected = {ErrorCode.unsupported_version}
    assert result.code in expected, (result.code, result.message)


@FUZZ
@given(message=valid_starts, data=st.data())
def test_settings_out_of_range_or_mistyped_are_bad_settings(message: dict[str, Any], data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(SETTINGS_RANGES)))
    low, high = SETTINGS_RANGES[name]
    outside = st.one_of(
        st.floats(max_value=low, exclude_max=True),
        st.floats(min_value=high, exclude_min=True),
        st.just(math.nan),
        st.integers(max_value=math.ceil(low) - 1),
        st.integers(min_value=math.floor(high) + 1),
        st.text(max_size=5),
        st.booleans(),
        st.lists(st.integers(), max_size=2),
    )
    message["settings"] = {**(message.get("settings") or {}), name: data.draw(outside)}
    result = parsed_start(message)
    assert isinstance(result, ProtocolError) and result.code == ErrorCode.bad_settings, result
    assert f"start.settings.{name}" in result.message


@FUZZ
@given(message=valid_starts, version=st.integers(min_value=-(2**80), max_value=2**80).filter(lambda v: v != 1))
def test_another_protocol_version_is_unsupported_version(message: dict[str, Any], version: int) -> None:
    message["version"] = version
    result = parsed_start(message)
    assert isinstance(result, ProtocolError) and result.code == ErrorCode.unsupported_version
    assert str(version) in result.message


@FUZZ
@given(message=valid_starts, key=st.text(min_size=1, max_size=20), value=junk_values)
def test_unknown_fields_are_refused(message: dict[str, Any], key: str, value: Any) -> None:
    if key in StartMessage.model_fields:
        return
    message[key] = value
    result = parsed_start(message)
    assert isinstance(result, ProtocolError) and result.code == ErrorCode.bad_message


@FUZZ
@given(message=valid_starts, field=st.sampled_from(["token", "voice_id"]), size=st.integers(0, 3 * MAX_TEXT_BYTES))
def test_huge_strings_are_refused_by_length_or_size(message: dict[str, Any], field: str, size: int) -> None:
    message[field] = "é" * size  # two bytes each in UTF-8
    result = parsed_start(message)
    limit = TOKEN_MAX_CHARS if field == "token" else ID_MAX_CHARS
    if utf8_size(dumps(message)) > MAX_TEXT_BYTES:
        assert isinstance(result, ProtocolError) and result.code == ErrorCode.frame_too_large
    elif not 1 <= size <= limit:
        assert isinstance(result, ProtocolError) and result.code == ErrorCode.bad_message
    else:
        assert isinstance(result, StartMessage)


@FUZZ
@given(
    kind=st.sampled_from(["set_voice", "end", "offer"]),
    fields=st.dictionaries(st.sampled_from(["voice_id", "sdp", "type", "extra"]), junk_values, max_size=3),
)
def test_other_messages_with_junk_fields(kind: str, fields: dict[str, Any]) -> None:
    text = dumps({"type": kind, **fields})
    stream = outcome(parse_client_message, MAX_TEXT_BYTES, text)
    rtc = outcome(parse_rtc_message, MAX_RTC_TEXT_BYTES, text)
    if kind == "offer":
        assert isinstance(stream, ProtocolError)  # /v1/stream knows no offer
    for result in (stream, rtc):
        assert isinstance(result, SetVoiceMessage | EndMessage | OfferMessage | ProtocolError)


@FEW
@given(sdp=st.one_of(texts, long_texts))
def test_offers_of_any_size_are_an_offer_or_a_protocol_error(sdp: str) -> None:
    text = json.dumps({"type": "offer", "sdp": sdp})  # ASCII escapes: 6 bytes per non-ASCII character
    result = outcome(parse_rtc_message, MAX_RTC_TEXT_BYTES, text)
    if isinstance(result, OfferMessage):
        assert result.sdp == sdp and 1 <= len(sdp) <= MAX_SDP_BYTES
    elif utf8_size(text) <= MAX_RTC_TEXT_BYTES:
        assert result.code == ErrorCode.bad_message


# Binary messages


@FUZZ
@given(packet=st.one_of(st.binary(max_size=64), st.integers(0, 4 * MAX_FRAME_BYTES).map(bytes)))
def test_audio_frame_check_refuses_only_empty_and_oversized(packet: bytes) -> None:
    try:
        check_audio_frame(packet)
    except ProtocolError as error:
        assert error.code == (ErrorCode.bad_audio if not packet else ErrorCode.frame_too_large)
        assert error.message
        return
    assert 1 <= len(packet) <= MAX_FRAME_BYTES
