"""The runtime key store on a temporary directory: secrets only once, digests only on disk, rotation with grace,
revocation seen by another replica within the cache TTL, static keys out of the API's reach."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.auth.keystore import Authenticated, KeyExists, KeyNotFound, KeyRevoked, KeyStore, Quotas, StaticKeyError
from app.auth.tokens import GENERATION_CLAIM, ApiKeys, TokenError, TokenSigner
from tests.fakes import FakeClock

STATIC_KEY = "static-key-0123456789abcdef"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


def store(root: Path, clock: FakeClock, ttl: float = 5.0) -> KeyStore:
    return KeyStore(
        str(root),
        static=ApiKeys({"ops": STATIC_KEY}),
        default_quotas=Quotas(max_sessions=3),
        cache_ttl_s=ttl,
        clock=clock,
    )


@pytest.fixture
def keys(tmp_path: Path, clock: FakeClock) -> KeyStore:
    return store(tmp_path, clock)


def test_create_returns_the_secret_once_and_stores_only_its_digest(keys: KeyStore, tmp_path: Path) -> None:
    new = keys.create("partner", Quotas(max_sessions=2, max_stream_minutes_per_day=30), name="Partner Inc")
    assert new.secret.startswith("sk.partner.") and len(new.secret) > 40
    assert keys.authenticate(new.secret).key_id == "partner"
    on_disk = (tmp_path / "keys" / "partner.json").read_text()
    assert new.secret not in on_disk and new.secret.split(".")[-1] not in on_disk
    assert json.loads(on_disk)["quotas"] == {"max_sessions": 2, "max_stream_minutes_per_day": 30}
    assert new.secret not in repr(new) and new.record.digest not in repr(new.record)
    assert "digest" not in keys.get("partner").public()


def test_random_ids_default_quotas_and_listing(keys: KeyStore) -> None:
    first, second = keys.create(), keys.create()
    assert first.record.key_id != second.record.key_id and first.record.key_id.startswith("key_")
    assert first.record.quotas == Quotas(max_sessions=3)
    assert [record.key_id for record in keys.list()] == sorted([first.record.key_id, second.record.key_id])
    assert keys.static_ids == ["ops"]


def test_bad_taken_and_static_ids_are_refused(keys: KeyStore) -> None:
    keys.create("partner")
    with pytest.raises(KeyExists):
        keys.create("partner")
    for bad in ("../etc", "a.b", "", "-x", "x" * 65):
        with pytest.raises(ValueError, match="key id"):
            keys.create(bad)
    with pytest.raises(StaticKeyError, match="static key"):
        keys.create("ops")
    for operation in (keys.revoke, keys.rotate):
        with pytest.raises(StaticKeyError, match="SEEDVC_API_KEYS"):
            operation("ops")
    with pytest.raises(KeyNotFound):
        keys.revoke("nobody")
    with pytest.raises(KeyNotFound):
        keys.get("../keys/partner")


def test_static_keys_authenticate_with_default_quotas(keys: KeyStore) -> None:
    assert keys.authenticate(STATIC_KEY).key_id == "ops"
    keys.check_active("ops")
    assert keys.quotas("ops") == Quotas(max_sessions=3)


@pytest.mark.parametrize(
    "presented", ["", "sk", "sk..x", "sk.partner.", "sk.partner.wrong", "sk.nobody.abc", "not-a-key-at-all-xxxx"]
)
def test_wrong_and_malformed_keys_are_refused(keys: KeyStore, presented: str) -> None:
    keys.create("partner")
    with pytest.raises(TokenError, match="unknown API key"):
        keys.authenticate(presented)


def test_another_keys_secret_with_this_id_is_refused(keys: KeyStore) -> None:
    keys.create("partner")
    other = keys.create("other").secret
    with pytest.raises(TokenError):
        keys.authenticate(other.replace("sk.other.", "sk.partner."))


def test_revocation_is_immediate_here_and_within_the_ttl_on_another_replica(tmp_path: Path, clock: FakeClock) -> None:
    here, there = store(tmp_path, clock), store(tmp_path, clock)
    secret = here.create("partner").secret
    assert there.authenticate(secret).key_id == "partner"  # `there` caches the record now
    here.revoke("partner")
    with pytest.raises(KeyRevoked):
        here.authenticate(secret)
    with pytest.raises(KeyRevoked):
        here.check_active("partner")
    assert there.authenticate(secret).key_id == "partner"  # still cached: revocation reaches it within the TTL
    clock.now += 5.0
    with pytest.raises(KeyRevoked, match="revoked"):
        there.authenticate(secret)
    with pytest.raises(KeyRevoked):
        there.check_active("partner")
    assert here.revoke("partner").revoked_at is not None  # revoking again is harmless
    with pytest.raises(KeyExists):
        here.create("partner")  # the id stays taken: its voices and usage are filed under it


def test_a_key_created_on_another_replica_is_seen_at_once(tmp_path: Path, clock: FakeClock) -> None:
    here, there = store(tmp_path, clock), store(tmp_path, clock)
    with pytest.raises(TokenError):
        there.check_active("partner")  # now cached as unknown
    secret = here.create("partner").secret
    clock.now += 5.0
    assert there.authenticate(secret).key_id == "partner"


def test_rotation_keeps_the_old_secret_for_the_grace_period_only(keys: KeyStore, clock: FakeClock) -> None:
    old = keys.create("partner").secret
    new = keys.rotate("partner", grace_s=60).secret
    assert new != old
    assert keys.authenticate(new) == Authenticated("partner", generation=1)
    assert keys.authenticate(old) == Authenticated("partner", generation=0)
    clock.now += 60
    assert keys.authenticate(new).key_id == "partner"
    with pytest.raises(TokenError, match="unknown API key"):
        keys.authenticate(old)


def test_rotation_without_grace_refuses_the_old_secret_at_once_and_forgets_older_ones(keys: KeyStore) -> None:
    first = keys.create("partner").secret
    second = keys.rotate("partner", grace_s=600).secret
    third = keys.rotate("partner").secret  # default grace 0
    assert keys.authenticate(third).key_id == "partner"
    for old in (first, second):
        with pytest.raises(TokenError):
            keys.authenticate(old)


def test_tokens_of_a_rotated_secret_stop_when_its_grace_ends(keys: KeyStore, clock: FakeClock) -> None:
    """A session token carries the generation of the secret it was issued with; rotating the key ends the tokens of
    the old secret with the old secret itself (at once without grace), the new secret's tokens go on."""
    signer = TokenSigner(b"s" * 32, ttl_seconds=3600, clock=clock)
    old = keys.authenticate(keys.create("partner").secret)
    old_token = signer.verify(signer.issue(old.key_id, {GENERATION_CLAIM: str(old.generation)}).token)
    keys.check_token(old_token)
    new = keys.authenticate(keys.rotate("partner", grace_s=60).secret)
    new_token = signer.verify(signer.issue(new.key_id, {GENERATION_CLAIM: str(new.generation)}).token)
    keys.check_token(old_token)  # within the grace
    clock.now += 60
    with pytest.raises(TokenError, match="rotated"):
        keys.check_token(old_token)
    keys.check_token(new_token)
    keys.rotate("partner")  # no grace: a leak
    with pytest.raises(TokenError, match="rotated"):
        keys.check_token(new_token)
    forged = signer.verify(signer.issue("partner", {GENERATION_CLAIM: "x"}).token)
    with pytest.raises(TokenError):
        keys.check_token(forged)
    static = signer.verify(signer.issue("ops").token)  # static keys have one generation; a token naming none: 0
    keys.check_token(static)


def test_revoked_keys_cannot_be_rotated_and_grace_is_bounded(keys: KeyStore) -> None:
    keys.create("partner")
    with pytest.raises(ValueError, match="grace_s"):
        keys.rotate("partner", grace_s=-1)
    keys.revoke("partner")
    with pytest.raises(KeyRevoked):
        keys.rotate("partner")


def test_unknown_token_keys_are_not_active(keys: KeyStore) -> None:
    for key_id in ("nobody", "../x", ""):
        with pytest.raises(TokenError):
            keys.check_active(key_id)
        with pytest.raises(TokenError):
            keys.quotas(key_id)


def test_static_ids_must_be_safe_in_a_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="static key ids"):
        KeyStore(str(tmp_path), static=ApiKeys({"../x": STATIC_KEY}))


def test_works_on_an_fsspec_url(clock: FakeClock) -> None:
    keys = KeyStore("memory://keystore-test", clock=clock)
    secret = keys.create("partner").secret
    assert keys.authenticate(secret).key_id == "partner"
    assert [record.key_id for record in keys.list()] == ["partner"]
