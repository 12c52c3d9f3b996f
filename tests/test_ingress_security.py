"""The ingress's routes without Serve (called on a stand-in for the replica, as test_admin_api.py does): key-store
and voice-store reads off the event loop, the development key from loopback only, token generations, the per-key
rate of GET /v1/ice, /readyz without session ids, no API docs unless configured, security headers."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import threading
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from starlette.requests import Request

from app.auth.keystore import KeyStore
from app.auth.ratelimit import KeyRate
from app.auth.tokens import TokenSigner, static_keys
from app.offload import Offload
from app.serving.config import IngressConfig
from app.voices.store import VoiceStore
from deployments.ingress import CONTENT_SECURITY_POLICY, Ingress, api, enable_api_docs, security_headers

T = TypeVar("T")
DEV_KEY = "local-development-key"
STALL_S = 1.0


def request(host: str | None = "127.0.0.1") -> Request:
    scope = {"type": "http", "method": "POST", "path": "/v1/tokens", "headers": [], "client": (host, 50000)}
    return Request(scope if host is not None else {**scope, "client": None})


def replica(tmp_path: Path, environment: str | None = None, **overrides: Any) -> Any:
    """What the routes use of an Ingress replica, built as Ingress.__init__ builds it (a stand-in, so: Any)."""
    static = static_keys({"dev": DEV_KEY}, environment)
    parts: dict[str, Any] = {
        "keys": KeyStore(str(tmp_path / "_keys"), static=static.keys),
        "development_keys": static.development,
        "tokens": TokenSigner(b"t" * 32),
        "key_io": Offload("key-io", 2, 4),
        "voice_io": Offload("voice-io", 2, 4),
        "voices": VoiceStore(str(tmp_path)),
        "ice_rate": KeyRate(1.0, 3),
        "rtc_services": SimpleNamespace(browser_ice_servers=lambda key_id, now: [{"urls": ["stun:203.0.113.7"]}]),
    }
    replica: Any = SimpleNamespace(**(parts | overrides))
    replica._caller = lambda authorization: Ingress._caller(replica, authorization)
    return replica


async def token(replica: Any, key: str, host: str | None = "127.0.0.1") -> str:
    return (await Ingress.issue_token(replica, request(host), f"Bearer {key}"))["token"]


@contextlib.contextmanager
def slow_store(root: Path) -> Iterator[str]:
    """`root` served over HTTP on loopback, every `.json` document answered only after STALL_S: a store that is slow
    to answer, as S3 can be. Yields its URL, which fsspec reads like any store URL."""

    class Slow(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:
            if self.path.endswith(".json"):
                time.sleep(STALL_S)
            super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def ticks_while(work: Awaitable[T]) -> tuple[int, T]:
    """Runs `work` and counts the event loop's 5 ms ticks in the first half of the stall: a read on the loop itself
    freezes it, and no tick happens."""
    task = asyncio.ensure_future(work)
    start, ticks = time.monotonic(), 0
    while time.monotonic() - start < STALL_S / 2:
        await asyncio.sleep(0.005)
        ticks += 1 if time.monotonic() - start < STALL_S / 2 else 0
    return ticks, await task


async def status_of(call: Awaitable[Any]) -> int:
    try:
        await call
    except HTTPException as error:
        return error.status_code
    return 200


def test_a_key_store_that_does_not_answer_does_not_stall_the_loop(tmp_path: Path) -> None:
    """POST /v1/tokens with a made-up stored key's id reads that id's record: anyone can cause it, no credential
    needed. The record that finally arrives is another secret's: 401."""
    record = {"key_id": "slow", "digest": "00" * 32, "created_at": 0.0, "quotas": {}}
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "slow.json").write_text(json.dumps(record))
    with slow_store(tmp_path) as url:
        ingress = replica(tmp_path, keys=KeyStore(url, static=static_keys({"dev": DEV_KEY}, None).keys))
        attempt = Ingress.issue_token(ingress, request(), "Bearer sk.slow.0123456789abcdef")
        ticks, status = asyncio.run(ticks_while(status_of(attempt)))
    assert ticks > 10 and status == 401


def test_a_voice_store_that_does_not_answer_does_not_stall_the_loop(tmp_path: Path) -> None:
    voice_id = "A" * 16
    record = {"voice_id": voice_id, "owner": "dev", "name": "slow", "seconds": 2.0, "rate": 16_000, "created_at": 0}
    (tmp_path / f"{voice_id}.json").write_text(json.dumps(record))
    (tmp_path / "_owners" / "dev").mkdir(parents=True)
    (tmp_path / "_owners" / "dev" / voice_id).write_bytes(b"")
    (tmp_path / "_owners" / ".indexed").write_bytes(b"")
    ingress = replica(tmp_path)

    async def listing(url: str) -> dict[str, Any]:
        ingress.voices = VoiceStore(url)
        return await Ingress.list_voices(ingress, f"Bearer {await token(ingress, DEV_KEY)}")

    with slow_store(tmp_path) as url:
        ticks, listed = asyncio.run(ticks_while(listing(url)))
    assert ticks > 10 and listed == {"voices": [{"voice_id": voice_id, "name": "slow", "seconds": 2.0}]}


def test_the_development_key_works_from_loopback_only(tmp_path: Path) -> None:
    ingress = replica(tmp_path)
    assert asyncio.run(token(ingress, DEV_KEY, "127.0.0.1"))
    assert asyncio.run(token(ingress, DEV_KEY, "::1"))
    for host in ("10.0.0.7", "203.0.113.9", None):
        with pytest.raises(HTTPException, match="from this machine only") as refused:
            asyncio.run(token(ingress, DEV_KEY, host))
        assert refused.value.status_code == 401


def test_the_development_key_is_ignored_once_real_keys_are_set(tmp_path: Path) -> None:
    ingress = replica(tmp_path, environment="main=a-production-key-0123456789")
    with pytest.raises(HTTPException, match="unknown API key"):
        asyncio.run(token(ingress, DEV_KEY, "127.0.0.1"))
    assert asyncio.run(token(ingress, "a-production-key-0123456789", "203.0.113.9"))  # real keys work from anywhere


def test_tokens_carry_the_secrets_generation_and_a_rotation_ends_them(tmp_path: Path) -> None:
    ingress = replica(tmp_path)
    secret = ingress.keys.create("partner").secret

    async def scenario() -> None:
        old = await token(ingress, secret, "203.0.113.9")
        assert ingress.tokens.verify(old).generation == 0
        assert await Ingress._caller(ingress, f"Bearer {old}") == "partner"
        new_secret = ingress.keys.rotate("partner").secret  # no grace: a leaked key
        with pytest.raises(HTTPException, match="rotated") as refused:
            await Ingress._caller(ingress, f"Bearer {old}")
        assert refused.value.status_code == 401
        new = await token(ingress, new_secret, "203.0.113.9")
        assert ingress.tokens.verify(new).generation == 1
        assert await Ingress._caller(ingress, f"Bearer {new}") == "partner"

    asyncio.run(scenario())


def test_ice_servers_are_rate_limited_per_key(tmp_path: Path) -> None:
    ingress = replica(tmp_path)
    other = ingress.keys.create("other").secret

    async def scenario() -> None:
        mine = f"Bearer {await token(ingress, DEV_KEY)}"
        answers = [await Ingress.ice_servers(ingress, mine) for _ in range(4)]
        assert [answer.status_code for answer in answers] == [200, 200, 200, 429]
        assert answers[-1].headers["retry-after"] == "1"
        assert json.loads(bytes(answers[0].body))["iceServers"] == [{"urls": ["stun:203.0.113.7"]}]
        theirs = f"Bearer {await token(ingress, other, '203.0.113.9')}"
        assert (await Ingress.ice_servers(ingress, theirs)).status_code == 200

    asyncio.run(scenario())


def test_readyz_shows_the_real_time_factor_but_no_session_ids() -> None:
    stats = {
        "sessions": 2,
        "capacity": 16,
        "batch_sizes": {"2": 10},
        "blocks_converted": 20,
        "blocks_by_session": {"0123abcd": 10, "4567ef01": 10},
        "real_time_factor": 0.4,
    }

    async def remote() -> dict[str, Any]:
        return stats

    ingress: Any = SimpleNamespace(converter=SimpleNamespace(stats=SimpleNamespace(remote=remote)))
    answer = json.loads(bytes(asyncio.run(Ingress.readyz(ingress)).body))
    assert answer == {"status": "ready", "converter": {"real_time_factor": 0.4, "sessions": 2, "capacity": 16}}
    assert "0123abcd" not in json.dumps(answer)


def test_no_api_docs_unless_configured_and_every_answer_has_the_security_headers() -> None:
    assert IngressConfig().api_docs is False
    client = TestClient(api)
    for path in ("/docs", "/openapi.json", "/redoc"):
        answer = client.get(path)
        assert answer.status_code == 404
        assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert answer.headers["x-content-type-options"] == "nosniff"
    documented = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    documented.middleware("http")(security_headers)
    enable_api_docs(documented)
    assert TestClient(documented).get("/openapi.json").status_code == 200
    assert TestClient(documented).get("/docs").status_code == 200
