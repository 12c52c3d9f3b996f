"""Per-key quotas where live sessions start and end, in protocol terms (the metering itself: app/auth/usage.py).

Both transports go through `StreamServices`, which calls this: `open` when a new session starts (the key is checked
before a converter is asked, and the admission is undone if the converter refuses), `resumed` when a connection takes
over a held session, `ended` when a connection lets go of its session. Leases are tracked per `LiveSession` object,
that is per connection: when a session is resumed on a new connection, the old connection's release cannot end the
new one's lease.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable

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

    async def open(self, owner: str, session: LiveSession) -> OpenReply:
        """Admits and opens a new session; raises `rate_limited` or `unauthorized` (revoked key) before opening."""
        if self.meter is None:
            return await session.open()
        self._leases[session] = await self._admitted(self.meter.acquire(owner, session.session_id))
        try:
            return await session.open()
        except BaseException:
            self.ended(session, held=False)
            raise

    async def resumed(self, owner: str, session: LiveSession) -> None:
        """Admits a session taken over from a dropped connection; closes it when its key may no longer have it."""
        if self.meter is None:
            return
        try:
            self._leases[session] = await self._admitted(self.meter.adopt(owner, session.session_id))
        except ProtocolError:
            with contextlib.suppress(Exception):  # the client is refused and cannot use the session any more
                await session.close()
            raise

    def ended(self, session: LiveSession, held: bool) -> None:
        """The connection let go of its session: closed, or `held` on its converter for a resume."""
        lease = self._leases.pop(session, None)
        if lease is not None and self.meter is not None:
            self.meter.release(lease, held=held)

    @staticmethod
    async def _admitted(admission: Awaitable[Lease]) -> Lease:
        try:
            return await admission
        except QuotaExceeded as error:
            raise RateLimited(str(error), error.retry_after_s) from error
        except TokenError as error:
            raise ProtocolError(ErrorCode.unauthorized, f"invalid session token: {error}") from error
