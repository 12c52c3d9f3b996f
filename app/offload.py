"""Blocking work (storage reads and writes, audio decoding) off the event loop, on small bounded pools of threads.

An event loop that paces the audio of hundreds of streams must never wait for an object store or a decoder: one S3
GET on it stalls every stream of the replica. Each kind of work gets a pool of its own, so that a flood of one kind
(token requests naming made-up keys, say, which need no credential to send) cannot starve another, and a bound on
the calls running or waiting in it: beyond that a call is refused at once (`Busy`) instead of queueing without
limit, so memory and latency stay bounded while the flood lasts.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")


class Busy(RuntimeError):
    """The pool already has as many calls as it may hold; the caller should answer "try again shortly"."""


class Offload:
    """`workers` threads; at most `workers + max_waiting` calls running or waiting at once."""

    def __init__(self, name: str, workers: int, max_waiting: int) -> None:
        if workers < 1 or max_waiting < 0:
            raise ValueError(f"workers must be at least 1 and max_waiting not negative, not {workers}, {max_waiting}")
        self.name = name
        self.capacity = workers + max_waiting
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._calls = 0  # running or waiting; only the event loop's thread changes it

    def __repr__(self) -> str:
        return f"Offload({self.name!r}, calls={self._calls}, capacity={self.capacity})"

    @property
    def calls(self) -> int:
        return self._calls

    async def run(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`call(*args, **kwargs)` on a worker thread, with the caller's context (its log fields); Busy when full."""
        if self._calls >= self.capacity:
            raise Busy(f"{self.name}: {self._calls} calls already running or waiting")
        self._calls += 1
        try:
            context = contextvars.copy_context()
            work = functools.partial(context.run, call, *args, **kwargs)
            return await asyncio.get_running_loop().run_in_executor(self._executor, work)
        finally:
            self._calls -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
