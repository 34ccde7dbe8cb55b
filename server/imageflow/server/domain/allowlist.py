"""Where the registry may point: an allowlist of IPs, CIDRs, host names and `*.suffix` names, each with an optional
port. Checked before anything is dialled, so a refused address is never contacted."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class _Entry:
    network: IpNetwork | None
    name: str | None
    suffix: bool
    port: int | None

    def allows(self, host: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return ip is not None and ip.version == self.network.version and ip in self.network
        if ip is not None or self.name is None:
            return False
        return host.endswith("." + self.name) if self.suffix else host == self.name


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, int(port)
    return entry, None


def _parse(entry: str) -> _Entry:
    host, port = _split_port(entry.strip())
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"allowlist entry {entry!r}: port out of range")
    try:
        return _Entry(ipaddress.ip_network(host, strict=False), None, False, port)
    except ValueError:
        pass
    name = host.lower().rstrip(".")
    suffix = name.startswith("*.")
    name = name[2:] if suffix else name
    if not name or "*" in name or "/" in name:
        raise ValueError(f"allowlist entry {entry!r} is not an IP, CIDR, host name or *.suffix")
    return _Entry(None, name, suffix, port)


class AddressAllowlist:
    """Parsed from IMAGEFLOW_TOOL_ALLOWLIST; `*` alone allows every address."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        entries = [e for e in (part.strip() for part in spec.split(",")) if e]
        self._any = "*" in entries
        self._entries = [_parse(e) for e in entries if e != "*"]

    def allows(self, address: str) -> bool:
        """Whether `host:port` (IPv6 in brackets) may be registered."""
        if self._any:
            return True
        host, port = _split_port(address)
        if port is None:
            return False
        host = host.lower().rstrip(".")
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        return any(entry.allows(host, ip, port) for entry in self._entries)


LOOPBACK_ONLY = "127.0.0.0/8,::1,localhost"
