"""Typed helpers for the server's HTTP API: session tokens, reference voices, usage, and the admin API's keys.

Standard library only (urllib), so that a client machine needs nothing beyond what the streaming client already
imports. Every failure, from a refused connection to a 4xx answer, raises `ClientError` carrying the server's
`detail` and the HTTP status, so that callers have one exception to report.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT_S = 30.0  # an upload is a few MB at most; the server embeds the voice before it answers


class ClientError(Exception):
    """An HTTP call that failed: `status` is the HTTP status, or None when the server could not be reached."""

    def __init__(self, status: int | None, detail: str) -> None:
        super().__init__(detail if status is None else f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


def get_token(base_url: str, api_key: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """Trades an API key for a short-lived session token (POST /v1/tokens)."""
    answer = _request("POST", base_url, "/v1/tokens", bearer=api_key, timeout=timeout)
    token = answer.get("token")
    if not isinstance(token, str) or not token:
        raise ClientError(200, f"the token endpoint answered without a token: {answer!r}")
    return token


def upload_voice(
    base_url: str, token: str, path: Path, name: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S
) -> dict[str, Any]:
    """Uploads a reference recording as it is on disk (the server decodes it); returns voice_id, seconds, name."""
    try:
        body = Path(path).read_bytes()
    except OSError as error:
        raise ClientError(None, f"cannot read {path}: {error}") from error
    query = {} if name is None else {"name": name}
    return _request("POST", base_url, "/v1/voices", bearer=token, query=query, body=body, timeout=timeout)


def list_voices(base_url: str, token: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> list[dict[str, Any]]:
    """The voices this token's key may use, each with voice_id, name and seconds."""
    voices = _request("GET", base_url, "/v1/voices", bearer=token, timeout=timeout).get("voices")
    if not isinstance(voices, list):
        raise ClientError(200, "the voice list answer has no 'voices' list")
    return voices


def delete_voice(base_url: str, token: str, voice_id: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Deletes one voice; an unknown id raises ClientError with the server's status (404)."""
    _request("DELETE", base_url, f"/v1/voices/{urllib.parse.quote(voice_id, safe='')}", bearer=token, timeout=timeout)


def my_usage(base_url: str, token: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """This token's key's usage today: day, stream_seconds, live_sessions, quotas (GET /v1/usage)."""
    return _request("GET", base_url, "/v1/usage", bearer=token, timeout=timeout)


# The admin API (the server's SEEDVC_ADMIN_KEY). Quotas: None (the default) leaves a quota to the server's default.


def create_key(
    base_url: str,
    admin_key: str,
    key_id: str | None = None,
    *,
    name: str | None = None,
    max_sessions: int | None = None,
    max_stream_minutes_per_day: float | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Creates an API key; the answer's `api_key` is its secret, which the server shows only this once."""
    fields = {
        "key_id": key_id,
        "name": name,
        "max_sessions": max_sessions,
        "max_stream_minutes_per_day": max_stream_minutes_per_day,
    }
    body = {field: value for field, value in fields.items() if value is not None}
    return _request("POST", base_url, "/v1/admin/keys", bearer=admin_key, json_body=body, timeout=timeout)


def list_keys(base_url: str, admin_key: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> list[dict[str, Any]]:
    """Every key, static and stored (revoked ones too), without secrets."""
    keys = _request("GET", base_url, "/v1/admin/keys", bearer=admin_key, timeout=timeout).get("keys")
    if not isinstance(keys, list):
        raise ClientError(200, "the key list answer has no 'keys' list")
    return keys


def rotate_key(
    base_url: str, admin_key: str, key_id: str, grace_s: float | None = None, *, timeout: float = DEFAULT_TIMEOUT_S
) -> dict[str, Any]:
    """A new secret for the key (in `api_key`); the old one keeps working for `grace_s` (None: the server's default)."""
    body = {} if grace_s is None else {"grace_s": grace_s}
    path = f"/v1/admin/keys/{urllib.parse.quote(key_id, safe='')}/rotate"
    return _request("POST", base_url, path, bearer=admin_key, json_body=body, timeout=timeout)


def revoke_key(base_url: str, admin_key: str, key_id: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Revokes the key for good; returns its record (with `revoked_at`)."""
    path = f"/v1/admin/keys/{urllib.parse.quote(key_id, safe='')}"
    return _request("DELETE", base_url, path, bearer=admin_key, timeout=timeout)


def key_usage(base_url: str, admin_key: str, key_id: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """A key's usage today and its quotas."""
    path = f"/v1/admin/keys/{urllib.parse.quote(key_id, safe='')}/usage"
    return _request("GET", base_url, path, bearer=admin_key, timeout=timeout)


def _request(
    method: str,
    base_url: str,
    path: str,
    *,
    bearer: str,
    timeout: float,
    query: dict[str, str] | None = None,
    body: bytes | None = None,
    json_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One call; returns the JSON object answered (empty for an empty body, as a 204 has)."""
    url = base_url.rstrip("/") + path
    if query:
        url += "?" + urllib.parse.urlencode(query)
    headers = {"Authorization": f"Bearer {bearer}", "Accept": "application/json"}
    if json_body is not None:
        body = json.dumps(json_body).encode()
        headers["Content-Type"] = "application/json"
    elif body is not None:
        headers["Content-Type"] = "application/octet-stream"
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as error:
        # HTTPError is also the response: its body holds FastAPI's {"detail": ...}.
        raise ClientError(error.code, _detail(error.read(), error.reason)) from None
    except urllib.error.URLError as error:
        raise ClientError(None, f"cannot reach {base_url}: {error.reason}") from None
    except (TimeoutError, ConnectionError) as error:
        # A timeout or reset while reading the answer is not wrapped in URLError.
        raise ClientError(None, f"no answer from {base_url}: {error}") from None
    if not payload:
        return {}
    try:
        answer = json.loads(payload)
    except json.JSONDecodeError:
        raise ClientError(status, f"{method} {path} answered with something other than JSON") from None
    if not isinstance(answer, dict):
        raise ClientError(status, f"{method} {path} answered with JSON that is not an object")
    return answer


def _detail(payload: bytes, reason: str) -> str:
    """The human part of an error answer: FastAPI's `detail` (a string, or a list for validation errors)."""
    try:
        detail = json.loads(payload)["detail"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        # Not FastAPI's shape (a proxy's HTML page, say): the reason phrase says more than the body.
        return str(reason)
    return detail if isinstance(detail, str) else json.dumps(detail)
