"""Bounded pools for blocking work (app/offload.py): the loop runs on while calls block, and a full pool refuses."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from app.logs import SessionFields, session_log
from app.offload import Busy, Offload


def test_the_loop_keeps_running_while_calls_block_and_a_full_pool_refuses_at_once() -> None:
    pool = Offload("test", workers=2, max_waiting=1)
    release = threading.Event()

    async def scenario() -> None:
        calls = [asyncio.create_task(pool.run(release.wait, 10)) for _ in range(3)]
        while pool.calls < 3:  # the three calls are admitted (two run, one waits) while the loop ticks
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)
        assert not any(call.done() for call in calls)
        with pytest.raises(Busy, match="test"):
            await pool.run(release.wait, 10)
        release.set()
        assert await asyncio.gather(*calls) == [True, True, True]
        assert pool.calls == 0
        assert await pool.run(lambda: "room again") == "room again"

    asyncio.run(scenario())
    pool.shutdown()


def test_calls_keep_the_callers_log_fields() -> None:
    """A record logged on a worker thread still names the connection it works for."""
    pool = Offload("fields", workers=1, max_waiting=0)

    def record() -> logging.LogRecord:
        made = logging.LogRecord("app.test", logging.INFO, __file__, 1, "read", None, None)
        SessionFields().filter(made)
        return made

    async def scenario() -> logging.LogRecord:
        with session_log("websocket") as fields:
            fields.key_id = "tenant"
            return await pool.run(record)

    assert getattr(asyncio.run(scenario()), "key_id", None) == "tenant"
    pool.shutdown()
