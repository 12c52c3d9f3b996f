"""Which browser origins may use the service: the rule for the WebSocket handshakes and the CORS policy.

Browsers send an `Origin` header with every WebSocket handshake and cross-origin request, and a WebSocket is not
covered by CORS: without a check, any page a user visits could open `/v1/stream` from the user's browser. Allowed:

- no `Origin` header at all: a client that is not a browser (the Python client, curl), which no page can drive;
- the service's own page: an origin whose host and port are the request's `Host`;
- an origin listed in `IngressConfig.allowed_origins` (`scheme://host[:port]`), or any origin when the list holds "*".

Origins are compared normalised: lower case, default ports left out, no trailing slash. A browser sends the literal
origin `null` for sandboxed frames and local files; it matches only "*", or a listed "null".
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

ANY_ORIGIN = "*"
NULL_ORIGIN = "null"
DEFAULT_PORTS = {"http": 80, "https": 443}  # a page's origin is never anything else


def normalized_origin(origin: str) -> str:
    """`scheme://host[:port]` in lower case without a default port; ValueError when `origin` is not one.

    "*" and "null" pass unchanged. Used to check configured origins, so that a typo fails at start-up.
    """
    if origin in (ANY_ORIGIN, NULL_ORIGIN):
        return origin
    parts = urlsplit(origin.strip().lower())
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"{origin!r} is not an origin: expected scheme://host[:port] with scheme http or https")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{origin!r} is not an origin: it has more than scheme://host[:port]")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{origin!r} is not an origin: its port is not a number from 0 to 65535") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # IPv6 literals keep their brackets
    origin = f"{parts.scheme}://{host}"
    return origin if port in (None, DEFAULT_PORTS[parts.scheme]) else f"{origin}:{port}"


def _same_host(origin: str, host_header: str) -> bool:
    """Whether the origin's host and port are the request's `Host` (the page was served by this service)."""
    parts = urlsplit(origin)
    default = DEFAULT_PORTS[parts.scheme]
    try:
        request = urlsplit(f"//{host_header.strip().lower()}")
        return parts.hostname == request.hostname and (parts.port or default) == (request.port or default)
    except ValueError:  # a Host header with a port that is not a number
        return False


def origin_allowed(origin: str | None, host: str | None, allowed: Sequence[str]) -> bool:
    """Whether a request with these `Origin` and `Host` headers may proceed; `allowed` holds normalised origins."""
    if origin is None:
        return True
    if ANY_ORIGIN in allowed:
        return True
    try:
        candidate = normalized_origin(origin)
    except ValueError:
        return False  # not a browser's origin: refuse rather than guess
    if candidate in allowed:
        return True
    if candidate in (ANY_ORIGIN, NULL_ORIGIN):  # no scheme and host to compare with the request's
        return False
    return host is not None and _same_host(candidate, host)
