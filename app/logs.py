"""Structured logs: every record a connection emits names its session, without passing ids through every call.

A transport binds a `SessionLog` when a connection starts (`session_logged`) and fills its fields in as they become
known (the key id once the token is checked, the session id once the session is open). asyncio copies
the context into every task a connection starts, and the fields object is shared rather than copied, so records
logged by those tasks carry fields filled in after they started.

`route_to` hands the records of this project's loggers to another logger's handlers: under Ray Serve, the replica's
`ray.serve` logger, whose JSON encoding (`logging_config: {encoding: JSON}`) writes every attribute a record carries
beyond the standard ones as a field of its own. Without it, module loggers would propagate to a root logger that
Serve never configures, and INFO records would be lost.

What never goes into a log: audio, and credentials (API keys, session and resume tokens, TURN secrets). Messages
name things by id; token errors say what is wrong, never with what (app/auth/tokens.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# The loggers whose records `route_to` forwards: every module of app/ and deployments/ logs under one of these.
PROJECT_LOGGERS = ("app", "deployments")


@dataclass
class SessionLog:
    """The fields of one connection's records; None until known, and then left out."""

    transport: str  # "websocket" or "webrtc"
    session_id: str | None = None
    key_id: str | None = None  # the API key's id, never the key

    def fields(self) -> dict[str, str]:
        return {name: value for name, value in asdict(self).items() if value is not None}


_current: ContextVar[SessionLog | None] = ContextVar("seedvc_session_log", default=None)


@contextmanager
def session_log(transport: str) -> Iterator[SessionLog]:
    """Binds fresh session fields for the code run inside, and the tasks it starts."""
    fields = SessionLog(transport)
    token = _current.set(fields)
    try:
        yield fields
    finally:
        _current.reset(token)


def session_logged(transport: str) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Coroutine[Any, Any, T]]]:
    """Decorates a connection's `run` so that everything it logs, directly or from its tasks, names its session."""

    def decorate(run: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        @functools.wraps(run)
        async def logged(*args: P.args, **kwargs: P.kwargs) -> T:
            with session_log(transport):
                return await run(*args, **kwargs)

        return logged

    return decorate


def note(**fields: str) -> None:
    """Fills in fields of the current connection's records (ignored outside a connection)."""
    current = _current.get()
    if current is None:
        return
    for name, value in fields.items():
        if name not in SessionLog.__dataclass_fields__:
            raise TypeError(f"{name!r} is not a session log field")
        setattr(current, name, value)


class SessionFields(logging.Filter):
    """Copies the current connection's fields onto each record; fields given with `extra=` win."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _current.get()
        if current is not None:
            for name, value in current.fields().items():
                if not hasattr(record, name):
                    setattr(record, name, value)
        return True


class ForwardTo(logging.Handler):
    """Hands each record, with its session fields, to another logger's handlers (whatever they are by then)."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target
        self.addFilter(SessionFields())

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


def route_to(target: logging.Logger, names: tuple[str, ...] = PROJECT_LOGGERS) -> None:
    """Sends the records of the loggers `names` (and their children) to `target`'s handlers, at its level.

    Idempotent: routing again replaces the earlier route. The loggers stop propagating, so nothing is logged twice.
    """
    for name in names:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, ForwardTo)]:
            logger.removeHandler(handler)
        logger.addHandler(ForwardTo(target))
        logger.setLevel(target.getEffectiveLevel())
        logger.propagate = False
