"""Checks for the network settings (IPADDR, NETMASK, GATEWAY, DNS, NIC, HTTPS_PROXY): one reason per bad value.

Shared by the seed reader, the static-address prompt and the kernel `ip=` reader, so every path refuses
the same values with the same words as /usr/bin/start.sh.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

NIC_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_QUAD_RE = re.compile(rf"^{_OCTET}(\.{_OCTET}){{3}}$")


def ipv4_problem(value: str, what: str = "address") -> str | None:
    if not _QUAD_RE.match(value.strip()):
        return f"{value!r} is not an IPv4 {what} (four numbers 0-255 separated by dots, e.g. 192.168.10.20)"
    return None


def prefix_of(netmask: str) -> int | None:
    """Prefix length of a dotted mask (255.255.255.0) or a prefix length (24, /24); None when invalid."""
    text = netmask.strip().removeprefix("/")
    if text.isdigit():
        if text.startswith("0") or not 1 <= int(text) <= 32:
            return None
        return int(text)
    if ipv4_problem(text):
        return None
    try:
        return ipaddress.IPv4Network(f"0.0.0.0/{text}").prefixlen or None
    except ValueError:
        return None  # not ones-then-zeros


def netmask_problem(value: str) -> str | None:
    if prefix_of(value) is None:
        return f"{value!r} is not a subnet mask (e.g. 255.255.255.0, or a prefix length 1-32 such as 24)"
    return None


def dns_servers(value: str) -> list[str]:
    return [s for s in re.split(r"[,\s]+", value.strip()) if s]


def dns_problem(value: str) -> str | None:
    servers = dns_servers(value)
    if not servers:
        return "give at least one DNS server, e.g. 192.168.10.10"
    for server in servers:
        if ipv4_problem(server):
            return f"{server!r} is not an IPv4 address (separate several DNS servers with commas)"
    return None


def nic_problem(value: str) -> str | None:
    if not NIC_RE.match(value) or value in (".", ".."):
        return f"{value!r} is not a network interface name (see `ip link`, e.g. ens3 or eth0)"
    return None


def gateway_problem(gateway: str, ipaddr: str, netmask: str) -> str | None:
    """The gateway must be an address in the subnet of ipaddr/netmask, other than ipaddr itself."""
    problem = ipv4_problem(gateway)
    if problem:
        return problem
    prefix = prefix_of(netmask)
    if prefix is None or ipv4_problem(ipaddr):
        return None  # reported on their own
    if gateway.strip() == ipaddr.strip():
        return f"gateway {gateway} is the same as the address: give the router's address"
    net = ipaddress.IPv4Network(f"{ipaddr.strip()}/{prefix}", strict=False)
    if prefix < 32 and ipaddress.IPv4Address(gateway.strip()) not in net:
        return f"gateway {gateway} is not in the subnet {net} of address {ipaddr}: check the gateway and netmask"
    return None


def proxy_url(value: str) -> str:
    """`host:port` -> `http://host:port` (an HTTPS proxy is spoken to in plain HTTP with CONNECT)."""
    value = value.strip()
    return value if "://" in value else f"http://{value}"


def proxy_problem(value: str) -> str | None:
    """None when `value` is a usable proxy URL. Never quotes the value: it may carry a password."""
    url = proxy_url(value)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return "the HTTPS proxy must be written http://host:port (or host:port)"
    try:
        port = parts.port
    except ValueError:
        return "the HTTPS proxy's port is not a number 1-65535"
    if not parts.hostname:
        return "the HTTPS proxy has no host name; write http://host:port"
    if port is None:
        return f"the HTTPS proxy {parts.hostname} needs a port, e.g. http://{parts.hostname}:3128"
    if parts.path not in ("", "/") or parts.query:
        return "the HTTPS proxy must be only http://host:port (no path)"
    return None


def proxy_password(value: str) -> str | None:
    """The password inside a proxy URL (a secret), if any."""
    try:
        return urlsplit(proxy_url(value)).password
    except ValueError:
        return None


def proxy_display(value: str) -> str:
    """The proxy for the console and log: scheme://host:port, without user and password."""
    parts = urlsplit(proxy_url(value))
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{parts.hostname or '?'}{port}"


@dataclass(frozen=True)
class StaticConfig:
    """A checked static IPv4 configuration (what CONFIG_NETWORK=1 /usr/bin/start.sh applies)."""

    address: str
    prefix: int
    gateway: str
    dns: tuple[str, ...]
    nic: str | None = None
    hostname: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def netmask(self) -> str:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{self.prefix}").netmask)

    def env(self) -> dict[str, str]:
        """The variables start.sh / config-network take."""
        env = {"IPADDR": self.address, "NETMASK": str(self.prefix), "GATEWAY": self.gateway, "DNS": ",".join(self.dns)}
        if self.nic:
            env["NIC"] = self.nic
        return env

    def describe(self) -> str:
        nic = f" on {self.nic}" if self.nic else ""
        return f"{self.address}/{self.prefix} via {self.gateway}, DNS {', '.join(self.dns)}{nic}"


def static_config(values: dict[str, str]) -> StaticConfig:
    """Check IPADDR, NETMASK, GATEWAY, DNS (and NIC) together; ValueError naming the bad key otherwise."""
    missing = [k for k in ("IPADDR", "NETMASK", "GATEWAY", "DNS") if not values.get(k, "").strip()]
    if missing:
        raise ValueError(f"{', '.join(missing)} missing: a static address needs IPADDR, NETMASK, GATEWAY and DNS")
    for key, check in (("IPADDR", ipv4_problem), ("NETMASK", netmask_problem), ("DNS", dns_problem)):
        problem = check(values[key])
        if problem:
            raise ValueError(f"{key}: {problem}")
    problem = gateway_problem(values["GATEWAY"], values["IPADDR"], values["NETMASK"])
    if problem:
        raise ValueError(f"GATEWAY: {problem}")
    nic = values.get("NIC", "").strip() or None
    if nic and nic_problem(nic):
        raise ValueError(f"NIC: {nic_problem(nic)}")
    prefix = prefix_of(values["NETMASK"])
    assert prefix is not None
    return StaticConfig(
        values["IPADDR"].strip(), prefix, values["GATEWAY"].strip(), tuple(dns_servers(values["DNS"])), nic
    )
