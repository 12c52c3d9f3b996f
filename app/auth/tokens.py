"""API keys and the signed, expiring session tokens they are exchanged for.

A client presents a long-lived API key once, as `Authorization: Bearer <key>`, and receives a session token that
expires (15 minutes by default). Streams carry only the session token, so a leaked token is worth little. The token
is `base64url(JSON claims).base64url(HMAC-SHA256(secret, first part))`, without base64 padding; the claims are
`{"sub": key_id, "exp": unix seconds}` plus what the issuer binds (string values): a session token carries `gen`, the
generation of the API key's secret it was issued for, so that rotating the key ends it (app/auth/keystore.py).
Verification checks the signature before it parses any JSON.

No secret (signing secret, API key, token) ever appears in an exception message or a repr: errors say what is
wrong, never with what.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

MIN_SECRET_BYTES = 32  # HMAC-SHA256's own output size; a shorter key weakens it
MIN_API_KEY_CHARS = 16  # shorter keys could be guessed online
MAX_TOKEN_CHARS = 1024  # ours are about 100 characters; refuse to hash anything much larger
GENERATION_CLAIM = "gen"  # the API key secret's generation, in session tokens
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


class TokenError(ValueError):
    """A credential that is missing, malformed, forged or expired. The message never contains the credential."""


@dataclass(frozen=True)
class IssuedToken:
    token: str = field(repr=False)
    expires_at: float  # unix seconds


@dataclass(frozen=True)
class TokenClaims:
    key_id: str
    expires_at: float  # unix seconds
    extra: Mapping[str, str] = field(default_factory=dict)  # what the issuer bound to the token besides its key

    @property
    def generation(self) -> int:
        """The generation of the key's secret this session token was issued for; 0 when it names none (tokens from
        before generations existed, which expire within `token_ttl_s`), -1 for a value no generation has."""
        value = self.extra.get(GENERATION_CLAIM, "0")
        return int(value) if value.isdigit() and len(value) < 10 else -1


def purpose_secret(secret: bytes, purpose: str) -> bytes:
    """A secret for one kind of token, derived from the service's secret: a token issued for one purpose (say a
    resume token) then never verifies as another (a session token), although one secret is configured."""
    return hmac.new(secret, f"seedvc token purpose: {purpose}".encode(), hashlib.sha256).digest()


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Issues and verifies tokens with one HMAC secret; `clock` is injectable so tests can move time."""

    def __init__(self, secret: bytes, ttl_seconds: float = 900, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the signing secret must be at least {MIN_SECRET_BYTES} bytes")
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, not {ttl_seconds}")
        self._secret = secret
        self._ttl = ttl_seconds
        self._clock = clock

    def __repr__(self) -> str:
        return f"TokenSigner(ttl_seconds={self._ttl})"

    def _sign(self, payload: str) -> str:
        return _encode(hmac.new(self._secret, payload.encode("ascii"), hashlib.sha256).digest())

    def issue(self, key_id: str, extra: Mapping[str, str] | None = None) -> IssuedToken:
        expires_at = self._clock() + self._ttl
        claims = json.dumps({**(extra or {}), "sub": key_id, "exp": expires_at}, separators=(",", ":"))
        payload = _encode(claims.encode())
        return IssuedToken(token=f"{payload}.{self._sign(payload)}", expires_at=expires_at)

    def verify(self, token: str) -> TokenClaims:
        """The token's claims if it is well formed, signed with our secret, and not expired; else TokenError."""
        parts = token.split(".")
        if len(token) > MAX_TOKEN_CHARS or len(parts) != 2 or not all(_BASE64URL.fullmatch(part) for part in parts):
            raise TokenError("malformed token")
        payload, signature = parts
        # Comparing the encoded forms also refuses other encodings of the same signature bytes.
        if not hmac.compare_digest(self._sign(payload), signature):
            raise TokenError("bad token signature")
        try:
            claims = json.loads(_decode(payload))
        except (ValueError, UnicodeDecodeError) as error:  # only possible with our own secret: a bug, not an attack
            raise TokenError("malformed token claims") from error
        key_id, expires_at = (claims.get("sub"), claims.get("exp")) if isinstance(claims, dict) else (None, None)
        if not isinstance(key_id, str) or not isinstance(expires_at, int | float) or isinstance(expires_at, bool):
            raise TokenError("malformed token claims")
        if self._clock() >= expires_at:
            raise TokenError("token expired")
        extra = {name: value for name, value in claims.items() if name not in {"sub", "exp"}}
        if not all(isinstance(value, str) for value in extra.values()):
            raise TokenError("malformed token claims")
        return TokenClaims(key_id=key_id, expires_at=float(expires_at), extra=extra)


class ApiKeys:
    """The API keys the service accepts, by key id. Only SHA-256 digests of the keys are kept."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        if not keys:
            raise ValueError("no API keys configured")
        short = sorted(key_id for key_id, key in keys.items() if len(key) < MIN_API_KEY_CHARS)
        if short:
            raise ValueError(f"API keys must be at least {MIN_API_KEY_CHARS} characters; too short: {short}")
        # Digests have one length, so comparing them reveals nothing about the keys' lengths either.
        self._digests = {key_id: hashlib.sha256(key.encode()).digest() for key_id, key in keys.items()}
        if len(set(self._digests.values())) != len(self._digests):
            raise ValueError("two key ids share the same API key")

    def __repr__(self) -> str:
        return f"ApiKeys(key_ids={sorted(self._digests)})"

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._digests)

    def authenticate(self, presented_key: str) -> str:
        """The id of the presented key. Every key is compared, so the time taken does not depend on which matched."""
        presented = hashlib.sha256(presented_key.encode()).digest()
        matches = [key_id for key_id, digest in self._digests.items() if hmac.compare_digest(digest, presented)]
        if not matches:
            raise TokenError("unknown API key")
        return matches[0]


@dataclass(frozen=True)
class StaticKeys:
    """The keys that only a restart changes, and which of them are development keys."""

    keys: ApiKeys | None
    development: frozenset[str]  # key ids accepted from loopback clients only


def static_keys(configured: Mapping[str, str], environment: str | None) -> StaticKeys:
    """`environment` (SEEDVC_API_KEYS, "id=key,id2=key2") when it names any key; otherwise the config's keys, which
    are development keys: the local config ships one whose value is public, so it must never open a deployment
    that sets real keys, nor work from another machine."""
    keys = {}
    for item in filter(None, (environment or "").split(",")):
        key_id, _, key = item.partition("=")
        keys[key_id.strip()] = key.strip()
    if keys:
        return StaticKeys(ApiKeys(keys), development=frozenset())
    return StaticKeys(ApiKeys(configured) if configured else None, development=frozenset(configured))


def from_loopback(host: str | None) -> bool:
    """Whether a peer address is this machine's loopback (a name, or no address at all, is not)."""
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bearer(header_value: str | None) -> str:
    """The credential of an `Authorization: Bearer <credential>` header (the scheme is case-insensitive)."""
    if header_value is None:
        raise TokenError("missing Authorization header")
    scheme, _, credential = header_value.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential or any(character.isspace() for character in credential):
        raise TokenError("the Authorization header must be 'Bearer <credential>'")
    return credential
