"""The converter's one table of sessions: what a replica holds of each session, admitted against its capacity.

Each entry is a `ServedSession`: the engine's `Session` (stream, silence gate) plus the replica's bookkeeping (voice,
seed, the lease of the attachment allowed to send blocks, the next block number, the time of the last call, blocks
converted). The entries live in the engine's own table (the engine steps them), and only this registry adds or removes
them, so the replica's idea of its sessions and the engine's cannot drift apart. A bounded history keeps the block
counts of sessions that ended (statistics: which replica served a session).

Not thread-safe, like the engine: the converter touches it on its engine thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from app.engine.engine import Engine, Session
from app.streaming.settings import StreamSettings

RECENT_SESSIONS = 1000  # ended sessions whose block counts the statistics keep


@dataclass(kw_only=True)
class ServedSession(Session):
    voice_id: str
    seed: int
    lease: int  # the attachment allowed to send blocks (a resume takes the session over with a new one)
    next_index: int  # the block number expected next
    last_call: float  # the converter's clock at the last call for this session
    blocks_converted: int = 0
    # Diffusion steps of its last converted block: what a session that moved here came with (its first block here
    # spends no more), then what the deadline control last chose. Travels in ResumeState.steps.
    steps: int | None = None

    @property
    def settings(self) -> StreamSettings:
        return self.stream.settings


class SessionRegistry:
    def __init__(self, engine: Engine, capacity: int) -> None:
        self._engine = engine
        self.capacity = capacity
        self._ended: OrderedDict[str, int] = OrderedDict()  # blocks converted by recently ended sessions

    def __len__(self) -> int:
        return len(self._engine)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._engine

    def has_room_for(self, session_id: str) -> bool:
        """A held session may always be re-opened (it replaces its stale copy); a new one needs a free slot."""
        return session_id in self or len(self) < self.capacity

    def admit(self, session_id: str, session: ServedSession) -> None:
        """Hold `session`, replacing a copy of the same id (the caller checked `has_room_for` first)."""
        assert self.has_room_for(session_id), f"no room for session {session_id}"
        self.remove(session_id)
        self._engine.add(session_id, session)

    def get(self, session_id: str) -> ServedSession | None:
        session = self._engine.get(session_id)
        return None if session is None else _served(session)

    def remove(self, session_id: str) -> None:
        """Forget a session (an unknown one is a no-op: closes race with expiries and losses)."""
        session = self.get(session_id)
        if session is None:
            return
        self._engine.close(session_id)
        self._ended[session_id] = self._ended.pop(session_id, 0) + session.blocks_converted
        if len(self._ended) > RECENT_SESSIONS:
            self._ended.popitem(last=False)

    def items(self) -> list[tuple[str, ServedSession]]:
        """The sessions held (a copy: removing while iterating is safe)."""
        return [(session_id, _served(session)) for session_id, session in self._engine.items()]

    def idle_since(self, oldest: float) -> list[str]:
        """Sessions whose last call came before `oldest` (the converter's clock)."""
        return [session_id for session_id, session in self.items() if session.last_call < oldest]

    def blocks_by_session(self) -> dict[str, int]:
        """Blocks converted per session on this replica, for the sessions it holds and those that ended recently."""
        counts = dict(self._ended)
        for session_id, session in self.items():
            counts[session_id] = counts.get(session_id, 0) + session.blocks_converted
        return counts


def _served(session: Session) -> ServedSession:
    assert isinstance(session, ServedSession), "only the registry adds sessions to the converter's engine"
    return session
