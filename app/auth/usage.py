"""Per-key usage and quotas: live sessions at once, and stream time per UTC day, counted across ingress replicas.

Everything lives in the key store's storage (`JsonFiles`), so every ingress replica sees the same numbers:

- **Leases**, `leases/<key_id>/<lease_id>.json`: one per connection that holds a session, naming the session, with an
  expiry that its replica renews every `lease_ttl_s / 3` (ticks of the flusher). A key's live sessions are the
  distinct session ids among its unexpired leases, so a session resumed on another connection (or replica) is counted
  once. A lease is deleted when its session closes; a connection that drops but leaves its session held for a resume
  stops renewing its lease instead, so the session keeps its slot until the lease expires (`lease_ttl_s`, 60 s by
  default, longer than a converter holds a detached session) or a resume adopts it. A replica that crashes stops
  renewing too: its sessions stop counting within `lease_ttl_s`.
- **Stream time**, `usage/<key_id>/<YYYY-MM-DD>/<replica_id>.json`: the seconds of audio this replica's connections
  of a key received that UTC day. Each replica writes only its own file (its id is random per process), so replicas
  never overwrite each other, and a restarted replica starts a new file while the old one keeps counting: usage
  survives restarts. A key's usage is the sum of the files. Replicas write every `flush_interval_s` and when a
  session ends; a replica that crashes loses at most the last interval of its live sessions' time.

What the limits guarantee:

- `max_sessions`: admission writes the new lease first, then lists the key's leases, and keeps the session only if it
  ranks within the limit by (first lease's creation time, session id). Two replicas admitting at the same moment both
  see both leases and agree which one is refused, so the limit holds across replicas as long as their clocks agree to
  within the time between those two admissions. Under such a race a start may be refused although it would just
  have fit (its client is told to retry after `retry_after_s`); never more admitted than the limit, clocks
  permitting. A session resumed while its lease lives keeps its slot without a new check. A replica never counts a
  lease it has released itself, even before the lease's file is gone.
- `max_stream_minutes_per_day`: checked when a session starts, against the time booked so far today (other replicas'
  files are cached for `cache_ttl_s`), and again for running sessions at every flush: a session running when the
  quota runs out is ended (`refused`), as is one whose key was revoked or whose token's secret was rotated away
  (`check_active` with the token's generation). So a revocation or an exhausted quota ends running sessions within
  `key cache_ttl_s` plus one flush interval.
- Stream time is the audio a session received: what the converter had to convert, whether it came in real time or
  faster (a file streamed with `realtime: false`), and nothing for a session that sends nothing (it is ended by the
  transport's idle timeout). It is booked at each flush into the UTC day of the flush.

Storage I/O runs in worker threads so that a slow object store never stalls the event loop that paces audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.auth.jsonfiles import JsonFiles
from app.auth.keystore import KEY_ID, KeyStore, Quotas
from app.auth.tokens import TokenError

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86_400  # unix time has no leap seconds: every UTC day is exactly this long
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HEX_ID = re.compile(r"[0-9a-f]{16}")  # lease and replica ids: secrets.token_hex(8)


class QuotaExceeded(Exception):
    """A session its key's quotas do not allow now; the message names the limit, never a credential."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Usage:
    key_id: str
    day: str  # the UTC day `stream_seconds` is for, YYYY-MM-DD
    stream_seconds: float
    live_sessions: int  # across every ingress replica, as of the leases
    quotas: Quotas


AudioSeconds = Callable[[], float]  # the seconds of audio a session has received on its connection so far


@dataclass
class Lease:
    """One connection's hold on a session, as this replica tracks it."""

    lease_id: str
    key_id: str
    session_id: str
    created_at: float  # the session's place in its key's order: kept when a resume adopts the lease
    renewed_at: float
    generation: int = 0  # of the key's secret the session's token was issued for
    audio: AudioSeconds | None = None  # what the session has received; None: nothing to meter
    booked_audio: float = 0.0  # audio seconds booked so far
    refusal: Exception | None = None  # why the session may not go on (revoked, rotated away, out of time)
    _refused: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def heard(self) -> float:
        return self.audio() if self.audio is not None else self.booked_audio

    def refuse(self, reason: Exception) -> None:
        if self.refusal is None:
            self.refusal = reason
            self._refused.set()

    async def refused(self) -> Exception:
        """Waits until the session may not go on any more, and says why (TokenError or QuotaExceeded)."""
        await self._refused.wait()
        assert self.refusal is not None
        return self.refusal


@dataclass
class _Snapshot:
    """What one flush writes: this replica's day totals that changed, leases to renew, leases to delete."""

    totals: dict[tuple[str, str], float] = field(default_factory=dict)
    renew: list[tuple[Lease, float]] = field(default_factory=list)  # with the new expiry
    delete: list[Lease] = field(default_factory=list)


def utc_day(unix_s: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(unix_s))


def next_utc_midnight(unix_s: float) -> float:
    return float((int(unix_s // SECONDS_PER_DAY) + 1) * SECONDS_PER_DAY)


class UsageMeter:
    """Leases and stream time of the sessions of one ingress replica; see the module docstring."""

    def __init__(
        self,
        keys: KeyStore,
        root: str | None = None,
        *,
        lease_ttl_s: float = 60.0,
        flush_interval_s: float = 15.0,
        retry_after_s: float = 5.0,
        cache_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lease_ttl_s <= 0 or flush_interval_s <= 0 or retry_after_s <= 0 or cache_ttl_s < 0:
            raise ValueError("lease_ttl_s, flush_interval_s, retry_after_s must be positive; cache_ttl_s not negative")
        self._keys = keys
        self._files = JsonFiles(root if root is not None else keys.root)
        self._lease_ttl = lease_ttl_s
        self._tick = min(flush_interval_s, lease_ttl_s / 3)  # renewals must come well before expiry
        self._retry_after = retry_after_s
        self._cache_ttl = cache_ttl_s
        self._clock = clock
        self.replica_id = secrets.token_hex(8)
        # Worker threads read what the event loop changes: every access to the four below holds the lock.
        self._lock = threading.Lock()
        self._live: dict[str, Lease] = {}  # by lease id
        self._seconds: dict[tuple[str, str], float] = {}  # (key id, day) -> this replica's total
        self._dirty: set[tuple[str, str]] = set()
        self._ended: list[Lease] = []  # closed sessions whose lease files are still to delete
        self._gone: set[str] = set()  # ids of those leases until their files are deleted: never counted meanwhile
        self._others: dict[tuple[str, str], tuple[float, float]] = {}  # (key id, day) -> (read at, seconds)
        self._flush_lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"UsageMeter(replica_id={self.replica_id!r}, live={len(self._live)})"

    # -- sessions --------------------------------------------------------------------------------------------------

    async def acquire(
        self, key_id: str, session_id: str, generation: int = 0, audio: AudioSeconds | None = None
    ) -> Lease:
        """Admits a new session of an active key within its quotas: QuotaExceeded, or TokenError for a key that is
        revoked or gone, or whose secret of `generation` (the token's) no longer works. `audio` says how much audio
        the session has received, which its key is metered in. The caller must `release` the lease however the
        session ends, and should end the session when `Lease.refused` returns."""
        lease = await asyncio.to_thread(self._admit, key_id, session_id, None, generation, audio)
        self._hold(lease)
        return lease

    async def adopt(
        self, key_id: str, session_id: str, generation: int = 0, audio: AudioSeconds | None = None
    ) -> Lease:
        """Admits a resumed session: it keeps its slot while a lease of it is live, else it is admitted anew."""
        lease = await asyncio.to_thread(self._adopt, key_id, session_id, generation, audio)
        self._hold(lease)
        return lease

    def release(self, lease: Lease, held: bool = False) -> None:
        """Books the lease's stream time and lets go of it. `held`: the session stays on its converter for a
        resume, so its lease is left to expire (or be adopted) rather than deleted. Releasing twice is harmless."""
        with self._lock:
            if self._live.pop(lease.lease_id, None) is None:
                return
            self._account(lease, self._clock())
            if not held:
                self._ended.append(lease)
                self._gone.add(lease.lease_id)
        self._flush_soon()

    # -- usage -----------------------------------------------------------------------------------------------------

    async def usage(self, key_id: str) -> Usage:
        """The key's usage today, read from the store now; TokenError for a key that does not exist."""
        return await asyncio.to_thread(self._usage, key_id)

    def _usage(self, key_id: str) -> Usage:
        quotas = self._keys.quotas(key_id)  # refuses unknown ids before any path is built
        now = self._clock()
        day = utc_day(now)
        seconds = self._other_replicas_seconds(key_id, day, now, cached=False) + self._own_seconds(key_id, day, now)
        live = {document["session_id"] for document in self._live_leases(key_id, now)}
        return Usage(key_id=key_id, day=day, stream_seconds=seconds, live_sessions=len(live), quotas=quotas)

    # -- persistence -----------------------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Writes booked stream time, renews live leases that need it and deletes ended ones, now."""
        async with self._flush_lock:  # one flush at a time, so an older total never overwrites a newer one
            snapshot = self._snapshot(self._clock())
            try:
                await asyncio.to_thread(self._persist, snapshot)
            except Exception:
                log.exception("usage: writing to the key store failed; trying again at the next flush")
                self._requeue(snapshot)

    def _flush_soon(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a script, a unit test): write now
            self._persist(self._snapshot(self._clock()))
            return
        task = loop.create_task(self.flush())
        self._background.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._background.discard)

    def _ensure_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            await self.flush()
            try:
                await self.recheck()
            except Exception:  # a store that is briefly unreachable: sessions go on until the next check
                log.exception("usage: re-checking live sessions' keys failed; trying again at the next flush")

    async def recheck(self) -> None:
        """Ends (`Lease.refuse`) every live session whose key is revoked, whose token's secret was rotated away, or
        whose key has used up its stream time today."""
        with self._lock:
            leases = list(self._live.values())
        for lease, reason in await asyncio.to_thread(self._refusals, leases):
            lease.refuse(reason)

    def _refusals(self, leases: list[Lease]) -> list[tuple[Lease, Exception]]:
        refusals: list[tuple[Lease, Exception]] = []
        now = self._clock()
        for lease in leases:
            try:
                self._keys.check_active(lease.key_id, lease.generation)
                self._check_minutes(lease.key_id, self._keys.quotas(lease.key_id), now)
            except (TokenError, QuotaExceeded) as reason:
                refusals.append((lease, reason))
        return refusals

    # -- admission (worker threads) --------------------------------------------------------------------------------

    def _admit(
        self, key_id: str, session_id: str, created_at: float | None, generation: int, audio: AudioSeconds | None
    ) -> Lease:
        """`created_at` given: a resumed session that still has a live lease, which keeps its place unchecked."""
        if not SESSION_ID.fullmatch(session_id):
            raise ValueError("malformed session id")
        self._keys.check_active(key_id, generation)  # also refuses malformed and unknown key ids
        quotas = self._keys.quotas(key_id)
        now = self._clock()
        if created_at is None:
            self._check_minutes(key_id, quotas, now)
        lease = Lease(
            lease_id=secrets.token_hex(8),
            key_id=key_id,
            session_id=session_id,
            created_at=now if created_at is None else created_at,
            renewed_at=now,
            generation=generation,
            audio=audio,
            booked_audio=audio() if audio is not None else 0.0,
        )
        self._write_lease(lease, now + self._lease_ttl)
        if created_at is None and quotas.max_sessions is not None:
            ranked = self._ranked_sessions(key_id, now)
            place = ranked.index(session_id) if session_id in ranked else len(ranked)
            if place >= quotas.max_sessions:
                self._files.delete(self._lease_path(lease))
                raise QuotaExceeded(
                    f"key {key_id} already has {quotas.max_sessions} live session(s), its limit", self._retry_after
                )
        return lease

    def _adopt(self, key_id: str, session_id: str, generation: int, audio: AudioSeconds | None) -> Lease:
        self._keys.check_active(key_id, generation)  # refuses malformed and unknown key ids before any path is built
        now = self._clock()
        created = [lease["created_at"] for lease in self._live_leases(key_id, now) if lease["session_id"] == session_id]
        return self._admit(key_id, session_id, min(created) if created else None, generation, audio)

    def _check_minutes(self, key_id: str, quotas: Quotas, now: float) -> None:
        if quotas.max_stream_minutes_per_day is None:
            return
        day = utc_day(now)
        used = self._other_replicas_seconds(key_id, day, now, cached=True) + self._own_seconds(key_id, day, now)
        if used >= 60 * quotas.max_stream_minutes_per_day:
            raise QuotaExceeded(
                f"key {key_id} has used its {quotas.max_stream_minutes_per_day:g} stream minutes for {day} (UTC)",
                next_utc_midnight(now) - now,
            )

    def _ranked_sessions(self, key_id: str, now: float) -> list[str]:
        """The key's live session ids in admission order: by their earliest lease, then by id."""
        first: dict[str, float] = {}
        for lease in self._live_leases(key_id, now):
            first[lease["session_id"]] = min(lease["created_at"], first.get(lease["session_id"], float("inf")))
        return sorted(first, key=lambda session_id: (first[session_id], session_id))

    def _live_leases(self, key_id: str, now: float) -> list[dict[str, Any]]:
        """The key's unexpired lease documents; expired ones are deleted on the way (any replica may clean up)."""
        if not KEY_ID.fullmatch(key_id):
            return []
        live = []
        with self._lock:
            gone = set(self._gone)
        for lease_id in self._files.names(f"leases/{key_id}"):
            if not _HEX_ID.fullmatch(lease_id) or lease_id in gone:
                continue
            document = self._files.read(f"leases/{key_id}/{lease_id}")
            if document is None:  # deleted since the listing
                continue
            if document["expires_at"] <= now:
                self._files.delete(f"leases/{key_id}/{lease_id}")
                continue
            live.append(document)
        return live

    # -- stream time -----------------------------------------------------------------------------------------------

    def _account(self, lease: Lease, now: float) -> None:
        """Books the audio the lease's session received since its last booking, into `now`'s UTC day. Holds
        `_lock`."""
        heard = lease.heard()
        if heard > lease.booked_audio:
            bucket = (lease.key_id, utc_day(now))
            self._seconds[bucket] = self._seconds.get(bucket, 0.0) + (heard - lease.booked_audio)
            self._dirty.add(bucket)
            lease.booked_audio = heard

    def _own_seconds(self, key_id: str, day: str, now: float) -> float:
        """This replica's audio seconds for the key that day, its live sessions' unbooked audio included."""
        with self._lock:
            booked = self._seconds.get((key_id, day), 0.0)
            running = sum(lease.heard() - lease.booked_audio for lease in self._live.values() if lease.key_id == key_id)
        return booked + max(running, 0.0)

    def _other_replicas_seconds(self, key_id: str, day: str, now: float, cached: bool) -> float:
        with self._lock:
            entry = self._others.get((key_id, day))
        if cached and entry is not None and now - entry[0] < self._cache_ttl:
            return entry[1]
        total = 0.0
        for replica_id in self._files.names(f"usage/{key_id}/{day}"):
            if replica_id == self.replica_id or not _HEX_ID.fullmatch(replica_id):
                continue  # this replica's own time is in memory, newer than its file
            document = self._files.read(f"usage/{key_id}/{day}/{replica_id}")
            total += float(document["stream_seconds"]) if document is not None else 0.0
        with self._lock:
            self._others[(key_id, day)] = (now, total)
        return total

    # -- in-memory state <-> store ---------------------------------------------------------------------------------

    def _hold(self, lease: Lease) -> None:
        with self._lock:
            self._live[lease.lease_id] = lease
        self._ensure_flusher()

    def _snapshot(self, now: float) -> _Snapshot:
        snapshot = _Snapshot()
        with self._lock:
            for lease in self._live.values():
                self._account(lease, now)
                if now - lease.renewed_at >= self._lease_ttl / 3:
                    lease.renewed_at = now
                    snapshot.renew.append((lease, now + self._lease_ttl))
            snapshot.totals = {bucket: self._seconds[bucket] for bucket in self._dirty}
            snapshot.delete = self._ended
            self._dirty, self._ended = set(), []
        return snapshot

    def _requeue(self, snapshot: _Snapshot) -> None:
        with self._lock:
            self._dirty |= set(snapshot.totals)
            self._ended.extend(snapshot.delete)
            for lease, _ in snapshot.renew:
                lease.renewed_at = 0.0  # renew at the next flush

    def _persist(self, snapshot: _Snapshot) -> None:
        now = self._clock()
        for (key_id, day), seconds in snapshot.totals.items():
            document = {"stream_seconds": seconds, "updated_at": now}
            self._files.write(f"usage/{key_id}/{day}/{self.replica_id}", document)
        for lease, expires_at in snapshot.renew:
            if lease.lease_id in self._live:  # not ended since the snapshot (its file would come back)
                self._write_lease(lease, expires_at)
        for lease in snapshot.delete:
            self._files.delete(self._lease_path(lease))
            with self._lock:
                self._gone.discard(lease.lease_id)

    def _write_lease(self, lease: Lease, expires_at: float) -> None:
        document = {
            "session_id": lease.session_id,
            "replica": self.replica_id,
            "created_at": lease.created_at,
            "expires_at": expires_at,
        }
        self._files.write(self._lease_path(lease), document)

    @staticmethod
    def _lease_path(lease: Lease) -> str:
        return f"leases/{lease.key_id}/{lease.lease_id}"

    async def close(self) -> None:
        """Stops the flusher after a last flush (tests; a replica that stops may simply lose the last interval)."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()
