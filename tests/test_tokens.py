from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from app.auth.tokens import (
    ApiKeys,
    IssuedToken,
    StaticKeys,
    TokenError,
    TokenSigner,
    bearer,
    from_loopback,
    static_keys,
)
from tests.fakes import FakeClock

SECRET = b"s" * 32
API_KEY = "sk-live-0123456789abcdef"
OTHER_KEY = "sk-live-fedcba9876543210"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(payload: str, secret: bytes = SECRET) -> str:
    """A token with any payload, signed as the server would: for inputs the signer itself never produces."""
    return f"{payload}.{b64(hmac.new(secret, payload.encode(), hashlib.sha256).digest())}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def signer(clock: FakeClock) -> TokenSigner:
    return TokenSigner(SECRET, ttl_seconds=900, clock=clock)


def verify_error(signer: TokenSigner, token: str) -> str:
    with pytest.raises(TokenError) as caught:
        signer.verify(token)
    return str(caught.value)


# Session tokens


def test_issue_and_verify(signer: TokenSigner, clock: FakeClock) -> None:
    issued = signer.issue("team-a")
    assert issued.expires_at == clock.now + 900
    claims = signer.verify(issued.token)
    assert claims.key_id == "team-a" and claims.expires_at == issued.expires_at


def test_token_format(signer: TokenSigner, clock: FakeClock) -> None:
    payload, signature = signer.issue("team-a").token.split(".")
    assert json.loads(base64.urlsafe_b64decode(payload + "==")) == {"sub": "team-a", "exp": clock.now + 900}
    assert signed(payload).split(".")[1] == signature
    assert "=" not in payload + signature  # base64url without padding


def test_valid_until_expiry(signer: TokenSigner, clock: FakeClock) -> None:
    token = signer.issue("team-a").token
    clock.now += 899.9
    assert signer.verify(token).key_id == "team-a"
    clock.now += 0.1
    assert verify_error(signer, token) == "token expired"


def test_tampered_payload(signer: TokenSigner, clock: FakeClock) -> None:
    _, signature = signer.issue("team-a").token.split(".")
    forged = b64(json.dumps({"sub": "team-b", "exp": clock.now + 900}).encode())
    assert verify_error(signer, f"{forged}.{signature}") == "bad token signature"
    extended = b64(json.dumps({"sub": "team-a", "exp": clock.now + 10**9}).encode())
    assert verify_error(signer, f"{extended}.{signature}") == "bad token signature"


def test_tampered_signature(signer: TokenSigner) -> None:
    payload, signature = signer.issue("team-a").token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    assert verify_error(signer, f"{payload}.{flipped}") == "bad token signature"
    assert verify_error(signer, f"{payload}.{signature[:-1]}") == "bad token signature"


def test_non_canonical_signature_encoding_is_refused(signer: TokenSigner) -> None:
    # 32 bytes take 43 base64 characters; the last carries 2 unused bits, so other characters decode to the same
    # bytes. Only the one encoding the server produces is accepted.
    payload, signature = signer.issue("team-a").token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = signature[:-1] + alphabet[alphabet.index(signature[-1]) ^ 1]
    assert base64.urlsafe_b64decode(twin + "=") == base64.urlsafe_b64decode(signature + "=")
    assert verify_error(signer, f"{payload}.{twin}") == "bad token signature"


def test_wrong_secret(signer: TokenSigner, clock: FakeClock) -> None:
    other = TokenSigner(b"o" * 32, clock=clock)
    assert verify_error(signer, other.issue("team-a").token) == "bad token signature"


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b.c", ".", "abc.", ".abc", "a+b.c/d", "abc.dé", "ab=.cd", "abc .def", "a" * 2000 + ".b"],
)
def test_malformed_tokens(signer: TokenSigner, token: str) -> None:
    assert verify_error(signer, token) == "malformed token"


@pytest.mark.parametrize(
    "payload",
    [
        b64(b"not json"),
        b64(b"\xff\xfe"),
        "a",  # one base64 character decodes to nothing valid
        b64(b"[1, 2]"),
        b64(b'{"sub": "team-a"}'),
        b64(b'{"exp": 2000000}'),
        b64(b'{"sub": 7, "exp": 2000000}'),
        b64(b'{"sub": "team-a", "exp": "2000000"}'),
        b64(b'{"sub": "team-a", "exp": true}'),
    ],
)
def test_malformed_claims_with_a_valid_signature(signer: TokenSigner, payload: str) -> None:
    assert verify_error(signer, signed(payload)) == "malformed token claims"


def test_integer_expiry_is_accepted(signer: TokenSigner, clock: FakeClock) -> None:
    claims = signer.verify(signed(b64(json.dumps({"sub": "team-a", "exp": int(clock.now) + 60}).encode())))
    assert claims.expires_at == clock.now + 60


def test_signer_arguments() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenSigner(b"short")
    with pytest.raises(ValueError, match="positive"):
        TokenSigner(SECRET, ttl_seconds=0)


def test_no_secret_in_reprs(signer: TokenSigner) -> None:
    issued = signer.issue("team-a")
    assert issued.token not in repr(issued)
    assert repr(issued) == f"IssuedToken(expires_at={issued.expires_at})"
    assert SECRET.decode() not in repr(signer) and "TokenSigner" in repr(signer)
    assert "secret-token" not in repr(IssuedToken(token="secret-token", expires_at=1.0))


def test_no_token_in_errors(signer: TokenSigner, clock: FakeClock) -> None:
    token = signer.issue("team-a").token
    payload, signature = token.split(".")
    clock.now += 10_000
    attempts = [token, f"{payload}.{signature[::-1]}", token + "!", f"{payload}.{signature}.x"]
    for attempt in attempts:
        with pytest.raises(TokenError) as caught:
            signer.verify(attempt)
        for secret in (payload, signature, SECRET.decode()):
            assert secret not in str(caught.value) and secret not in repr(caught.value)


# API keys


def test_authenticate() -> None:
    keys = ApiKeys({"team-a": API_KEY, "team-b": OTHER_KEY})
    assert keys.authenticate(API_KEY) == "team-a"
    assert keys.authenticate(OTHER_KEY) == "team-b"


def test_config_keys_are_development_keys_and_the_environment_replaces_them() -> None:
    development = static_keys({"dev": API_KEY}, None)
    assert development.keys is not None and development.keys.key_ids == {"dev"} and development.development == {"dev"}
    assert static_keys({"dev": API_KEY}, "").development == {"dev"}  # set but empty: not set
    production = static_keys({"dev": API_KEY}, f"main={OTHER_KEY}, partner={API_KEY}x")
    assert production.keys is not None and production.keys.key_ids == {"main", "partner"}
    assert production.development == frozenset()
    with pytest.raises(TokenError):
        production.keys.authenticate(API_KEY)  # the config's key opens nothing once real keys are set
    assert static_keys({}, None) == StaticKeys(None, frozenset())


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("10.0.0.7", False), ("203.0.113.7", False),
     ("::ffff:10.0.0.7", False), ("localhost", False), ("", False), (None, False)],
)  # fmt: skip
def test_loopback_peers(host: str | None, loopback: bool) -> None:
    assert from_loopback(host) == loopback


@pytest.mark.parametrize("presented", ["", API_KEY[:-1], API_KEY + "x", API_KEY.upper(), " " + API_KEY])
def test_unknown_api_key(presented: str) -> None:
    with pytest.raises(TokenError) as caught:
        ApiKeys({"team-a": API_KEY}).authenticate(presented)
    assert str(caught.value) == "unknown API key"


def test_api_key_configuration_errors_name_ids_not_keys() -> None:
    with pytest.raises(ValueError, match="no API keys"):
        ApiKeys({})
    with pytest.raises(ValueError, match=r"too short: \['team-b'\]") as caught:
        ApiKeys({"team-a": API_KEY, "team-b": "tiny-key"})
    assert "tiny-key" not in str(caught.value)
    with pytest.raises(ValueError, match="share the same API key") as caught:
        ApiKeys({"team-a": API_KEY, "team-b": API_KEY})
    assert API_KEY not in str(caught.value)


def test_api_keys_repr_shows_ids_only() -> None:
    keys = ApiKeys({"team-a": API_KEY, "team-b": OTHER_KEY})
    assert repr(keys) == "ApiKeys(key_ids=['team-a', 'team-b'])"
    assert API_KEY not in str(vars(keys))  # only digests are kept


# Authorization header


@pytest.mark.parametrize(
    ("header", "credential"),
    [
        (f"Bearer {API_KEY}", API_KEY),
        (f"bearer {API_KEY}", API_KEY),
        (f"BEARER  {API_KEY} ", API_KEY),
        ("Bearer abc.def", "abc.def"),
    ],
)
def test_bearer(header: str, credential: str) -> None:
    assert bearer(header) == credential


def test_bearer_missing_header() -> None:
    with pytest.raises(TokenError, match="missing Authorization header"):
        bearer(None)


@pytest.mark.parametrize(
    "header", ["", "Bearer", "Bearer ", f"Basic {API_KEY}", API_KEY, f"Bearer {API_KEY} extra", f"Bearer\t{API_KEY}"]
)
def test_bearer_malformed_header(header: str) -> None:
    with pytest.raises(TokenError) as caught:
        bearer(header)
    assert str(caught.value) == "the Authorization header must be 'Bearer <credential>'"
    assert API_KEY not in repr(caught.value)
