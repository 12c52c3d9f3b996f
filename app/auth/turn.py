"""Short-lived TURN credentials by the TURN REST API convention (coturn's `use-auth-secret`), one username per API key
and time window.

The username is `<expiry unix time>:<key id>` and the password base64(HMAC-SHA1(secret, username)), with the secret
shared with the TURN server, which checks both on its own: no user database, and a credential that leaks stops
working when it expires. Expiries fall on window boundaries (windows of half the lifetime), so every call a key
makes within a window gets the same username, a credential is valid for between half and all of `ttl_s`, and never
longer: a revoked key's credentials stop within `ttl_s`. coturn's per-user allocation quota counts the username
without its expiry, the key id, so it bounds what one key holds on the relay however many credentials it fetched.
A credential is needed only to make an allocation; one made (a call's relay) keeps refreshing after it expires.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field

from app.serving.config import IceServer


@dataclass(frozen=True)
class TurnCredentials:
    secret: bytes = field(repr=False)
    urls: tuple[str, ...]
    ttl_s: float  # the longest a credential is valid

    def expiry(self, now: float) -> int:
        """The end of the window after the current one (unix seconds): more than ttl_s / 2 away, at most ttl_s."""
        window = max(1, int(self.ttl_s // 2))
        return (int(now) // window + 2) * window

    def for_key(self, key_id: str, now: float) -> IceServer:
        username = f"{self.expiry(now)}:{key_id}"
        digest = hmac.new(self.secret, username.encode(), hashlib.sha1).digest()
        return IceServer(urls=list(self.urls), username=username, credential=base64.b64encode(digest).decode())
