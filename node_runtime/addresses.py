"""IP addresses: parsing literals, this machine's interface addresses, the network MPI should use for a host list."""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_address(text: str) -> str:
    """One IPv4 or IPv6 literal, returned in canonical form (no zone id, no brackets, no spaces)."""
    if "%" in text:
        raise ValueError(f"{text!r} has a zone id; use a global address")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 or IPv6 address") from None


def canonical(addresses: Iterable[str]) -> Iterable[str]:
    """The addresses that parse, canonical and without zone ids (psutil reports e.g. ``fe80::1%eth0``)."""
    for address in addresses:
        with contextlib.suppress(ValueError):
            yield str(ipaddress.ip_address(address.split("%", 1)[0]))


def local_addresses() -> list[str]:
    """Addresses of this machine's network interfaces (IPv4 and IPv6), via psutil."""
    import socket

    import psutil

    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)]


def interface_networks(hosts: Iterable[str]) -> tuple[IPNetwork, ...]:
    """The smallest network containing all ``hosts``, one per address family present (IPv4 first).

    An IPv4 loopback host (the emulator's nodes) stands for all of 127.0.0.0/8, the network ``lo`` carries: Open MPI
    selects interfaces whose address is in the network, and ``lo`` usually holds just 127.0.0.1."""
    addresses = [ipaddress.ip_address(host) for host in hosts]
    loopback = ipaddress.ip_network("127.0.0.0/8")
    addresses += [loopback[0], loopback[-1]] if any(a in loopback for a in addresses) else []
    networks: list[IPNetwork] = []
    for version, bits in ((4, 32), (6, 128)):
        if values := [int(a) for a in addresses if a.version == version]:
            prefix = bits - (min(values) ^ max(values)).bit_length()
            networks.append(ipaddress.ip_network((min(values), prefix), strict=False))
    return tuple(networks)
