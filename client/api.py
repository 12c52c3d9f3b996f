"""Typed helpers for the server's HTTP API: session tokens and reference voices.

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


def _request(
    method: str,
    base_url: str,
    path: str,
    *,
    bearer: str,
    timeout: float,
    query: dict[str, str] | None = None,
    body: bytes | None = None,
) -> dict[str, Any]:
    """One call; returns the JSON object answered (empty for an empty body, as a 204 has)."""
    url = base_url.rstrip("/") + path
    if query:
        url += "?" + urllib.parse.urlencode(query)
    headers = {"Authorization": f"Bearer {bearer}", "Accept": "application/json"}
    if body is not None:
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
