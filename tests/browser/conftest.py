"""Browser tests run in a network namespace that has only loopback (scripts/test enters it before Ray starts).

Outside such a namespace Chromium sends its WebRTC media from the host's real address and reaches for the
internet, so the tests refuse to run there rather than half-work.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")


def loopback_only() -> bool:
    # if_nameindex asks the kernel about this process's namespace (sysfs would still show the host's interfaces).
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def pytest_sessionstart(session: pytest.Session) -> None:
    if not loopback_only():
        pytest.exit("browser tests need a loopback-only network namespace: run them through scripts/test", 2)
    if not CHROMIUM.exists():
        pytest.exit("browser tests need Debian's chromium at /usr/bin/chromium (scripts/test installs it)", 2)
