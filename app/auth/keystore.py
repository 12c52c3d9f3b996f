"""API keys managed at run time: created, rotated and revoked through the admin API, shared by every ingress replica.

Records live as JSON under `<root>/keys/<key_id>.json` on a local directory or any fsspec URL (the same kind of
storage as the voice store; by default a `_keys` directory inside it). A record holds the SHA-256 digest of the
secret, never the secret, which is returned once, by `create` and `rotate`, and then exists only with its holder.

A secret reads `sk.<key_id>.<43 random base64url characters>` (256 random bits from `secrets`). Carrying the id lets
`authenticate` read the one record it needs instead of every record; ids are not secret (tokens carry them too). The
id is taken from a presented key only after `KEY_ID` matched it, and it is the only user input a path is built from.

Every replica keeps the records it reads for `cache_ttl_s` (5 s by default) and then reads them again, so a key
created, rotated or revoked on one replica is seen by every other one within that time: **a revocation takes effect
everywhere within `cache_ttl_s`** (at once on the replica that made it). Session tokens are not revoked themselves:
the ingress checks their key with `check_active` whenever a token is used or a stream starts, which is what ends
them. Unknown ids are cached too (in a bounded cache), so spraying made-up keys cannot turn every request into a read.

Revoking keeps the record (marked `revoked_at`): voices and usage belong to a key id, and an id once used must never
be handed to someone else by a later `create`. Rotation replaces the digest; the previous one keeps working until
`previous_valid_until`, the grace period. The default grace is 0, so that a rotation made because a key leaked
closes it at once; a planned rotation passes a grace long enough for clients to switch to the new secret.

Each rotation increments the key's `generation`. `authenticate` says which generation's secret was presented, session
tokens carry it (app/auth/tokens.py, claim `gen`), and `check_token` refuses a token whose secret is gone: tokens of
the previous generation work until the grace ends (at once with grace 0), older ones never. So rotating a leaked key
also ends the tokens its thief obtained with it, not only the key itself.

Static keys (`ingress.api_keys` and `SEEDVC_API_KEYS`, `ApiKeys`) keep working as before and authenticate first;
they are not in the store, so the API cannot revoke or rotate them (`StaticKeyError` says where to change them).

Admin writes are not transactional across replicas: two replicas creating the same id at the same instant both
succeed and the later write wins. Administer keys from one place at a time.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from app.auth.jsonfiles import JsonFiles
from app.auth.tokens import ApiKeys, TokenClaims, TokenError

KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # no '.': it separates the parts of a secret
SECRET_PREFIX = "sk"
SECRET_RANDOM_BYTES = 32
MAX_NAME_CHARS = 200
MAX_GRACE_S = 7 * 24 * 3600.0  # an old secret that stays valid for longer is not being rotated away
CACHE_ENTRIES = 10_000  # records (and unknown ids) cached per replica
_DIR = "keys"


class KeyNotFound(LookupError):
    """No stored key has this id, or the id is not even well formed."""


class KeyExists(ValueError):
    """`create` with an id that is already taken, now or by a revoked key."""


class StaticKeyError(ValueError):
    """An admin operation on a key that comes from the config or the environment, which only a restart changes."""

    def __init__(self, key_id: str) -> None:
        super().__init__(
            f"{key_id} is a static key (ingress.api_keys or SEEDVC_API_KEYS): it cannot be created, rotated or revoked "
            "through the API; change it there and restart the ingress"
        )


class KeyRevoked(TokenError):
    """A well-formed credential of a key that has been revoked."""


@dataclass(frozen=True)
class Quotas:
    """Limits of one key; None is no limit."""

    max_sessions: int | None = None  # live sessions at once, across every ingress replica
    max_stream_minutes_per_day: float | None = None  # stream time per UTC day


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    digest: str = field(repr=False)  # hex SHA-256 of the secret
    created_at: float  # unix seconds, as every time below
    quotas: Quotas
    name: str | None = None
    revoked_at: float | None = None
    rotated_at: float | None = None
    previous_digest: str | None = field(default=None, repr=False)
    previous_valid_until: float | None = None
    generation: int = 0  # rotations so far: the current secret's generation (records older than the field: 0)

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> KeyRecord:
        return cls(**{**document, "quotas": Quotas(**document["quotas"])})

    def public(self) -> dict[str, Any]:
        """What the admin API shows: everything but the digests."""
        shown = asdict(self)
        del shown["digest"], shown["previous_digest"]
        return {**shown, "static": False}

    def in_grace(self, now: float) -> bool:
        """Whether the previous secret (generation - 1) still works."""
        return self.previous_digest is not None and now < (self.previous_valid_until or 0.0)

    def matching_generation(self, presented: bytes, now: float) -> int | None:
        """The generation of the secret whose digest this is: the current one, or the previous one within the grace
        period; None for neither. Both are always compared, so the time taken does not tell which one matched."""
        current = hmac.compare_digest(bytes.fromhex(self.digest), presented)
        previous_digest = bytes.fromhex(self.previous_digest or self.digest)
        previous = hmac.compare_digest(previous_digest, presented)
        if current:
            return self.generation
        return self.generation - 1 if previous and self.in_grace(now) else None


@dataclass(frozen=True)
class Authenticated:
    """Who presented an API key: its id, and the generation of the secret presented (static keys: always 0)."""

    key_id: str
    generation: int


@dataclass(frozen=True)
class NewSecret:
    """A key's record with its secret: what `create` and `rotate` return, the only time the secret exists here."""

    record: KeyRecord
    secret: str = field(repr=False)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _new_secret(key_id: str) -> str:
    return f"{SECRET_PREFIX}.{key_id}.{secrets.token_urlsafe(SECRET_RANDOM_BYTES)}"


def _key_id_of(presented_key: str) -> str | None:
    """The id a presented secret claims, if it has the shape of ours."""
    prefix, _, rest = presented_key.partition(".")
    key_id, _, random_part = rest.partition(".")
    if prefix != SECRET_PREFIX or not random_part or not KEY_ID.fullmatch(key_id):
        return None
    return key_id


class KeyStore:
    """Runtime keys under `root`, plus the static ones; see the module docstring. `clock` is injectable for tests."""

    def __init__(
        self,
        root: str,
        static: ApiKeys | None = None,
        default_quotas: Quotas | None = None,
        cache_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if cache_ttl_s < 0:
            raise ValueError(f"cache_ttl_s must not be negative, not {cache_ttl_s}")
        # Usage and leases are filed under key ids, so static ids must be as safe in a path as stored ones.
        bad = sorted(key_id for key_id in (static.key_ids if static else ()) if not KEY_ID.fullmatch(key_id))
        if bad:
            raise ValueError(f"static key ids must match {KEY_ID.pattern}: {bad}")
        self.root = root
        self._files = JsonFiles(root)
        self._static = static
        self.default_quotas = default_quotas or Quotas()
        self._ttl = cache_ttl_s
        self._clock = clock
        # key id -> (read at, record or None for "no such key"); the usage meter reads it from a worker thread.
        self._cache: OrderedDict[str, tuple[float, KeyRecord | None]] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KeyStore(root={self.root!r}, static={self._static!r})"

    # -- reading ---------------------------------------------------------------------------------------------------

    def is_static(self, key_id: str) -> bool:
        return self._static is not None and key_id in self._static.key_ids

    @property
    def static_ids(self) -> builtins.list[str]:
        return sorted(self._static.key_ids) if self._static is not None else []

    def get(self, key_id: str) -> KeyRecord:
        """A stored key's record, read from the store now (not from the cache)."""
        if not KEY_ID.fullmatch(key_id):
            raise KeyNotFound("malformed key id")
        document = self._files.read(f"{_DIR}/{key_id}")
        record = None if document is None else KeyRecord.from_json(document)
        self._remember(key_id, record)
        if record is None:
            raise KeyNotFound(f"no key {key_id}")
        return record

    def list(self) -> builtins.list[KeyRecord]:
        """Every stored key, revoked ones included, oldest first (static keys are not stored: see `static_ids`)."""
        records = []
        for key_id in self._files.names(_DIR):
            if not KEY_ID.fullmatch(key_id):
                continue  # not ours
            try:
                records.append(self.get(key_id))
            except KeyNotFound:  # removed since the listing
                continue
        return sorted(records, key=lambda record: (record.created_at, record.key_id))

    def _cached(self, key_id: str) -> KeyRecord | None:
        """The record as this replica last read it, if that was less than `cache_ttl_s` ago; else read now."""
        with self._lock:
            entry = self._cache.get(key_id)
        if entry is not None and self._clock() - entry[0] < self._ttl:
            return entry[1]
        try:
            return self.get(key_id)
        except KeyNotFound:
            return None

    def _remember(self, key_id: str, record: KeyRecord | None) -> None:
        with self._lock:
            self._cache[key_id] = (self._clock(), record)
            self._cache.move_to_end(key_id)
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)

    # -- what the service asks -------------------------------------------------------------------------------------

    def authenticate(self, presented_key: str) -> Authenticated:
        """The key presented (static or stored), or TokenError; KeyRevoked for a revoked key's secret."""
        if self._static is not None:
            try:
                return Authenticated(self._static.authenticate(presented_key), generation=0)
            except TokenError:
                pass  # not a static key: maybe a stored one
        key_id = _key_id_of(presented_key)
        record = None if key_id is None else self._cached(key_id)
        generation = None if record is None else record.matching_generation(_digest(presented_key), self._clock())
        if record is None or generation is None:
            raise TokenError("unknown API key")
        if record.revoked_at is not None:
            raise KeyRevoked("this API key has been revoked")
        return Authenticated(record.key_id, generation)

    def check_active(self, key_id: str, generation: int | None = None) -> None:
        """Raises TokenError unless the key is static or stored and not revoked (as of `cache_ttl_s` ago at most);
        with `generation`, also unless that generation's secret still works (the current one, or the previous one
        within its grace)."""
        if self.is_static(key_id):
            return
        record = self._cached(key_id) if KEY_ID.fullmatch(key_id) else None
        if record is None:
            raise TokenError("the key of this token no longer exists")
        if record.revoked_at is not None:
            raise KeyRevoked("the key of this token has been revoked")
        if generation is None or generation == record.generation:
            return
        if generation == record.generation - 1 and record.in_grace(self._clock()):
            return
        raise TokenError("the API key was rotated since this token was issued; get a new token with the new key")

    def check_token(self, claims: TokenClaims) -> None:
        """`check_active` for the key and the secret's generation a session token was issued for."""
        self.check_active(claims.key_id, claims.generation)

    def quotas(self, key_id: str) -> Quotas:
        """The key's limits: a stored key's own, the defaults for a static key."""
        if self.is_static(key_id):
            return self.default_quotas
        record = self._cached(key_id) if KEY_ID.fullmatch(key_id) else None
        if record is None:
            raise TokenError("the key of this token no longer exists")
        return record.quotas

    # -- administration --------------------------------------------------------------------------------------------

    def create(self, key_id: str | None = None, quotas: Quotas | None = None, name: str | None = None) -> NewSecret:
        """A new key, under `key_id` or a random id; its secret is in the answer and nowhere else."""
        if key_id is None:
            key_id = f"key_{secrets.token_hex(8)}"
        if not KEY_ID.fullmatch(key_id):
            raise ValueError(f"a key id is 1-64 letters, digits, '_' or '-', starting with a letter or digit: {KEY_ID}")
        if self.is_static(key_id):
            raise StaticKeyError(key_id)
        if name is not None and len(name) > MAX_NAME_CHARS:
            raise ValueError(f"the name is {len(name)} characters; the limit is {MAX_NAME_CHARS}")
        if self._files.read(f"{_DIR}/{key_id}") is not None:
            raise KeyExists(f"key id {key_id} is taken (a revoked key keeps its id)")
        secret = _new_secret(key_id)
        record = KeyRecord(
            key_id=key_id,
            digest=_digest(secret).hex(),
            created_at=self._clock(),
            quotas=quotas or self.default_quotas,
            name=name,
        )
        self._save(record)
        return NewSecret(record=record, secret=secret)

    def rotate(self, key_id: str, grace_s: float = 0.0) -> NewSecret:
        """A new secret for a key; the current one keeps working for `grace_s` seconds, an older one stops now."""
        if not 0 <= grace_s <= MAX_GRACE_S:
            raise ValueError(f"grace_s must be within 0-{MAX_GRACE_S:g} s, not {grace_s}")
        record = self._stored(key_id)
        if record.revoked_at is not None:
            raise KeyRevoked(f"key {key_id} is revoked; create a new key instead")
        now = self._clock()
        secret = _new_secret(key_id)
        rotated = replace(
            record,
            digest=_digest(secret).hex(),
            rotated_at=now,
            previous_digest=record.digest if grace_s > 0 else None,
            previous_valid_until=now + grace_s if grace_s > 0 else None,
            generation=record.generation + 1,
        )
        self._save(rotated)
        return NewSecret(record=rotated, secret=secret)

    def revoke(self, key_id: str) -> KeyRecord:
        """Revokes a key for good (its record stays, marked); revoking a revoked key changes nothing."""
        record = self._stored(key_id)
        if record.revoked_at is not None:
            return record
        revoked = replace(record, revoked_at=self._clock(), previous_digest=None, previous_valid_until=None)
        self._save(revoked)
        return revoked

    def _stored(self, key_id: str) -> KeyRecord:
        if self.is_static(key_id):
            raise StaticKeyError(key_id)
        return self.get(key_id)

    def _save(self, record: KeyRecord) -> None:
        self._files.write(f"{_DIR}/{record.key_id}", asdict(record))
        self._remember(record.key_id, record)  # this replica sees its own change at once
