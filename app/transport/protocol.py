"""The streaming WebSocket protocol, version 1: every message as a pydantic model, and this docstring as its spec.

1. Get a session token: present an API key as `Authorization: Bearer <key>` to the server's token endpoint; it
   answers with a signed token that expires (see `app.auth.tokens`). The token travels inside the start message
   because browsers cannot set headers on a WebSocket, and a token in the URL would end up in access logs.
2. Open a WebSocket on `/v1/stream`. The first message must be a JSON text `StartMessage`:
   `{"type": "start", "version": 1, "token": "...", "voice_id": "...", "settings": {...}, "realtime": true}`.
   `settings` (optional) overrides any subset of the stream settings within the ranges below; `realtime` (default
   true) paces the output in real time, false sends each block as soon as it is converted (for files); `seed`
   (optional) makes the diffusion noise reproducible; `resume` (optional) reattaches to an earlier session, see 7.
3. The server answers with a `ReadyEvent`: the session id, a resume token, the audio format (48 kHz, 20 ms frames),
   the block length, and the full effective settings.
4. The client sends its microphone as binary messages: one Opus packet (48 kHz mono, 20 ms) per message, in order,
   each at most `MAX_FRAME_BYTES`. Binary messages before the start message are an error (`not_started`).
5. For each block of `block_ms` input, the server sends a `BlockEvent`, then the block's converted audio as binary
   messages in the same Opus format. When the server falls behind it drops input rather than let latency grow,
   and says so with a `LateEvent`. `WarningEvent`s report conditions that do not stop the stream.
6. At any time the client may send `SetVoiceMessage` (`{"type": "set_voice", "voice_id": "..."}`); the server
   confirms with a `VoiceSetEvent` that names the first block converted with the new voice.
   Likewise `SetControlsMessage` (`{"type": "set_controls", "input_gain_db": 6}`, any subset of `ControlOverrides`:
   silence threshold and hangover, input and output gain, loudness matching, monitor, pitch shift, noise
   suppression) changes the stream's controls from the next block converted; the server confirms with a
   `ControlsSetEvent` holding all of them. The start message may carry the same fields as `controls` (a resume
   must send them again: they live with the connection).
7. To finish, the client sends `EndMessage` (`{"type": "end"}`). The server converts the remaining input, sends an
   `EndEvent` with totals, and closes with code 1000.
   Resuming: a connection that closes without `end` or `error` (the network, or an ingress replica that went away)
   leaves its session on its converter for `detached_session_ttl_s` (30 s by default). The client opens a new socket
   (any ingress replica) and sends its start message again with `resume`: the session id and the latest resume
   token (from `ReadyEvent`, replaced by a `ResumeTokenEvent` whenever the session moved to another converter).
   The token in the start message is checked again. Settings, when sent, must be the session's own; a different
   `voice_id` switches the voice. The new `ReadyEvent` keeps the session id, brings a new resume token, and says
   in `resumed_at_block` which block index comes next: input from that block on was not converted, so a client
   that can sends it again. If the session is gone, the answer is `session_expired` and the client starts anew.
   WebRTC calls resume the same way on a new signalling socket, with a new offer; a call whose media connection
   failed after it had worked (`connection_failed`) can be resumed too.
8. Errors: the server sends an `ErrorEvent` with a stable `ErrorCode` and closes the socket with `close_code(code)`.
   The one exception is `unknown_voice` in answer to `set_voice`: the stream goes on with the previous voice.

Text messages are at most `MAX_TEXT_BYTES`. Unknown fields are rejected, so a typo never goes unnoticed.
Limits (app/transport/limits.py, set in the ingress config): real-time audio may arrive at most a few times faster than
real time (a resumed session's resend, step 7, is allowed on top, once) and text messages a few a second (`too_fast`); a
session lasts at most `max_session_s` (`session_too_long`); the start message must come within `start_timeout_s` of the
connection (`not_started`); a session that receives no media at all for `idle_input_timeout_s` ends (`idle_timeout`:
silence is media, and so are DTX packets). Converted audio the client does not take in time (it sends faster than real
time and reads in real time) waits at most `max_output_backlog_s`; beyond that the oldest is dropped and a `warning`
event with code `output_dropped` says so.

WebRTC calls (`/v1/rtc`, spelled out step by step in app/transport/webrtc.py) reuse these messages and events on a
signalling WebSocket, plus `OfferMessage` and `AnswerEvent` for the SDP; the audio travels on the call's track
instead of binary messages. Their text messages are parsed by `parse_rtc_message`, whose limit fits an SDP offer.
RTP calls (`/v1/rtp`, app/transport/rtp.py) send `RtpStartMessage` (the start message plus `rtp`: payload type,
the peer's SSRC and where the converted voice goes) and receive `RtpEvent` (where to send) after `ready`; their
audio is RTP over UDP.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from enum import StrEnum
from typing import Annotated, Any, Literal, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from app.serving.controls import StreamControls
from app.streaming.settings import SettingsError, StreamSettings

PROTOCOL_VERSION = 1
M = TypeVar("M")  # a parsed message
SAMPLE_RATE = 48_000  # Opus's native rate: no resampling inside the codec
FRAME_MS = 20  # one Opus packet; also one content frame of the model

# An Opus frame holds at most 1275 bytes (RFC 6716, section 3.2.1), which is also what the encoder's top bitrate,
# 510 kbit/s, fills in 20 ms. A packet adds its TOC byte and, when it splits 20 ms into several frames, a few length
# and padding bytes. 1500 leaves that slack while still refusing what is clearly not one packet: 20 ms of 16-bit PCM
# at 48 kHz is 1920 bytes.
MAX_FRAME_BYTES = 1500
MAX_TEXT_BYTES = 4096  # a start message with every setting fits in well under 1 KiB
# An audio-only offer with a dozen ICE candidates is 3-6 KiB; a browser's largest offers (every codec, simulcast video)
# stay well under 64 KiB. JSON escapes the SDP's CR LF line ends as four characters, at most doubling its size.
MAX_SDP_BYTES = 64 * 1024
MAX_RTC_TEXT_BYTES = 2 * MAX_SDP_BYTES


class Range(NamedTuple):
    low: float
    high: float


# What one client may ask for on a live stream. StreamSettings accepts wider values, which offline conversion can
# afford; these keep a stream real-time on a GPU shared with other streams.
BLOCK_TIME_RANGE = Range(0.08, 1.0)  # shorter blocks spend most of a step on overhead; longer ones are not live
CROSSFADE_TIME_RANGE = Range(0.02, 0.2)  # at least one content frame; longer only blurs the block seams
CE_CONTEXT_RANGE = Range(0.5, 5.0)  # less context hurts the content features; the encoder's cost grows with it
DIT_CONTEXT_RANGE = Range(0.0, 5.0)  # and never above ce_context, checked by `apply` where both values are known
LOOKAHEAD_RANGE = Range(0.02, 0.5)  # adds directly to latency
DIFFUSION_STEPS_RANGE = Range(1, 30)  # one DiT forward each; past 30 a block costs more than it lasts
CFG_RATE_RANGE = Range(0.0, 1.5)  # higher guidance only adds artefacts
MAX_PROMPT_RANGE = Range(1.0, 10.0)  # the prompt is part of every block's DiT sequence, so it costs on every block
SILENCE_THRESHOLD_RANGE = Range(-120.0, 0.0)  # dBFS; -120 gates only (near) digital silence
SILENCE_HANGOVER_RANGE = Range(0.0, 1.0)  # seconds; the window holds at least 0.5 s of input to look back on
GAIN_DB_RANGE = Range(-30.0, 30.0)
RMS_MIX_RATE_RANGE = Range(0.0, 1.0)  # RVC's convention: 1 = the model's loudness, 0 = the input's
PITCH_SHIFT_RANGE = Range(-12.0, 12.0)  # semitones; past an octave the shift fails (README: Pitch shift)

# How a client tries again a start refused for capacity (`overloaded`, `rate_limited`): after the error's
# `retry_after_s` (START_RETRY_DEFAULT_S when it has none), doubled for each retry already made (a wave of callers
# must not come back at once), at most START_RETRY_MAX_S, up to START_RETRIES times. The Python client follows it,
# and the page reads it from GET /v1/limits (`published_limits`).
START_RETRIES = 5
START_RETRY_DEFAULT_S = 5.0
START_RETRY_MAX_S = 120.0

ID_MAX_CHARS = 64  # session, voice and resume ids are short tokens; a longer one is a broken client
TOKEN_MAX_CHARS = 1024


class ErrorCode(StrEnum):
    """Stable error codes: clients branch on these, so a code is never renamed or reused."""

    bad_message = "bad_message"  # invalid JSON, unknown message type, or missing, invalid or unknown fields
    unsupported_version = "unsupported_version"  # the start message asks for a protocol version this server lacks
    not_started = "not_started"  # a binary message arrived before the start message
    bad_audio = "bad_audio"  # a binary message is not a decodable Opus packet
    frame_too_large = "frame_too_large"  # over MAX_FRAME_BYTES (binary) or MAX_TEXT_BYTES (rtc: MAX_RTC_TEXT_BYTES)
    unknown_voice = "unknown_voice"  # no such voice, or not one this key may use
    unauthorized = "unauthorized"  # the session token is missing, malformed, forged or expired
    bad_settings = "bad_settings"  # settings outside the allowed ranges, or contradicting each other
    overloaded = "overloaded"  # no capacity for another stream now; retry after `retry_after_s`
    rate_limited = "rate_limited"  # this key opened too many streams; retry after `retry_after_s`
    session_expired = "session_expired"  # `resume` named a session the server no longer holds
    bad_offer = "bad_offer"  # WebRTC: the SDP offer is malformed, sends no audio, or has no codec in common
    connection_failed = "connection_failed"  # WebRTC: no offer or no media connection in time, or the media path
    # died; RTP: no packet from the peer in time, or no free port
    internal = "internal"  # a server fault; the message carries no internals
    too_fast = "too_fast"  # audio faster than the allowed multiple of real time, or too many text messages a second
    session_too_long = "session_too_long"  # the session reached the server's maximum length; start a new one
    address_refused = "address_refused"  # RTP: the service sends to no such address (private, link-local, ...)
    idle_timeout = "idle_timeout"  # no media at all for idle_input_timeout_s: the session ended and freed its slot


# WebSocket close codes (RFC 6455, section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013

_CLOSE_CODES = {
    ErrorCode.bad_message: CLOSE_POLICY_VIOLATION,
    ErrorCode.unsupported_version: CLOSE_UNSUPPORTED_DATA,
    ErrorCode.not_started: CLOSE_POLICY_VIOLATION,
    ErrorCode.bad_audio: CLOSE_UNSUPPORTED_DATA,
    ErrorCode.frame_too_large: CLOSE_MESSAGE_TOO_BIG,
    ErrorCode.unknown_voice: CLOSE_POLICY_VIOLATION,
    ErrorCode.unauthorized: CLOSE_POLICY_VIOLATION,
    ErrorCode.bad_settings: CLOSE_POLICY_VIOLATION,
    ErrorCode.overloaded: CLOSE_TRY_AGAIN_LATER,
    ErrorCode.rate_limited: CLOSE_TRY_AGAIN_LATER,
    ErrorCode.session_expired: CLOSE_POLICY_VIOLATION,
    ErrorCode.bad_offer: CLOSE_POLICY_VIOLATION,
    ErrorCode.connection_failed: CLOSE_INTERNAL_ERROR,  # the call cannot go on; the error code says why
    ErrorCode.internal: CLOSE_INTERNAL_ERROR,
    ErrorCode.too_fast: CLOSE_POLICY_VIOLATION,
    ErrorCode.session_too_long: CLOSE_POLICY_VIOLATION,
    ErrorCode.address_refused: CLOSE_POLICY_VIOLATION,
    ErrorCode.idle_timeout: CLOSE_POLICY_VIOLATION,
}


def close_code(code: ErrorCode) -> int:
    """The WebSocket close code that follows an error event with this code."""
    return _CLOSE_CODES[code]


class ProtocolError(ValueError):
    """A client message the server cannot accept; becomes an `ErrorEvent` with the same code and message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def event(self) -> ErrorEvent:
        return ErrorEvent(code=self.code, message=self.message)


class _Message(BaseModel):
    # Strict: "10" is not 10 and true is not 1 on the wire. Frozen: a parsed message is a value, not state.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _bounded(bounds: Range) -> Any:
    return Field(default=None, ge=bounds.low, le=bounds.high)


# Client -> server


class SettingsOverrides(_Message):
    """Any subset of `StreamSettings`; null or absent keeps the server's value."""

    block_time: float | None = _bounded(BLOCK_TIME_RANGE)
    crossfade_time: float | None = _bounded(CROSSFADE_TIME_RANGE)
    ce_context: float | None = _bounded(CE_CONTEXT_RANGE)
    dit_context: float | None = _bounded(DIT_CONTEXT_RANGE)
    lookahead: float | None = _bounded(LOOKAHEAD_RANGE)
    diffusion_steps: int | None = _bounded(DIFFUSION_STEPS_RANGE)
    cfg_rate: float | None = _bounded(CFG_RATE_RANGE)
    max_prompt: float | None = _bounded(MAX_PROMPT_RANGE)

    def apply(self, base: StreamSettings) -> StreamSettings:
        """The base settings with these overrides; contradictions (dit_context > ce_context) raise bad_settings."""
        try:
            return dataclasses.replace(base, **self.model_dump(exclude_none=True))
        except SettingsError as error:
            raise ProtocolError(ErrorCode.bad_settings, str(error)) from error


class ControlOverrides(_Message):
    """Any subset of the stream's controls (app/serving/controls.py); absent or null keeps the current value."""

    silence_threshold_dbfs: float | None = _bounded(SILENCE_THRESHOLD_RANGE)
    silence_hangover_s: float | None = _bounded(SILENCE_HANGOVER_RANGE)
    input_gain_db: float | None = _bounded(GAIN_DB_RANGE)
    output_gain_db: float | None = _bounded(GAIN_DB_RANGE)
    rms_mix_rate: float | None = _bounded(RMS_MIX_RATE_RANGE)
    monitor: bool | None = None  # send the input back unconverted
    pitch_shift: float | None = _bounded(PITCH_SHIFT_RANGE)  # semitones; the converted voice's pitch, formants kept
    noise_suppression: bool | None = None  # RNNoise on the input, before the converter hears it

    def changes(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude={"type"})


def _field_limits(model: type[BaseModel]) -> dict[str, dict[str, Any]]:
    """Each field's bounds as the model enforces them: {"min": ge, "max": le}, empty for a field with none."""
    limits: dict[str, dict[str, Any]] = {}
    for name, field in model.model_fields.items():
        bounds: dict[str, Any] = {}
        for constraint in field.metadata:  # pydantic keeps Field(ge=..., le=...) as annotated_types Ge and Le
            if hasattr(constraint, "ge"):
                bounds["min"] = constraint.ge
            elif hasattr(constraint, "le"):
                bounds["max"] = constraint.le
        limits[name] = bounds
    return limits


def published_limits() -> dict[str, Any]:
    """What GET /v1/limits answers, so that a client's fields span exactly what the server accepts: the range of
    each setting and control (read from the models that validate them), each control's neutral value (what a stream
    that never sends it gets), and the retry policy for a refused start."""
    neutral = dataclasses.asdict(StreamControls())
    controls = {name: {**bounds, "default": neutral[name]} for name, bounds in _field_limits(ControlOverrides).items()}
    return {
        "settings": _field_limits(SettingsOverrides),
        "controls": controls,
        "start_retry": {"retries": START_RETRIES, "default_s": START_RETRY_DEFAULT_S, "max_s": START_RETRY_MAX_S},
    }


class ResumeRequest(_Message):
    session_id: str = Field(min_length=1, max_length=ID_MAX_CHARS)
    resume_token: str = Field(min_length=1, max_length=TOKEN_MAX_CHARS)


class StartMessage(_Message):
    type: Literal["start"]
    version: int
    token: str = Field(min_length=1, max_length=TOKEN_MAX_CHARS)
    voice_id: str = Field(min_length=1, max_length=ID_MAX_CHARS)
    settings: SettingsOverrides | None = None
    realtime: bool = True  # pace the output in real time; false sends blocks as fast as they are converted
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)  # the diffusion noise seed, for reproducible output
    resume: ResumeRequest | None = None
    controls: ControlOverrides | None = None  # the stream's starting controls (neutral when absent)

    @field_validator("version")
    @classmethod
    def _supported_version(cls, version: int) -> int:
        # A custom error type, so that parse_client_message can tell it apart from a malformed field.
        if version != PROTOCOL_VERSION:
            raise PydanticCustomError(
                "unsupported_version",
                "protocol version {version} is not supported; this server speaks version {supported}",
                {"version": version, "supported": PROTOCOL_VERSION},
            )
        return version


class SetVoiceMessage(_Message):
    type: Literal["set_voice"]
    voice_id: str = Field(min_length=1, max_length=ID_MAX_CHARS)


class SetControlsMessage(ControlOverrides):
    type: Literal["set_controls"]


class EndMessage(_Message):
    type: Literal["end"]


class OfferMessage(_Message):
    """WebRTC only: the client's complete SDP offer, ICE candidates included (no trickle)."""

    type: Literal["offer"]
    sdp: str = Field(min_length=1, max_length=MAX_SDP_BYTES)


class RtpAddress(_Message):
    host: str = Field(min_length=2, max_length=45)  # an IP address literal: the service resolves no names
    port: int = Field(ge=1, le=65535)

    @field_validator("host")
    @classmethod
    def _ip_literal(cls, host: str) -> str:
        ipaddress.ip_address(host)  # a ValueError here is a validation error
        return host


class RtpOptions(_Message):
    """RTP only: how the peer's Opus arrives (RFC 7587) and where the converted voice goes."""

    payload_type: int = Field(96, ge=96, le=127)  # a dynamic payload type, both ways
    ssrc: int | None = Field(None, ge=0, le=2**32 - 1)  # the peer's; null = the first packet's
    # Where the converted voice is sent; null = back to the source of the peer's packets. Either must pass the
    # service's outbound address filter (app/transport/addresses.py).
    address: RtpAddress | None = None


class RtpStartMessage(StartMessage):
    rtp: RtpOptions = Field(default_factory=RtpOptions)


ClientMessage = Annotated[StartMessage | SetVoiceMessage | SetControlsMessage | EndMessage, Field(discriminator="type")]
_CLIENT_MESSAGE: TypeAdapter[StartMessage | SetVoiceMessage | SetControlsMessage | EndMessage] = TypeAdapter(
    ClientMessage
)


def parse_client_message(text: str) -> StartMessage | SetVoiceMessage | SetControlsMessage | EndMessage:
    """Validate one text message from the client; every problem is a `ProtocolError` naming the field at fault."""
    return _parse(_CLIENT_MESSAGE, text, MAX_TEXT_BYTES)


def _parse(adapter: TypeAdapter[M], text: str, limit: int) -> M:
    size = len(text.encode(errors="surrogatepass"))  # lone surrogates must not escape as UnicodeError
    if size > limit:
        raise ProtocolError(ErrorCode.frame_too_large, f"text message is {size} bytes; the limit is {limit}")
    try:
        return adapter.validate_json(text)
    except ValidationError as error:
        raise _protocol_error(error) from None


RtcClientMessage = Annotated[
    StartMessage | OfferMessage | SetVoiceMessage | SetControlsMessage | EndMessage, Field(discriminator="type")
]
_RTC_CLIENT_MESSAGE: TypeAdapter[StartMessage | OfferMessage | SetVoiceMessage | SetControlsMessage | EndMessage] = (
    TypeAdapter(RtcClientMessage)
)


def parse_rtc_message(text: str) -> StartMessage | OfferMessage | SetVoiceMessage | SetControlsMessage | EndMessage:
    """`parse_client_message` for the WebRTC signalling socket: the same messages plus the offer, which needs a
    larger size limit than everything `/v1/stream` receives."""
    return _parse(_RTC_CLIENT_MESSAGE, text, MAX_RTC_TEXT_BYTES)


RtpClientMessage = Annotated[
    RtpStartMessage | SetVoiceMessage | SetControlsMessage | EndMessage, Field(discriminator="type")
]
_RTP_CLIENT_MESSAGE: TypeAdapter[RtpStartMessage | SetVoiceMessage | SetControlsMessage | EndMessage] = TypeAdapter(
    RtpClientMessage
)


def parse_rtp_message(text: str) -> RtpStartMessage | SetVoiceMessage | SetControlsMessage | EndMessage:
    """`parse_client_message` for the RTP control socket: its start message carries `rtp`."""
    return _parse(_RTP_CLIENT_MESSAGE, text, MAX_TEXT_BYTES)


def _protocol_error(error: ValidationError) -> ProtocolError:
    problems = error.errors(include_url=False)
    for problem in problems:
        if problem["type"] == "unsupported_version":
            return ProtocolError(ErrorCode.unsupported_version, problem["msg"])
    # The location starts with the message type (the union's tag), then the field: ("start", "settings", "cfg_rate").
    in_settings = all(problem["loc"][1:2] == ("settings",) for problem in problems)
    code = ErrorCode.bad_settings if in_settings else ErrorCode.bad_message
    return ProtocolError(code, "; ".join(_describe(problem["loc"], problem["msg"]) for problem in problems))


def _describe(location: tuple[int | str, ...], message: str) -> str:
    if not location:  # the whole message: bad JSON, not an object, no or unknown type
        return message
    return f"{'.'.join(str(part) for part in location)}: {message}"


def check_audio_frame(packet: bytes) -> None:
    """Size checks on one binary message before it reaches the Opus decoder."""
    if len(packet) > MAX_FRAME_BYTES:
        raise ProtocolError(
            ErrorCode.frame_too_large,
            f"binary message is {len(packet)} bytes; one 20 ms Opus packet is at most {MAX_FRAME_BYTES}",
        )
    if not packet:
        raise ProtocolError(ErrorCode.bad_audio, "empty binary message; an Opus packet holds at least its TOC byte")


# Server -> client. Each event serialises with `.model_dump_json()`.


class ReadyEvent(_Message):
    type: Literal["ready"] = "ready"
    version: int = PROTOCOL_VERSION
    session_id: str
    resume_token: str  # with session_id, lets a dropped client resume this session (step 7)
    sample_rate: int = SAMPLE_RATE  # of the Opus packets, both ways
    frame_ms: int = FRAME_MS  # audio per Opus packet, both ways
    block_ms: int  # input per block: the effective block_time rounded to whole 20 ms frames
    settings: StreamSettings  # the effective settings: server defaults with the client's overrides
    resumed_at_block: int | None = None  # set when this answers a resume: the index the next block will have


class ResumeTokenEvent(_Message):
    """The session moved to another converter: resume with this token from now on (the old one names the old)."""

    type: Literal["resume_token"] = "resume_token"
    resume_token: str


class BlockEvent(_Message):
    type: Literal["block"] = "block"
    index: int  # 0, 1, 2, ... continuing across a resume
    input_start_ms: int  # the input position this block answers: index * block_ms
    latency_ms: float  # from the arrival of the block's last input packet to this event
    queue_ms: float  # of latency_ms, the time spent waiting for a batched model step
    steps: int  # diffusion steps actually run; below the setting when the server is short of time
    silent: bool  # the input was silence, so the model was skipped and silence sent


class VoiceSetEvent(_Message):
    type: Literal["voice_set"] = "voice_set"
    voice_id: str
    from_block: int  # the first block index converted with this voice


class ControlsSetEvent(_Message):
    """Answers `set_controls`: the stream's controls now, all of them (silence_threshold_dbfs null: the server's)."""

    type: Literal["controls_set"] = "controls_set"
    controls: StreamControls


class LateEvent(_Message):
    type: Literal["late"] = "late"
    dropped_ms: int  # input dropped just now because the server fell behind real time
    total_dropped_ms: int  # dropped in this session so far


class WarningEvent(_Message):
    type: Literal["warning"] = "warning"
    code: str  # machine-readable and stable, like ErrorCode, but the stream goes on
    message: str


class ErrorEvent(_Message):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str  # for people; never holds tokens, keys or server internals
    retry_after_s: float | None = None  # set with overloaded and rate_limited


class EndEvent(_Message):
    type: Literal["end"] = "end"
    blocks: int  # blocks converted in the session
    dropped_ms: int  # input dropped in the session (the sum of the late events)


class AnswerEvent(_Message):
    """WebRTC only: the server's complete SDP answer, ICE candidates included."""

    type: Literal["answer"] = "answer"
    sdp: str


class RtpEvent(_Message):
    """RTP only, after `ready`: where the peer sends its RTP, and how the converted voice comes back."""

    type: Literal["rtp"] = "rtp"
    host: str  # the address of the node holding the call, as peers reach it
    port: int  # UDP; a new one for every connection, a resumed call's too
    payload_type: int  # of the packets both ways
    ssrc: int  # of the converted voice's packets


ServerEvent = Annotated[
    ReadyEvent
    | ResumeTokenEvent
    | BlockEvent
    | VoiceSetEvent
    | ControlsSetEvent
    | LateEvent
    | WarningEvent
    | ErrorEvent
    | EndEvent,
    Field(discriminator="type"),
]
RtcServerEvent = Annotated[
    ReadyEvent
    | ResumeTokenEvent
    | AnswerEvent
    | BlockEvent
    | VoiceSetEvent
    | ControlsSetEvent
    | LateEvent
    | WarningEvent
    | ErrorEvent
    | EndEvent,
    Field(discriminator="type"),
]
