"""The admin API's credential and its request and answer shapes (routes: deployments/ingress.py, `/v1/admin/keys`).

The admin key comes only from the environment (`SEEDVC_ADMIN_KEY`), never from a config file. Without it the admin
API does not exist: its routes answer 404 exactly like an unknown path, so a scan learns nothing. A wrong admin key
gets 401. Bodies are parsed only after the admin key checked out, so an unauthenticated caller never sees
validation details either.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import asdict
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.auth.keystore import MAX_GRACE_S, MAX_NAME_CHARS, NewSecret, Quotas
from app.auth.tokens import MIN_API_KEY_CHARS, TokenError
from app.auth.usage import Usage


class AdminKey:
    """The one key that may administer API keys. Only its SHA-256 digest is kept."""

    def __init__(self, key: str) -> None:
        if len(key) < MIN_API_KEY_CHARS:
            raise ValueError(f"the admin key must be at least {MIN_API_KEY_CHARS} characters")
        self._digest = hashlib.sha256(key.encode()).digest()

    def __repr__(self) -> str:
        return "AdminKey()"

    @classmethod
    def from_value(cls, value: str | None) -> AdminKey | None:
        """The admin key from an environment variable's value; None (admin API off) when unset or empty."""
        return cls(value) if value else None

    def check(self, presented: str) -> None:
        if not hmac.compare_digest(self._digest, hashlib.sha256(presented.encode()).digest()):
            raise TokenError("wrong admin key")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NewKeyRequest(_Body):
    """`POST /v1/admin/keys`. A quota left out takes the service's default; a quota given as null is no limit."""

    key_id: str | None = Field(None, description="1-64 letters, digits, '_' or '-'; random when absent")
    name: str | None = Field(None, max_length=MAX_NAME_CHARS)
    max_sessions: int | None = Field(None, ge=1)
    max_stream_minutes_per_day: float | None = Field(None, gt=0)

    def quotas(self, defaults: Quotas) -> Quotas:
        given = self.model_fields_set
        return Quotas(
            max_sessions=self.max_sessions if "max_sessions" in given else defaults.max_sessions,
            max_stream_minutes_per_day=self.max_stream_minutes_per_day
            if "max_stream_minutes_per_day" in given
            else defaults.max_stream_minutes_per_day,
        )


class RotateRequest(_Body):
    """`POST /v1/admin/keys/{key_id}/rotate`; the body is optional."""

    grace_s: float | None = Field(None, ge=0, le=MAX_GRACE_S, description="old secret's grace; absent = default")


def new_secret_answer(new: NewSecret) -> dict[str, Any]:
    """The key's record and, this once, its secret."""
    return {**new.record.public(), "api_key": new.secret}


def static_key_answer(key_id: str, quotas: Quotas) -> dict[str, Any]:
    return {"key_id": key_id, "static": True, "quotas": asdict(quotas)}


def usage_answer(usage: Usage) -> dict[str, Any]:
    return {**asdict(usage), "period": "utc_day"}
