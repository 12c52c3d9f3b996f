"""A lossy network in user space (`tc netem` needs privileges these machines do not give): a UDP relay on loopback
that drops, duplicates, delays and so reorders datagrams, both ways, reproducibly (seeded).

The first peer to send becomes the client, unless the client is named; what it sends goes to `upstream`, and what
comes back from `upstream` goes to the client. The server sees the relay's address as its peer, as it would see a
NAT's. `upstream` may be set after the relay starts (a WebRTC caller knows the server's port only from the answer,
after its offer named the relay): until then nothing passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

Address = tuple[str, int]


@dataclass(frozen=True)
class Impairment:
    loss: float = 0.0  # probability a datagram is dropped
    duplicate: float = 0.0  # probability it is sent twice
    jitter_s: float = 0.0  # each copy is delayed uniformly in [0, jitter_s]: later ones overtake earlier ones


# The network every UDP transport must ride out (issue 13): 5 % loss, 30 ms jitter, a few duplicates.
LOSSY = Impairment(loss=0.05, duplicate=0.02, jitter_s=0.03)


@dataclass
class RelayCounts:
    forwarded: int = 0
    dropped: int = 0
    duplicated: int = 0


class Relay(asyncio.DatagramProtocol):
    def __init__(self, upstream: Address | None, impairment: Impairment, seed: int, client: Address | None) -> None:
        self.upstream = upstream
        self.impairment = impairment
        self.random = random.Random(seed)
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None
        self.counts = RelayCounts()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # asyncio's own is no subclass of it

    @property
    def address(self) -> Address:
        """Where to send instead of `upstream`."""
        assert self.transport is not None, "the relay is bound"
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        source = (addr[0], addr[1])
        if source == self.upstream:
            destination = self.client
        else:
            self.client = self.client or source
            destination = self.upstream if source == self.client else None
        if destination is None:
            return
        if self.random.random() < self.impairment.loss:
            self.counts.dropped += 1
            return
        copies = 2 if self.random.random() < self.impairment.duplicate else 1
        self.counts.duplicated += copies - 1
        loop = asyncio.get_running_loop()
        for _ in range(copies):
            loop.call_later(self.random.uniform(0, self.impairment.jitter_s), self._send, data, destination)

    def _send(self, data: bytes, destination: Address) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, destination)
            self.counts.forwarded += 1


@contextlib.asynccontextmanager
async def lossy_relay(
    upstream: Address | None, impairment: Impairment, seed: int = 0, client: Address | None = None
) -> AsyncIterator[tuple[Address, Relay]]:
    """A relay in front of `upstream`; yields its address (send there instead) and itself (for its counts)."""
    transport, relay = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: Relay(upstream, impairment, seed, client), local_addr=("127.0.0.1", 0)
    )
    try:
        yield relay.address, relay
    finally:
        transport.close()
