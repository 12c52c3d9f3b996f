"""The origin rule of the WebSocket handshakes and CORS (app/transport/origins.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.serving.config import IngressConfig
from app.transport.origins import normalized_origin, origin_allowed


@pytest.mark.parametrize(
    ("origin", "normal"),
    [
        ("https://Voice.Example.com", "https://voice.example.com"),
        ("https://voice.example.com:443/", "https://voice.example.com"),
        ("http://localhost:80", "http://localhost"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://[::1]:8000", "http://[::1]:8000"),
        ("*", "*"),
        ("null", "null"),
    ],
)
def test_origins_are_normalised(origin: str, normal: str) -> None:
    assert normalized_origin(origin) == normal


@pytest.mark.parametrize(
    "bad",
    [
        "voice.example.com",
        "ftp://example.com",
        "https://",
        "https://example.com/app",
        "https://a@example.com",
        "https://example.com:port",
        "https://example.com?x=1",
    ],
)
def test_what_is_not_an_origin_is_refused_in_the_config(bad: str) -> None:
    with pytest.raises(ValueError, match="not an origin"):
        normalized_origin(bad)
    with pytest.raises(ValidationError, match="allowed_origins"):
        IngressConfig(allowed_origins=[bad])


def test_config_default_is_same_origin_only_and_entries_are_normalised() -> None:
    assert IngressConfig().allowed_origins == []
    assert IngressConfig(allowed_origins=["HTTPS://App.Example.com:443"]).allowed_origins == ["https://app.example.com"]


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        (None, "service:8000", []),  # not a browser: nothing to check
        (None, None, []),
        ("http://127.0.0.1:8000", "127.0.0.1:8000", []),  # the service's own page
        ("https://voice.example.com", "voice.example.com", []),  # default port on one side only
        ("https://voice.example.com", "voice.example.com:443", []),
        ("http://LOCALHOST:8000", "localhost:8000", []),
        ("https://app.example.com", "api.example.com", ["https://app.example.com"]),  # listed
        ("https://anything.example", "api.example.com", ["*"]),
        ("null", "api.example.com", ["*"]),
        ("null", "api.example.com", ["null"]),
    ],
)
def test_allowed(origin: str | None, host: str | None, allowed: list[str]) -> None:
    assert origin_allowed(origin, host, allowed)


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        ("https://evil.example", "api.example.com", []),
        ("https://evil.example", "api.example.com", ["https://app.example.com"]),
        ("http://127.0.0.1:8001", "127.0.0.1:8000", []),  # another port is another origin
        ("https://127.0.0.1:8000", "127.0.0.1", []),  # https's default port is not 8000
        ("http://app.example.com", "api.example.com", ["https://app.example.com"]),  # scheme differs
        ("null", "api.example.com", []),  # sandboxed frames and local files
        ("*", "api.example.com", []),
        ("not an origin", "api.example.com", []),
        ("https://api.example.com", None, []),  # no Host to compare with
        ("https://api.example.com", "api.example.com:port", []),
    ],
)
def test_refused(origin: str, host: str | None, allowed: list[str]) -> None:
    assert not origin_allowed(origin, host, allowed)
