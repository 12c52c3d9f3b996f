"""Fuzzing credentials (app/auth/tokens.py) with hypothesis: session tokens and Authorization headers.

`TokenSigner.verify` refuses every string that is not a token it issued, and `bearer` every header that is not
`Bearer <credential>`, always with `TokenError` (which becomes `unauthorized` or HTTP 401) and never with the
credential in the message.
"""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from app.auth.tokens import MAX_TOKEN_CHARS, ApiKeys, TokenError, TokenSigner, bearer

FUZZ = settings(max_examples=300, deadline=None, database=None, print_blob=True)
SECRET = b"a fuzzing secret of at least 32 bytes"
NOW = 1_700_000_000.0
BASE64URL = string.ascii_letters + string.digits + "-_"

any_text = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=200),
    st.text(st.sampled_from(BASE64URL + ".=+/ "), max_size=200),
    st.integers(MAX_TOKEN_CHARS - 2, 3 * MAX_TOKEN_CHARS).map(lambda size: "A" * (size // 2) + "." + "B" * (size // 2)),
)


def signer() -> TokenSigner:
    return TokenSigner(SECRET, ttl_seconds=900, clock=lambda: NOW)


def refused(token: str) -> TokenError:
    try:
        signer().verify(token)
    except TokenError as error:
        assert str(error)
        if len(token) >= 8:
            assert token not in str(error)  # errors say what is wrong, never with what
        return error
    raise AssertionError(f"accepted a token this signer never issued: {token!r}")


@FUZZ
@given(token=any_text)
def test_any_string_is_refused_with_token_error(token: str) -> None:
    refused(token)


@st.composite
def mutated_tokens(draw: st.DrawFn) -> tuple[str, str]:
    """(issued token, mutation of it) for a random key id."""
    token = signer().issue(draw(st.text(max_size=30))).token
    payload, signature = token.split(".")
    kind = draw(st.sampled_from(["substitute", "truncate", "insert", "swap", "padding", "dots", "other_signature"]))
    if kind == "substitute":
        position = draw(st.integers(0, len(token) - 1))
        mutated = token[:position] + draw(st.sampled_from(BASE64URL + ".=")) + token[position + 1 :]
    elif kind == "truncate":
        mutated = token[: draw(st.integers(0, len(token) - 1))]
    elif kind == "insert":
        position = draw(st.integers(0, len(token)))
        mutated = token[:position] + draw(st.text(min_size=1, max_size=4)) + token[position:]
    elif kind == "swap":
        mutated = f"{signature}.{payload}"
    elif kind == "padding":
        mutated = f"{payload}{'=' * draw(st.integers(1, 3))}.{signature}"
    elif kind == "dots":
        mutated = draw(st.sampled_from([f"{token}.", f".{token}", f"{payload}..{signature}", f"{payload}.{token}"]))
    else:  # another token's signature on this payload
        other = signer().issue(draw(st.text(max_size=30)) + "-other").token
        mutated = f"{payload}.{other.split('.')[1]}"
    return token, mutated


@FUZZ
@given(tokens=mutated_tokens())
def test_every_change_to_an_issued_token_is_refused(tokens: tuple[str, str]) -> None:
    token, mutated = tokens
    assert signer().verify(token).expires_at == NOW + 900  # the original is good
    if mutated != token:
        refused(mutated)


@FUZZ
@given(key_id=st.text(max_size=60))
def test_any_key_id_round_trips(key_id: str) -> None:
    # Key ids with quotes, backslashes, unicode or lone surrogates all survive the JSON claims.
    assert signer().verify(signer().issue(key_id).token).key_id == key_id


headers = st.one_of(
    st.none(),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=80),
    st.builds(
        lambda scheme, gap, credential, tail: f"{scheme}{gap}{credential}{tail}",
        st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Bearer:", "", "Bearer\t", "Bėarer"]),
        st.sampled_from([" ", "  ", "\t", "", "\u00a0", " \u2003"]),
        st.text(max_size=40),
        st.sampled_from(["", " ", "\r\n", " x"]),
    ),
)


@FUZZ
@given(header=headers)
def test_bearer_returns_one_credential_or_raises_token_error(header: str | None) -> None:
    try:
        credential = bearer(header)
    except TokenError as error:
        assert str(error)
        if header is not None and len(header.strip()) >= 16:
            assert header.strip() not in str(error)
        return
    assert header is not None and header.strip().lower().startswith("bearer ")
    assert credential and credential in header and not any(character.isspace() for character in credential)


# What an HTTP header can carry: Starlette decodes header bytes as latin-1, so no other code points reach `bearer` or
# `authenticate` in the service.
latin1_headers = st.text(st.characters(max_codepoint=0xFF), max_size=80)


@FUZZ
@given(header=latin1_headers)
def test_any_presented_api_key_is_one_key_id_or_token_error(header: str) -> None:
    keys = ApiKeys({"team-a": "a-key-of-at-least-16-characters", "team-b": "another-key-at-least-16-chars"})
    try:
        key_id = keys.authenticate(bearer(header))
    except TokenError:
        return
    assert key_id in {"team-a", "team-b"} and header.split()[-1].startswith(("a-key", "another-key"))
