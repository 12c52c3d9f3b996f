"""TURN credentials (app/auth/turn.py) and the per-key rate of GET /v1/ice (app/auth/ratelimit.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac

from app.auth.ratelimit import KeyRate
from app.auth.turn import TurnCredentials
from tests.fakes import FakeClock

SECRET = b"0123456789abcdef" * 4
URLS = ("turn:203.0.113.7:3478?transport=udp", "turn:203.0.113.7:3478?transport=tcp")


def test_one_username_per_key_and_window_valid_for_half_to_all_of_the_lifetime() -> None:
    turn = TurnCredentials(SECRET, URLS, ttl_s=600)
    start = 1_700_000_100.0  # a window boundary (a multiple of 300 s)
    first = turn.for_key("partner", start)
    assert [turn.for_key("partner", start + dt).username for dt in (1, 150, 299.9)] == [first.username] * 3
    assert turn.for_key("other", start).username != first.username
    following = turn.for_key("partner", start + 300)
    assert following.username != first.username
    for now in (start, start + 299.9, start + 300, start + 431.5):
        username = turn.for_key("partner", now).username
        assert username is not None
        expiry, _, key_id = username.partition(":")
        assert key_id == "partner" and 300 < int(expiry) - now <= 600


def test_the_password_is_coturns_hmac_of_the_username() -> None:
    server = TurnCredentials(SECRET, URLS, ttl_s=600).for_key("partner", 1_700_000_000.0)
    assert server.urls == list(URLS) and server.username is not None
    expected = base64.b64encode(hmac.new(SECRET, server.username.encode(), hashlib.sha1).digest()).decode()
    assert server.credential == expected
    assert SECRET.decode() not in repr(TurnCredentials(SECRET, URLS, ttl_s=600))


def test_each_key_has_its_own_rate_and_memory_stays_bounded() -> None:
    clock = FakeClock(0.0)
    rate = KeyRate(rate=1.0, burst=3, max_keys=2, clock=clock)
    assert [rate.allow("a") for _ in range(4)] == [True, True, True, False]
    assert rate.allow("b"), "another key is not limited by the first one's requests"
    clock.now += 1.0
    assert rate.allow("a") and not rate.allow("a")
    rate.allow("c")
    assert len(rate) == 2 and rate.retry_after_s == 1.0
