"""The admin API's pieces without Serve: the admin key, request bodies, error answers, and 404 while it is off."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import HTTPException
from pydantic import ValidationError

from app.auth.admin import AdminKey, NewKeyRequest, RotateRequest
from app.auth.keystore import KeyExists, KeyNotFound, KeyRevoked, Quotas, StaticKeyError
from app.auth.tokens import TokenError
from deployments.ingress import Ingress
from deployments.keys import admin_error

ADMIN_KEY = "admin-key-0123456789abcdef"


def test_admin_key_is_checked_and_never_shown() -> None:
    admin = AdminKey(ADMIN_KEY)
    admin.check(ADMIN_KEY)
    with pytest.raises(TokenError, match="wrong admin key"):
        admin.check(ADMIN_KEY + "x")
    assert ADMIN_KEY not in repr(admin)
    assert AdminKey.from_value(None) is None and AdminKey.from_value("") is None
    with pytest.raises(ValueError, match="at least"):
        AdminKey("short")


def test_left_out_quotas_take_the_defaults_and_null_is_no_limit() -> None:
    defaults = Quotas(max_sessions=2, max_stream_minutes_per_day=60)
    assert NewKeyRequest().quotas(defaults) == defaults
    body = NewKeyRequest.model_validate_json('{"max_sessions": null, "max_stream_minutes_per_day": 5}')
    assert body.quotas(defaults) == Quotas(max_sessions=None, max_stream_minutes_per_day=5)
    for bad in ('{"max_sessions": 0}', '{"unknown": 1}', '{"grace_s": 1}'):
        with pytest.raises(ValidationError):
            NewKeyRequest.model_validate_json(bad)
    with pytest.raises(ValidationError):
        RotateRequest.model_validate_json('{"grace_s": -1}')


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (KeyNotFound("no key x"), 404),
        (TokenError("the key of this token no longer exists"), 404),
        (StaticKeyError("ops"), 409),
        (KeyExists("taken"), 409),
        (KeyRevoked("revoked"), 409),
        (ValueError("bad id"), 422),
    ],
)
def test_admin_errors_map_to_http(error: Exception, status: int) -> None:
    assert admin_error(error).status_code == status


def test_the_admin_api_is_404_while_off_and_401_with_a_wrong_key() -> None:
    check = Ingress._admin  # the route guard, called without a Serve replica around it
    without: Any = SimpleNamespace(admin=None)  # stand-ins for the Ingress: the guard reads only .admin
    with pytest.raises(HTTPException) as off:
        check(without, f"Bearer {ADMIN_KEY}")
    assert off.value.status_code == 404
    on: Any = SimpleNamespace(admin=AdminKey(ADMIN_KEY))
    check(on, f"Bearer {ADMIN_KEY}")
    for header in (None, "Bearer wrong-admin-key-0123456789", ADMIN_KEY):
        with pytest.raises(HTTPException) as refused:
            check(on, header)
        assert refused.value.status_code == 401
