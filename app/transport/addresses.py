"""Where the service may send UDP on a client's say: the one outbound address filter (RTP now; ICE checks too).

A client names addresses (an RTP peer's declared address, its packets' source, ICE candidates): without a filter, a
caller with a token could make the service send to the cloud's metadata endpoint, to the cluster's own private
services, or to anything else only the service's network can reach. So outbound UDP goes only to public unicast
addresses (Python's `is_global`: no private, loopback, link-local, carrier-grade NAT, reserved or documentation
ranges, which covers the metadata endpoints 169.254.169.254, fd00:ec2::254 and 100.100.100.200) and never to
multicast, unless an operator lists a network in `allowed`: the private network of a media gateway, or loopback
for the tests.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class OutboundFilter:
    """Public unicast addresses, plus the `allowed` networks (CIDR strings, e.g. "10.20.0.0/16", "127.0.0.0/8")."""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self.allowed: tuple[IpNetwork, ...] = tuple(ipaddress.ip_network(network) for network in allowed)

    def allows(self, host: str) -> bool:
        """Whether UDP may go to `host`, an IP address literal (a name is refused: resolving it is the caller's
        business, and the answer, not the name, is what must pass)."""
        try:
            address: IpAddress = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1 on the wire
        if any(address in network for network in self.allowed):
            return True
        return address.is_global and not address.is_multicast
