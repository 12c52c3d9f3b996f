"""What one connection may send, and for how long: the limits both live transports enforce in their reader loops.

- Audio of a real-time stream: at most `audio_speed` times real time, sustained, plus `audio_burst_s` seconds at once
  (a client catching up after a network stall sends its backlog in one go). A resumed session may also send again
  what its converter had not reached when the old connection dropped, plus what was recorded while it was down: the
  protocol asks for that resend, so it is allowed on top, once (`allow_resend`). Anything faster is not a microphone: it
  costs decoding and is then dropped as late input anyway. Streams that are not real time need no such limit, since
  the server reads their input only as fast as it converts it.
- Text messages: at most `text_per_s` a second plus `text_burst` at once; a client sends a handful per session.
- Session length: `max_session_s` from the start of the connection, so that a forgotten client does not hold a
  converter slot forever.
- The start message: within `start_timeout_s` of the socket opening. A socket that never sends one would otherwise
  hold one of the replica's connection slots forever, and a thousand of them, which need no credential, would take
  every slot.
- Idle input: a session with no media at all for `idle_input_s` ends, so that a client that went quiet without
  hanging up (a stalled page, a dead network behind a live socket) frees its converter slot. Silence is media (a
  microphone sends it as packets), and so are DTX keep-alives; only the absence of packets counts.

A violation raises a `ProtocolError` (`too_fast`, `session_too_long`, `not_started`, `idle_timeout`), which ends only
that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from app.serving.config import IngressConfig
from app.transport.protocol import ErrorCode, ProtocolError

T = TypeVar("T")
Clock = Callable[[], float]
# Refills add up float time steps: without slack, a client exactly at the rate would be refused for a rounding error.
ROUNDING_SLACK = 1e-9
# The most a resend may hold: a dropped client has the converter's detached-session TTL (30 s by default) to come
# back and keeps 30 s of input to send again (client/stream_client.py); beyond that it is no longer a resend.
MAX_RESEND_S = 60.0


class TokenBucket:
    """`rate` units a second, sustained, and up to `burst` at once; starts full."""

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"rate and burst must be positive, not {rate} and {burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._level = burst
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        refilled = min(self.burst, self._level + (now - self._updated) * self.rate)
        self._level = max(self._level, refilled)  # a credit above `burst` is kept until it is spent
        self._updated = now

    def time_until(self, amount: float) -> float:
        """Seconds until the bucket holds `amount` (0 when it does now); `amount` must not exceed `burst`."""
        self._refill()
        return max(0.0, (amount - self._level) / self.rate)

    def take(self, amount: float = 1.0) -> bool:
        """Takes `amount` if the bucket holds it; False (and nothing taken) otherwise."""
        self._refill()
        if self._level < amount - ROUNDING_SLACK:
            return False
        self._level -= amount
        return True

    def credit(self, amount: float) -> None:
        """Adds `amount` once, beyond `burst` if need be (what refills never exceed)."""
        self._level += max(0.0, amount)


@dataclass(frozen=True)
class MessageLimits:
    """The limits of every connection, from the ingress configuration."""

    audio_speed: float
    audio_burst_s: float
    text_per_s: float
    text_burst: int
    max_session_s: float
    start_timeout_s: float
    idle_input_s: float | None
    max_output_backlog_s: float

    @classmethod
    def default(cls) -> MessageLimits:
        """The configuration's defaults, written down once, there."""
        return cls.from_config(IngressConfig())

    @classmethod
    def from_config(cls, config: IngressConfig) -> MessageLimits:
        return cls(
            audio_speed=config.max_audio_speed,
            audio_burst_s=config.audio_burst_s,
            text_per_s=config.max_text_per_s,
            text_burst=config.text_burst,
            max_session_s=config.max_session_s,
            start_timeout_s=config.start_timeout_s,
            idle_input_s=config.idle_input_timeout_s,
            max_output_backlog_s=config.max_output_backlog_s,
        )


class ConnectionLimits:
    """One connection's allowance; its session-length clock starts when it is created."""

    def __init__(self, limits: MessageLimits, clock: Clock = time.monotonic) -> None:
        self.limits = limits
        self._audio = TokenBucket(limits.audio_speed, limits.audio_burst_s, clock)
        self._text = TokenBucket(limits.text_per_s, limits.text_burst, clock)
        self._deadline = clock() + limits.max_session_s
        self._clock = clock
        self._last_input = clock()
        self._idle_paused = 0  # > 0 while the server itself holds input back (a file waiting for room)

    def count_earlier(self, seconds: float) -> None:
        """A resumed session's time on its earlier connections counts towards its maximum length too."""
        self._deadline -= max(0.0, seconds)

    def allow_resend(self, seconds: float) -> None:
        """A resumed session's client sends `seconds` of input again at once: the protocol's resend, not a flood."""
        self._audio.credit(min(seconds, MAX_RESEND_S))

    def audio(self, seconds: float) -> None:
        """Counts `seconds` of received real-time audio; too_fast beyond the allowance."""
        if not self._audio.take(seconds):
            raise ProtocolError(
                ErrorCode.too_fast,
                f"audio arrives faster than {self.limits.audio_speed:g} times real time; send it as it is recorded",
            )

    def text(self) -> None:
        """Counts one received text message; too_fast beyond the allowance."""
        if not self._text.take():
            raise ProtocolError(
                ErrorCode.too_fast, f"more than {self.limits.text_per_s:g} text messages a second on this connection"
            )

    async def first(self, message: Awaitable[T]) -> T:
        """`message`, the connection's first one, unless `start_timeout_s` passes first: then not_started."""
        try:
            async with asyncio.timeout(self.limits.start_timeout_s):
                return await message
        except TimeoutError:
            raise ProtocolError(
                ErrorCode.not_started, f"no start message within {self.limits.start_timeout_s:g} s"
            ) from None

    def input_arrived(self) -> None:
        """Media arrived (any packet: audio, silence, a DTX keep-alive)."""
        self._last_input = self._clock()

    @contextlib.contextmanager
    def holding_input(self) -> Iterator[None]:
        """While the server holds input back itself (a file waiting for room), no input is no fault of the client."""
        self._idle_paused += 1
        try:
            yield
        finally:
            self._idle_paused -= 1
            self._last_input = self._clock()

    async def idle_watch(self) -> None:
        """Raises idle_timeout once no media has arrived for `idle_input_s`; never returns (waits forever when off)."""
        idle_s = self.limits.idle_input_s
        if idle_s is None:
            await asyncio.Event().wait()
            return
        while True:
            quiet = self._clock() - self._last_input
            if quiet >= idle_s and not self._idle_paused:
                raise ProtocolError(
                    ErrorCode.idle_timeout, f"no audio for {idle_s:g} s: the session ended and freed its converter"
                )
            await asyncio.sleep(max(idle_s - quiet, idle_s / 10))

    def _too_long(self) -> ProtocolError:
        return ProtocolError(
            ErrorCode.session_too_long, f"sessions last at most {self.limits.max_session_s:g} s; start a new one"
        )

    async def bounded(self, work: Awaitable[T]) -> T:
        """The result of `work`, unless the session outlives its maximum length first: then session_too_long.

        Wrapping a reader loop this way ends a session that sends nothing, too, which a check per message would not.
        """
        try:
            # A deadline already past ends `work` at its first wait.
            async with asyncio.timeout(self._deadline - self._clock()) as deadline:
                return await work
        except TimeoutError:
            if deadline.expired():
                raise self._too_long() from None
            raise  # a timeout of `work`'s own
