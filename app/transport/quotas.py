"""Per-key quotas where live sessions start and end, in protocol terms (the metering itself: app/auth/usage.py).

Every transport goes through `StreamServices`, which calls this: `open` when a new session starts (the key, and the
generation of its secret the token was issued for, are checked before a converter is asked, and the admission is
undone if the converter refuses), `resumed` when a connection takes over a held session, `ended` when a connection
lets go of its session. While a session runs, its connection awaits `watch`, which raises when the meter's periodic
re-check finds the key revoked, its token's secret rotated away, or its daily time used up. Leases are tracked per
`LiveSession` object, that is per connection: when a session is resumed on a new connection, the old connection's
release cannot end the new one's lease. Usage is metered in the audio the session receives (`input_seconds`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import NoReturn

from app.auth.tokens import TokenError
from app.auth.usage import Lease, QuotaExceeded, UsageMeter
from app.serving.live import LiveSession
from app.serving.wire import OpenReply
from app.transport.protocol import ErrorCode, ProtocolError


class RateLimited(ProtocolError):
    """`rate_limited`, with how long this key should wait (until tomorrow, for a daily quota)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(ErrorCode.rate_limited, message)
        self.retry_after_s = retry_after_s


class SessionQuotas:
    """Admission and metering of live sessions by key; with no meter, every session is admitted and none counted."""

    def __init__(self, meter: UsageMeter | None = None) -> None:
        self.meter = meter
        self._leases: dict[LiveSession, Lease] = {}  # LiveSession hashes by identity: one entry per connection

    async def open(self, owner: str, session: LiveSession, generation: int = 0) -> OpenReply:
        """Admits and opens a new session; raises `rate_limited` or `unauthorized` (revoked key) before opening."""
        if self.meter is None:
            return await session.open()
        admission = self.meter.acquire(owner, session.session_id, generation, audio=lambda: session.input_seconds)
        self._leases[session] = await self._admitted(admission)
        try:
            return await session.open()
        except BaseException:
            self.ended(session, held=False)
            raise

    async def resumed(self, owner: str, session: LiveSession, generation: int = 0) -> None:
        """Admits a session taken over from a dropped connection; closes it when its key may no longer have it."""
        if self.meter is None:
            return
        try:
            admission = self.meter.adopt(owner, session.session_id, generation, audio=lambda: session.input_seconds)
            self._leases[session] = await self._admitted(admission)
        except ProtocolError:
            with contextlib.suppress(Exception):  # the client is refused and cannot use the session any more
                await session.close()
            raise

    async def watch(self, session: LiveSession) -> NoReturn:
        """Raises `unauthorized` or `rate_limited` once the session's key may no longer have it; waits until then."""
        lease = self._leases.get(session)
        if lease is None:  # not metered
            await asyncio.Event().wait()
        assert lease is not None
        raise refused(await lease.refused())

    def ended(self, session: LiveSession, held: bool) -> None:
        """The connection let go of its session: closed, or `held` on its converter for a resume."""
        lease = self._leases.pop(session, None)
        if lease is not None and self.meter is not None:
            self.meter.release(lease, held=held)

    @staticmethod
    async def _admitted(admission: Awaitable[Lease]) -> Lease:
        try:
            return await admission
        except (QuotaExceeded, TokenError) as error:
            raise refused(error) from error


def refused(reason: Exception) -> ProtocolError:
    """The protocol error for a key that may not have a session (now): its quota, or its credential."""
    if isinstance(reason, QuotaExceeded):
        return RateLimited(str(reason), reason.retry_after_s)
    return ProtocolError(ErrorCode.unauthorized, f"invalid session token: {reason}")
