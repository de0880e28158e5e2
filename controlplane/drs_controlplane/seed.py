"""The seed file: source servers and recovery instances in a compact YAML form, turned into API documents.

Example (see controlplane/examples/seed.yaml):

    account: "123456789012"
    source_servers:
      - id: s-1234567890abcdef0
        hostname: web01
        vmware_uuid: 42101234-5678-9abc-def0-123456789abc
        nics: [{mac: "52:54:00:12:34:56", ips: [192.168.1.10]}]
        disks: [{device: /dev/sda, bytes: 10737418240}]
    recovery_instances:
      - id: i-0123456789abcdef0
        source_server: s-1234567890abcdef0
        private_ip: 10.0.1.10
        public_ip: 203.0.113.10
        disks: [{device: /dev/nvme0n1, bytes: 10737418240, source_device: /dev/sda}]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SOURCE_SERVER_RE = re.compile(r"^s-[0-9a-zA-Z]{17}$")
INSTANCE_RE = re.compile(r"^i-[0-9a-fA-F]{8,17}$")
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}$")
EC2_STATES = ("PENDING", "RUNNING", "STOPPING", "STOPPED", "SHUTTING-DOWN", "TERMINATED", "NOT_FOUND")


class SeedError(ValueError):
    """The seed file is wrong; the message names the entry and the field."""


@dataclass(frozen=True)
class SeedNic:
    mac: str
    ips: tuple[str, ...] = ()
    primary: bool = False


@dataclass(frozen=True)
class SeedDisk:
    device: str
    bytes: int
    source_device: str | None = None  # recovery instance disks: the source server disk it was recovered from


@dataclass(frozen=True)
class SeedSourceServer:
    id: str
    hostname: str
    fqdn: str | None = None
    vmware_uuid: str | None = None
    aws_instance_id: str | None = None
    os: str = "Linux"
    ram_bytes: int = 4 * 1024**3
    cpus: int = 2
    nics: tuple[SeedNic, ...] = ()
    disks: tuple[SeedDisk, ...] = ()


@dataclass(frozen=True)
class SeedRecoveryInstance:
    id: str
    source_server: str
    ec2_state: str = "RUNNING"
    private_ip: str = "10.0.0.10"
    public_ip: str | None = None
    mac: str = "02:00:00:00:00:01"
    is_drill: bool = False
    origin_environment: str = "ON_PREMISES"
    disks: tuple[SeedDisk, ...] = ()  # empty: one per source disk (nvme names, same sizes)
    use_private_ip: bool = False
    bandwidth_mbps: int = 0


@dataclass(frozen=True)
class Seed:
    account: str = "123456789012"
    source_servers: tuple[SeedSourceServer, ...] = ()
    recovery_instances: tuple[SeedRecoveryInstance, ...] = field(default_factory=tuple)


def _fields(where: str, raw: Any, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise SeedError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SeedError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    missing = sorted(required - set(raw))
    if missing:
        raise SeedError(f"{where}: missing field(s) {', '.join(missing)}")
    return raw


def _disk(where: str, raw: Any) -> SeedDisk:
    d = _fields(where, raw, {"device", "bytes", "source_device"}, {"device", "bytes"})
    if not str(d["device"]).startswith("/dev/"):
        raise SeedError(f"{where}.device: {d['device']!r} is not a /dev path")
    if not isinstance(d["bytes"], int) or d["bytes"] <= 0:
        raise SeedError(f"{where}.bytes: must be a positive integer number of bytes, got {d['bytes']!r}")
    return SeedDisk(str(d["device"]), d["bytes"], d.get("source_device"))


def _nic(where: str, raw: Any) -> SeedNic:
    n = _fields(where, raw, {"mac", "ips", "primary"}, {"mac"})
    if not MAC_RE.match(str(n["mac"])):
        raise SeedError(f"{where}.mac: {n['mac']!r} is not a MAC address like 52:54:00:12:34:56")
    return SeedNic(
        str(n["mac"]).lower().replace("-", ":"),
        tuple(str(ip) for ip in n.get("ips", ())),
        bool(n.get("primary", False)),
    )


def parse_seed(data: Any, origin: str = "seed") -> Seed:
    top = _fields(origin, data or {}, {"account", "source_servers", "recovery_instances"}, set())
    servers: list[SeedSourceServer] = []
    for i, raw in enumerate(top.get("source_servers") or []):
        where = f"{origin}: source_servers[{i}]"
        s = _fields(
            where,
            raw,
            {"id", "hostname", "fqdn", "vmware_uuid", "aws_instance_id", "os", "ram_bytes", "cpus", "nics", "disks"},
            {"id", "hostname"},
        )
        if not SOURCE_SERVER_RE.match(str(s["id"])):
            raise SeedError(f"{where}.id: {s['id']!r} must look like s- followed by 17 letters/digits")
        nics = [_nic(f"{where}.nics[{j}]", n) for j, n in enumerate(s.get("nics") or [])]
        if nics and not any(n.primary for n in nics):
            nics[0] = SeedNic(nics[0].mac, nics[0].ips, True)
        servers.append(
            SeedSourceServer(
                id=s["id"],
                hostname=str(s["hostname"]),
                fqdn=s.get("fqdn"),
                vmware_uuid=s.get("vmware_uuid"),
                aws_instance_id=s.get("aws_instance_id"),
                os=str(s.get("os", "Linux")),
                ram_bytes=int(s.get("ram_bytes", 4 * 1024**3)),
                cpus=int(s.get("cpus", 2)),
                nics=tuple(nics),
                disks=tuple(_disk(f"{where}.disks[{j}]", d) for j, d in enumerate(s.get("disks") or [])),
            )
        )
    known = {s.id for s in servers}
    if len(known) != len(servers):
        raise SeedError(f"{origin}: source server ids must be unique")
    instances: list[SeedRecoveryInstance] = []
    for i, raw in enumerate(top.get("recovery_instances") or []):
        where = f"{origin}: recovery_instances[{i}]"
        r = _fields(
            where,
            raw,
            {
                "id",
                "source_server",
                "ec2_state",
                "private_ip",
                "public_ip",
                "mac",
                "is_drill",
                "origin_environment",
                "disks",
                "use_private_ip",
                "bandwidth_mbps",
            },
            {"id", "source_server"},
        )
        if not INSTANCE_RE.match(str(r["id"])):
            raise SeedError(f"{where}.id: {r['id']!r} must look like i- followed by 8 to 17 hex digits")
        if r["source_server"] not in known:
            raise SeedError(f"{where}.source_server: {r['source_server']!r} is not one of the source_servers")
        state = str(r.get("ec2_state", "RUNNING"))
        if state not in EC2_STATES:
            raise SeedError(f"{where}.ec2_state: {state!r} is not one of {', '.join(EC2_STATES)}")
        instances.append(
            SeedRecoveryInstance(
                id=r["id"],
                source_server=r["source_server"],
                ec2_state=state,
                private_ip=str(r.get("private_ip", "10.0.0.10")),
                public_ip=r.get("public_ip"),
                mac=str(r.get("mac", f"02:00:00:00:{i // 256:02x}:{i % 256:02x}")),
                is_drill=bool(r.get("is_drill")),
                origin_environment=str(r.get("origin_environment", "ON_PREMISES")),
                disks=tuple(_disk(f"{where}.disks[{j}]", d) for j, d in enumerate(r.get("disks") or [])),
                use_private_ip=bool(r.get("use_private_ip", False)),
                bandwidth_mbps=int(r.get("bandwidth_mbps", 0)),
            )
        )
    if len({r.id for r in instances}) != len(instances):
        raise SeedError(f"{origin}: recovery instance ids must be unique")
    return Seed(
        account=str(top.get("account", "123456789012")),
        source_servers=tuple(servers),
        recovery_instances=tuple(instances),
    )


def read_yaml(path: Path, what: str, error: type[ValueError]) -> Any:
    """The YAML document in `path` (`what` names it in the message); `error` for an unreadable or invalid file."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise error(f"{path} is not valid YAML: {exc}") from None


def load_seed(path: Path) -> Seed:
    return parse_seed(read_yaml(path, "seed file", SeedError), str(path))
