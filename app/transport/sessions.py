"""The services every live transport (WebSocket `/v1/stream`, WebRTC `/v1/rtc`) uses on a session.

Checking the start message, opening the LiveSession with the converter's answers mapped to protocol errors, turning
block reports into events, and the error event a failure ends with: written once, so the transports cannot drift
apart in what a client sees. What a connection does with them, in which order, is app/transport/driver.py.
"""

from __future__ import annotations

import secrets
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from app.auth.tokens import TokenClaims, TokenError, TokenSigner
from app.offload import Busy, Offload
from app.serving.live import BlockReport, ConverterClient, LateReport, LiveSession
from app.serving.metrics import Metrics, NoMetrics
from app.serving.retry_after import CapacityOutlook
from app.serving.wire import CapacityExceeded, SessionLost, UnknownVoice
from app.streaming.settings import SettingsError, StreamSettings
from app.transport.limits import MessageLimits
from app.transport.protocol import (
    BlockEvent,
    ErrorCode,
    ErrorEvent,
    LateEvent,
    ProtocolError,
    ReadyEvent,
    ResumeTokenEvent,
    SettingsOverrides,
    StartMessage,
    VoiceSetEvent,
)
from app.transport.quotas import RateLimited, SessionQuotas
from app.voices.store import VoiceNotFound, VoiceStore

# A resume token is worth nothing without its session still being held (converter: detached_session_ttl_s) and a
# valid session token next to it, so it may live as long as the longest session.
DEFAULT_RESUME_TOKEN_TTL_S = 24 * 3600


EVERY_CONVERTER_FULL = "every converter is full; try again shortly"  # with `overloaded` and a retry-after
# Times in block events to 0.1 ms: finer is clock noise, and a float's 15 digits cost 20 bytes an event more, at
# 5 events a second (1 kbit/s of a stream's 64 kbit/s budget).
MS_DECIMALS = 1


class Overloaded(ProtocolError):
    """`overloaded` because no converter can take the session, with how long the caller should wait."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(ErrorCode.overloaded, message)
        self.retry_after_s = retry_after_s


def _process_resume_tokens() -> TokenSigner:
    """Resume tokens only this process accepts: for tests and single-process use (the ingress passes a shared one)."""
    return TokenSigner(secrets.token_bytes(32), ttl_seconds=DEFAULT_RESUME_TOKEN_TTL_S)


@dataclass(frozen=True)
class StreamServices:
    """What every connection of every transport shares."""

    client: ConverterClient
    tokens: TokenSigner
    voices: VoiceStore
    # The settings under what a client asks for; None leaves that to the converter that opens the session, whose
    # defaults depend on its device (the CPU real-time profile on a CPU, see ConverterConfig.cpu_settings).
    defaults: StreamSettings | None
    resume_tokens: TokenSigner = field(default_factory=_process_resume_tokens)
    max_backlog_blocks: int = 3
    retry_after_s: float = 5.0  # for a refusal the capacity outlook does not answer (the voice store is busy)
    # What a caller refused because every converter is full should wait (the ingress: from the converters' scale-up,
    # see app/serving/retry_after.py); None: retry_after_s.
    capacity_outlook: CapacityOutlook | None = None
    opus_bitrate: int = 32000
    metrics: Metrics = field(default_factory=NoMetrics)
    open_streams: Counter[str] = field(default_factory=Counter)  # by transport
    limits: MessageLimits = field(default_factory=MessageLimits.default)  # what each connection may send, how long
    quotas: SessionQuotas = field(default_factory=SessionQuotas)  # per-key admission and usage; default: unmetered
    # Voice records are read off the event loop (a slow store would stall every stream of the replica).
    voice_checks: Offload = field(default_factory=lambda: Offload("voice-checks", workers=2, max_waiting=256))

    def stream_opened(self, transport: str) -> None:
        self.open_streams[transport] += 1
        self.metrics.record("seedvc_streams", self.open_streams[transport], transport=transport)

    def session_ended(self, session: LiveSession, held: bool) -> None:
        """A connection let go of its session (closed, or `held` on the converter for a resume): its key's lease."""
        if held:
            self.metrics.record("seedvc_sessions_detached")
        self.quotas.ended(session, held)

    def stream_closed(self, transport: str) -> None:
        self.open_streams[transport] -= 1
        self.metrics.record("seedvc_streams", self.open_streams[transport], transport=transport)

    def record_block(self, report: BlockReport) -> None:
        self.metrics.record("seedvc_block_latency_seconds", report.latency_ms / 1000)
        if report.rehomed:
            self.metrics.record("seedvc_sessions_rehomed")

    def late_event(self, late: LateReport) -> str:
        """The `late` event for input a session just dropped (and the drop counted)."""
        self.metrics.record("seedvc_dropped_input_seconds", late.dropped_ms / 1000)
        event = LateEvent(dropped_ms=round(late.dropped_ms), total_dropped_ms=round(late.total_dropped_ms))
        return event.model_dump_json()

    def check_start(self, start: StartMessage) -> TokenClaims:
        """The claims of the start message's token: the API key id it was issued to (the owner of the voices it may
        use) and the generation of the key's secret (checked when the session is admitted, see quotas)."""
        try:
            return self.tokens.verify(start.token)
        except TokenError as error:
            raise ProtocolError(ErrorCode.unauthorized, f"invalid session token: {error}") from error

    async def check_voice(self, voice_id: str, owner: str) -> None:
        """A key may use only its own voices; another key's voice is reported exactly like a missing one."""
        try:
            record = await self.voice_checks.run(self.voices.get, voice_id)
        except Busy as error:
            raise ProtocolError(ErrorCode.overloaded, "the voice store is busy; try again shortly") from error
        except (VoiceNotFound, ValueError) as error:
            raise ProtocolError(ErrorCode.unknown_voice, f"unknown voice {voice_id}") from error
        if record.owner != owner:
            raise ProtocolError(ErrorCode.unknown_voice, f"unknown voice {voice_id}")

    async def start_session(
        self, start: StartMessage, owner: str, generation: int = 0
    ) -> tuple[LiveSession, ReadyEvent]:
        """The session a checked start message asks for, new or resumed, with the `ready` event to send; `generation`
        is the token's (its key's secret must still be valid)."""
        if start.resume is not None:
            return await self.resume_session(start, owner, generation)
        return await self.open_session(start, owner, generation)

    async def open_session(
        self, start: StartMessage, owner: str, generation: int = 0
    ) -> tuple[LiveSession, ReadyEvent]:
        """Open a converter session for a checked start message; returns it with the `ready` event to send."""
        settings = self._requested_settings(start)
        await self.check_voice(start.voice_id, owner)
        session = LiveSession(
            self.client,
            session_id=uuid.uuid4().hex,
            voice_id=start.voice_id,
            settings=settings,
            seed=start.seed if start.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "big"),
            max_backlog_blocks=self.max_backlog_blocks,
        )
        try:
            await self.quotas.open(owner, session, generation)  # the key's quotas (rate_limited), then a converter
        except CapacityExceeded as error:
            raise await self.every_converter_full() from error
        except UnknownVoice as error:
            raise ProtocolError(ErrorCode.unknown_voice, f"unknown voice {start.voice_id}") from error
        except SettingsError as error:
            # Within the live ranges, yet not streamable by the converter's model: with no DiT context (dit_context 0)
            # the vocoder can fall a few samples short of a block. Through Ray, `cause` is the converter's own error
            # (the error itself prints as a traceback).
            raise ProtocolError(ErrorCode.bad_settings, str(getattr(error, "cause", error))) from error
        return session, self._ready(session, owner, resumed=False)

    async def resume_session(
        self, start: StartMessage, owner: str, generation: int = 0
    ) -> tuple[LiveSession, ReadyEvent]:
        """Take over the session a dropped connection left on its converter; `session_expired` when that is no
        longer possible (or the resume token is not this caller's for this session)."""
        assert start.resume is not None
        session_id = start.resume.session_id
        try:
            claims = self.resume_tokens.verify(start.resume.resume_token)
        except TokenError as error:
            raise ProtocolError(ErrorCode.session_expired, f"cannot resume with this resume token: {error}") from error
        if claims.key_id != owner or claims.extra.get("sid") != session_id:
            raise ProtocolError(ErrorCode.session_expired, "the resume token is for another session")
        try:
            session = await LiveSession.resume(
                self.client, session_id, claims.extra["rep"], max_backlog_blocks=self.max_backlog_blocks
            )
        except SessionLost as error:
            raise ProtocolError(ErrorCode.session_expired, "the session is no longer held; start a new one") from error
        session.started_at = float(claims.extra.get("started", session.started_at))
        if start.settings is not None and start.settings.apply(session.settings) != session.settings:
            await session.close()  # the client sees an error and cannot use the session any more: free it
            raise ProtocolError(ErrorCode.bad_settings, "a resumed session keeps its settings: send none, or the same")
        if start.voice_id != session.voice_id:
            await self.check_voice(start.voice_id, owner)
            session.request_voice(start.voice_id)
        await self.quotas.resumed(owner, session, generation)  # keeps its key's slot, or is refused (and closed)
        self.metrics.record("seedvc_sessions_resumed")
        return session, self._ready(session, owner, resumed=True)

    def _requested_settings(self, start: StartMessage) -> StreamSettings | SettingsOverrides:
        """Exact settings when this side has defaults (checked here), else what the client asked for: the converter
        applies it over its own defaults and answers bad_settings for a contradiction."""
        requested = start.settings or SettingsOverrides()
        return requested.apply(self.defaults) if self.defaults is not None else requested

    def _ready(self, session: LiveSession, owner: str, resumed: bool) -> ReadyEvent:
        assert session.opened is not None
        return ReadyEvent(
            session_id=session.session_id,
            resume_token=self.resume_token(session, owner),
            block_ms=round(1000 * session.opened.block / session.opened.sample_rate),
            settings=session.settings,
            resumed_at_block=session.next_index if resumed else None,
        )

    def resume_token(self, session: LiveSession, owner: str) -> str:
        """Binds the session to its caller and names the converter holding it (re-homing makes a new one)."""
        # `started` (unix seconds) is signed in, so that a session's maximum length spans its resumes.
        claims = {"sid": session.session_id, "rep": session.replica, "started": repr(session.started_at)}
        return self.resume_tokens.issue(owner, claims).token

    def block_events(self, session: LiveSession, owner: str) -> BlockEvents:
        return BlockEvents(session.voice_id, lambda: self.resume_token(session, owner))

    async def every_converter_full(self) -> Overloaded:
        """The refusal of a session no converter can take, with the wait the capacity outlook expects."""
        outlook = self.capacity_outlook
        return Overloaded(EVERY_CONVERTER_FULL, await outlook.expected_wait_s() if outlook else self.retry_after_s)

    def error_event(self, error: ProtocolError) -> ErrorEvent:
        if isinstance(error, RateLimited | Overloaded):
            return ErrorEvent(code=error.code, message=error.message, retry_after_s=error.retry_after_s)
        retry_after_s = self.retry_after_s if error.code == ErrorCode.overloaded else None
        return ErrorEvent(code=error.code, message=error.message, retry_after_s=retry_after_s)


class BlockEvents:
    """Block reports -> the events a client sees: `resume_token` when the session moved to another converter (the
    old token names the old one), `voice_set` when the voice changed, then `block`."""

    def __init__(self, voice_id: str, resume_token: Callable[[], str] | None = None) -> None:
        self.voice_id = voice_id
        self._resume_token = resume_token

    def of(self, report: BlockReport) -> list[str]:
        events = []
        if report.rehomed and self._resume_token is not None:
            events.append(ResumeTokenEvent(resume_token=self._resume_token()).model_dump_json())
        if report.voice_id != self.voice_id:
            self.voice_id = report.voice_id
            events.append(VoiceSetEvent(voice_id=report.voice_id, from_block=report.index).model_dump_json())
        block = BlockEvent(
            index=report.index,
            input_start_ms=round(report.input_start_ms),
            latency_ms=round(report.latency_ms, MS_DECIMALS),
            queue_ms=round(report.queue_ms, MS_DECIMALS),
            steps=report.steps,
            silent=report.silent,
        )
        events.append(block.model_dump_json())
        return events
