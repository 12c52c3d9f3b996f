"""Runtime API keys through the real Serve app: the admin API creates, rotates and revokes keys, revocation ends a
key's tokens, a key limited to one session is refused a second one while the first goes on, and usage grows."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from app import environment
from bench.harness import API_KEY, BASE_URL, ServeApp, local_ray, start_app
from bench.parity import ParitySet
from client.api import (
    ClientError,
    create_key,
    get_token,
    key_usage,
    list_keys,
    list_voices,
    my_usage,
    revoke_key,
    rotate_key,
    upload_voice,
)
from client.stream_client import StreamResult, stream_audio
from tests.serve.started import started_stream

pytestmark = pytest.mark.serve

ADMIN_KEY = "admin-key-0123456789abcdef"
CACHE_TTL_S = 0.5


@pytest.fixture(scope="module")
def app(parity: ParitySet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    previous = os.environ.get(environment.ADMIN_KEY)
    os.environ[environment.ADMIN_KEY] = ADMIN_KEY  # Ray's processes, and so the ingress replica, inherit it
    try:
        with local_ray():
            ingress = {"key_cache_ttl_s": CACHE_TTL_S, "usage_flush_interval_s": 1.0, "session_lease_ttl_s": 10.0}
            yield start_app(parity, tmp_path_factory.mktemp("voices"), converters=1, ingress=ingress)
    finally:
        if previous is None:
            os.environ.pop(environment.ADMIN_KEY, None)
        else:
            os.environ[environment.ADMIN_KEY] = previous


@dataclass
class Tenant:
    key_id: str
    api_key: str
    token: str
    voice_id: str


def new_tenant(app: ServeApp, key_id: str, max_sessions: int | None = None) -> Tenant:
    """A key made through the admin API, with a token and a voice of its own (voices belong to keys)."""
    created = create_key(BASE_URL, ADMIN_KEY, key_id, max_sessions=max_sessions)
    token = get_token(BASE_URL, created["api_key"])
    reference = app.parity.root / app.parity.bundle["files"]["reference_22k"]
    voice = upload_voice(BASE_URL, token, reference)
    return Tenant(key_id=key_id, api_key=created["api_key"], token=token, voice_id=voice["voice_id"])


def stream(app: ServeApp, tenant: Tenant, seconds: float = 1.0, realtime: bool = False) -> StreamResult:
    return asyncio.run(
        stream_audio(BASE_URL, tenant.token, tenant.voice_id, app.source_48k(seconds), realtime=realtime)
    )


def status_of(call: Callable[[], object]) -> int | None:
    with pytest.raises(ClientError) as refused:
        call()
    return refused.value.status


def until_refused(call: Callable[[], object], within_s: float) -> None:
    """Calls `call` until the service answers it with 401 (the change took effect), failing after `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            call()
        except ClientError as refused:
            assert refused.status == 401, refused
            return
        assert time.monotonic() < deadline, f"still accepted after {within_s} s"
        time.sleep(0.1)


def test_the_admin_api_needs_the_admin_key(app: ServeApp) -> None:
    assert status_of(lambda: list_keys(BASE_URL, "not-the-admin-key-at-all")) == 401
    assert status_of(lambda: list_keys(BASE_URL, API_KEY)) == 401  # an API key is not an admin key
    assert status_of(lambda: create_key(BASE_URL, ADMIN_KEY, "../bad")) == 422


def test_a_created_key_streams_and_its_usage_grows(app: ServeApp) -> None:
    tenant = new_tenant(app, "tenant-usage")
    assert my_usage(BASE_URL, tenant.token)["stream_seconds"] == 0
    result = stream(app, tenant, seconds=2.0)
    assert result.error is None and result.end is not None
    usage = my_usage(BASE_URL, tenant.token)
    assert usage["stream_seconds"] > 0 and usage["live_sessions"] == 0 and usage["period"] == "utc_day"
    assert key_usage(BASE_URL, ADMIN_KEY, "tenant-usage")["stream_seconds"] == usage["stream_seconds"]
    listed = {key["key_id"]: key for key in list_keys(BASE_URL, ADMIN_KEY)}
    assert listed["test"]["static"] and not listed["tenant-usage"]["static"]
    assert "api_key" not in listed["tenant-usage"] and "digest" not in listed["tenant-usage"]


def test_a_revoked_key_gets_no_token_and_its_token_starts_no_stream(app: ServeApp) -> None:
    tenant = new_tenant(app, "tenant-revoked")
    assert stream(app, tenant).error is None
    revoked = revoke_key(BASE_URL, ADMIN_KEY, "tenant-revoked")
    assert revoked["revoked_at"] is not None
    # Within the key cache's TTL on every replica (one here): until then, a replica may still trust its cached record.
    until_refused(lambda: get_token(BASE_URL, tenant.api_key), within_s=CACHE_TTL_S + 10)
    refused = stream(app, tenant)
    assert refused.error is not None and refused.error["code"] == "unauthorized" and refused.ready is None
    assert status_of(lambda: list_voices(BASE_URL, tenant.token)) == 401
    assert status_of(lambda: create_key(BASE_URL, ADMIN_KEY, "tenant-revoked")) == 409  # the id stays taken


def test_revoking_a_key_ends_its_running_stream(app: ServeApp) -> None:
    """Running sessions are re-checked at every usage flush (1 s here): a revoked key's stream ends, unauthorized."""
    tenant = new_tenant(app, "tenant-cut")

    async def revoked_mid_stream() -> StreamResult:
        running = await started_stream(BASE_URL, tenant.token, tenant.voice_id, app.source_48k(20.0))
        revoke_key(BASE_URL, ADMIN_KEY, "tenant-cut")
        return await asyncio.wait_for(running.result, 15)  # long before its 20 s of audio

    result = asyncio.run(revoked_mid_stream())
    assert result.error is not None and result.error["code"] == "unauthorized" and "revoked" in result.error["message"]


def test_static_keys_cannot_be_revoked_or_rotated_through_the_api(app: ServeApp) -> None:
    for call in (lambda: revoke_key(BASE_URL, ADMIN_KEY, "test"), lambda: rotate_key(BASE_URL, ADMIN_KEY, "test")):
        with pytest.raises(ClientError, match="static key") as refused:
            call()
        assert refused.value.status == 409
    assert status_of(lambda: revoke_key(BASE_URL, ADMIN_KEY, "nobody")) == 404
    get_token(BASE_URL, API_KEY)


def test_rotation_keeps_the_old_secret_for_its_grace_only(app: ServeApp) -> None:
    tenant = new_tenant(app, "tenant-rotated")
    rotated = rotate_key(BASE_URL, ADMIN_KEY, "tenant-rotated", grace_s=2.0)
    new_secret = rotated["api_key"]
    assert new_secret != tenant.api_key and rotated["previous_valid_until"] is not None
    get_token(BASE_URL, tenant.api_key)  # within the grace period
    until_refused(lambda: get_token(BASE_URL, tenant.api_key), within_s=2.0 + CACHE_TTL_S + 10)
    token = get_token(BASE_URL, new_secret)
    assert my_usage(BASE_URL, token)["key_id"] == "tenant-rotated"
    # Tokens obtained with the old secret stop with it: at the HTTP API and at a stream's start.
    assert status_of(lambda: my_usage(BASE_URL, tenant.token)) == 401
    refused = stream(app, tenant)
    assert refused.error is not None and refused.error["code"] == "unauthorized" and refused.ready is None
    assert "rotated" in refused.error["message"]
    assert stream(app, Tenant(tenant.key_id, new_secret, token, tenant.voice_id)).error is None


def test_a_second_session_over_the_keys_limit_is_refused_while_the_first_goes_on(app: ServeApp) -> None:
    tenant = new_tenant(app, "tenant-one-session", max_sessions=1)
    audio = app.source_48k(3.0)

    async def two() -> tuple[StreamResult, StreamResult]:
        first = (await started_stream(BASE_URL, tenant.token, tenant.voice_id, audio)).result
        second = await stream_audio(BASE_URL, tenant.token, tenant.voice_id, audio, realtime=True)
        return await first, second

    first, second = asyncio.run(two())
    assert second.error is not None and second.error["code"] == "rate_limited" and second.ready is None
    assert second.error["retry_after_s"] > 0
    assert first.error is None and first.end is not None and len(first.output_48k) >= len(audio)
    assert stream(app, tenant).error is None  # the first one ended: its slot is free again
    assert my_usage(BASE_URL, tenant.token)["quotas"]["max_sessions"] == 1
