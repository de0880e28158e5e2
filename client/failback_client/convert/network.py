"""Network configuration pinned to the cloud NIC's MAC address is dropped; DHCP on any wired NIC (or the
admin's static settings) takes its place, in the target's own network stack: netplan, systemd-networkd,
ifupdown (Debian), ifcfg (Red Hat) or NetworkManager."""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from failback_client.convert.files import BACKUP_SUFFIX, Transaction
from failback_client.convert.model import StaticNetwork

log = logging.getLogger(__name__)

WIRED_GLOBS = ("en*", "eth*")
OUR_NETPLAN = "/etc/netplan/90-failback-wired.yaml"
OUR_NETWORKD = "/etc/systemd/network/90-failback-wired.network"
OUR_IFUPDOWN = "/etc/network/interfaces.d/90-failback-wired"
CLOUD_INIT_NET_OFF = "/etc/cloud/cloud.cfg.d/99-failback-disable-network-config.cfg"
_MAC_KEYS = ("macaddress", "permanentmacaddress")


# ---- netplan -------------------------------------------------------------------------------------------------


def netplan_unpin(text: str) -> tuple[str | None, list[str]]:
    """Drop ethernets entries matched by MAC address. (new text or None if unchanged, dropped ids)."""
    data = yaml.safe_load(text) or {}
    eths = (data.get("network") or {}).get("ethernets") or {}
    dropped = [
        name
        for name, conf in eths.items()
        if isinstance(conf, dict)
        and isinstance(conf.get("match"), dict)
        and any(k in conf["match"] for k in ("macaddress", "permanent-macaddress"))
    ]
    if not dropped:
        return None, []
    for name in dropped:
        del eths[name]
    if not eths:
        del data["network"]["ethernets"]
    return yaml.safe_dump(data, default_flow_style=False, sort_keys=False), dropped


def netplan_wired(static: StaticNetwork | None, nic: str | None) -> str:
    eths: dict[str, dict] = {}
    if static is None:
        for glob in WIRED_GLOBS:
            eths[f"failback-wired-{glob.rstrip('*')}"] = {"match": {"name": glob}, "dhcp4": True}
    else:
        conf: dict = {"addresses": [static.address], "dhcp4": False}
        if static.gateway:
            conf["routes"] = [{"to": "default", "via": static.gateway}]
        if static.dns:
            conf["nameservers"] = {"addresses": list(static.dns)}
        eths[nic or "eth0"] = conf
    body = yaml.safe_dump({"network": {"version": 2, "ethernets": eths}}, default_flow_style=False, sort_keys=False)
    return "# Written by failback conversion: the local wired NIC(s).\n" + body


# ---- systemd-networkd / .link / udev rules -------------------------------------------------------------------


def ini_match_keys(text: str) -> dict[str, list[str]]:
    """Keys of the [Match] sections of a systemd .network/.link file (lower-case key -> values)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]").strip().lower()
            continue
        if section == "match" and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k.strip().lower(), []).append(v.strip())
    return out


def is_mac_pinned_unit(text: str) -> bool:
    keys = ini_match_keys(text)
    return any(keys.get(k) for k in _MAC_KEYS)


def networkd_wired(static: StaticNetwork | None, nic: str | None) -> str:
    lines = ["# Written by failback conversion: the local wired NIC(s).", "[Match]"]
    if static is None:
        lines += [f"Name={' '.join(WIRED_GLOBS)}", "", "[Network]", "DHCP=yes"]
    else:
        lines += [f"Name={nic or ' '.join(WIRED_GLOBS)}", "", "[Network]", f"Address={static.address}"]
        if static.gateway:
            lines.append(f"Gateway={static.gateway}")
        lines += [f"DNS={d}" for d in static.dns]
    return "\n".join(lines) + "\n"


_UDEV_MAC_RE = re.compile(r"ATTRS?\{address\}\s*==", re.I)
_UDEV_NAME_RE = re.compile(r"\bNAME\s*:?=\s*\"([^\"]+)\"")


def udev_mac_names(text: str) -> list[str] | None:
    """Interface names a udev rules file gives by MAC address; None when it has no such rule."""
    names = [
        m.group(1)
        for line in text.splitlines()
        if _UDEV_MAC_RE.search(line) and not line.lstrip().startswith("#")
        for m in _UDEV_NAME_RE.finditer(line)
    ]
    return names or None


# ---- ifupdown ------------------------------------------------------------------------------------------------

_STANZA_START = ("iface", "auto", "allow-", "mapping", "source", "source-directory", "rename")
CLOUD_INIT_MARKERS = ("cloud-init", "generated from information provided by the datasource")


@dataclass
class IfupdownResult:
    text: str
    disabled: list[str] = field(default_factory=list)  # interface names whose stanzas were commented out


def ifupdown_unpin(text: str, cloud_names: set[str], *, whole_file_is_cloud: bool = False) -> IfupdownResult:
    """Comment out the stanzas (auto/allow-*/iface + options) of interfaces pinned by `hwaddress`, named in
    `cloud_names` (renamed by MAC rules on the instance), or all non-loopback ones of a cloud-init file."""
    lines = text.splitlines(keepends=True)
    # First pass: which interfaces are pinned.
    pinned = set(cloud_names)
    current = None
    for line in lines:
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "iface" and len(words) > 1:
            current = words[1]
            if whole_file_is_cloud and current != "lo":
                pinned.add(current)
        elif words[0].startswith(_STANZA_START):
            current = None
        elif current and words[0] == "hwaddress":
            pinned.add(current)
    pinned.discard("lo")
    out, disabled = [], []
    in_stanza = False
    for line in lines:
        words = line.split()
        if words and not words[0].startswith("#") and words[0].startswith(_STANZA_START):
            in_stanza = False
            if words[0] == "iface" and len(words) > 1 and words[1] in pinned:
                in_stanza = True
                if words[1] not in disabled:
                    disabled.append(words[1])
            elif (words[0] == "auto" or words[0].startswith("allow-")) and any(w in pinned for w in words[1:]):
                kept = [w for w in words[1:] if w not in pinned]
                out.append("# failback: " + line if line.endswith("\n") else "# failback: " + line + "\n")
                if kept:
                    out.append(f"{words[0]} {' '.join(kept)}\n")
                continue
        if in_stanza and line.strip():
            out.append("# failback: " + line)
        else:
            out.append(line)
    return IfupdownResult("".join(out), disabled)


def ifupdown_wired(static: StaticNetwork | None, nics: list[str]) -> str:
    lines = ["# Written by failback conversion: the local wired NIC(s) this machine has."]
    for i, nic in enumerate(nics):
        lines.append(f"allow-hotplug {nic}")
        if static is not None and i == 0:
            iface = ipaddress.ip_interface(static.address)
            lines += [f"iface {nic} inet static", f"    address {static.address}"]
            if static.gateway:
                lines.append(f"    gateway {static.gateway}")
            if static.dns:
                lines.append(f"    dns-nameservers {' '.join(static.dns)}")
            log.debug("static %s on %s", iface, nic)
        else:
            lines.append(f"iface {nic} inet dhcp")
        lines.append("")
    return "\n".join(lines)


# ---- ifcfg (Red Hat) and NetworkManager keyfiles --------------------------------------------------------------


def drop_keys(text: str, pattern: re.Pattern[str]) -> tuple[str, int]:
    kept, dropped = [], 0
    for line in text.splitlines(keepends=True):
        if pattern.match(line.strip()):
            dropped += 1
            continue
        kept.append(line)
    return "".join(kept), dropped


_IFCFG_MAC = re.compile(r"^(HWADDR|MACADDR)=", re.I)
_NM_MAC = re.compile(r"^mac-address=", re.I)


# ---- the step ------------------------------------------------------------------------------------------------


def _files(tx: Transaction, directory: str, pattern: str) -> list[str]:
    d = tx.host(directory)
    if not d.is_dir():
        return []
    return sorted(
        f"{directory}/{p.name}"
        for p in d.iterdir()
        if fnmatch.fnmatch(p.name, pattern) and not p.name.endswith(BACKUP_SUFFIX) and (p.is_file() or p.is_symlink())
    )


def _enabled(root: Path, unit: str) -> bool:
    return any(root.glob(f"etc/systemd/system/*.wants/{unit}"))


def convert_network(tx: Transaction, *, static: StaticNetwork | None, nics: list[str]) -> list[str]:
    """Unpin and add the local configuration. Returns notes for the report."""
    root = tx.root
    notes: list[str] = []
    renamed: set[str] = set()
    # MAC-based renames (.link files, udev rules): the names they gave do not exist here.
    for rel in _files(tx, "/etc/systemd/network", "*.link"):
        text = tx.read(rel) or ""
        if is_mac_pinned_unit(text):
            renamed |= {
                line.split("=", 1)[1].strip() for line in text.splitlines() if line.strip().lower().startswith("name=")
            }
            tx.remove(rel, "interface naming pinned to the cloud NIC's MAC address")
    for rel in _files(tx, "/etc/udev/rules.d", "*.rules"):
        names = udev_mac_names(tx.read(rel) or "")
        if names is not None:
            renamed |= set(names)
            tx.remove(rel, "udev rule naming interfaces by the cloud NIC's MAC address")
    for rel in _files(tx, "/etc/systemd/network", "*.network"):
        if rel != OUR_NETWORKD and is_mac_pinned_unit(tx.read(rel) or ""):
            tx.remove(rel, "systemd-networkd configuration pinned to the cloud NIC's MAC address")
    netplan_files = [f for f in _files(tx, "/etc/netplan", "*.yaml") if f != OUR_NETPLAN]
    for rel in netplan_files:
        try:
            new, dropped = netplan_unpin(tx.read(rel) or "")
        except yaml.YAMLError as exc:
            notes.append(f"{rel}: not valid YAML, left as it is ({exc})")
            continue
        if new is not None:
            tx.write(rel, new, f"dropped ethernets {', '.join(dropped)} matched by the cloud NIC's MAC address")
    if_files = [
        f
        for f in ["/etc/network/interfaces", *_files(tx, "/etc/network/interfaces.d", "*")]
        if f != OUR_IFUPDOWN and tx.read(f) is not None
    ]
    for rel in if_files:
        text = tx.read(rel) or ""
        cloud = (
            rel.endswith("50-cloud-init")
            or rel.endswith("50-cloud-init.cfg")
            or any(m in text[:500] for m in CLOUD_INIT_MARKERS)
        )
        result = ifupdown_unpin(text, renamed, whole_file_is_cloud=cloud)
        if result.disabled:
            tx.write(rel, result.text, f"commented out cloud NIC stanzas: {', '.join(result.disabled)}")
    for rel in _files(tx, "/etc/sysconfig/network-scripts", "ifcfg-*"):
        new, n = drop_keys(tx.read(rel) or "", _IFCFG_MAC)
        if n:
            tx.write(rel, new, "dropped HWADDR/MACADDR of the cloud NIC")
    for rel in _files(tx, "/etc/NetworkManager/system-connections", "*"):
        new, n = drop_keys(tx.read(rel) or "", _NM_MAC)
        if n:
            tx.write(rel, new, "dropped mac-address of the cloud NIC")
    if (root / "etc/cloud").is_dir():
        tx.write(
            CLOUD_INIT_NET_OFF,
            "# Written by failback conversion: keep cloud-init from writing a MAC-pinned "
            "network configuration again.\nnetwork: {config: disabled}\n",
            "cloud-init network config off",
        )

    # The local configuration, in the stack the target uses.
    nic = nics[0] if nics else None
    what = "static " + static.address if static else "DHCP on any wired NIC"
    if netplan_files or (root / "usr/sbin/netplan").exists():
        tx.write(OUR_NETPLAN, netplan_wired(static, nic), f"netplan: {what}")
        (root / OUR_NETPLAN.lstrip("/")).chmod(0o600)  # netplan warns about world-readable files
    elif _enabled(root, "systemd-networkd.service"):
        tx.write(OUR_NETWORKD, networkd_wired(static, nic), f"systemd-networkd: {what}")
    elif if_files and any((root / p).exists() for p in ("sbin/ifup", "usr/sbin/ifup")):
        if not nics:
            notes.append("ifupdown: this machine shows no wired NIC; no interface configuration added")
        else:
            main = tx.read("/etc/network/interfaces") or ""
            if not re.search(r"^\s*source(-directory)?\s+/etc/network/interfaces\.d", main, re.M):
                tx.write(
                    "/etc/network/interfaces",
                    main.rstrip("\n") + "\n\nsource /etc/network/interfaces.d/*\n",
                    "include interfaces.d",
                )
            tx.write(OUR_IFUPDOWN, ifupdown_wired(static, nics), f"ifupdown: {what} ({', '.join(nics)})")
    elif any((root / p).exists() for p in ("usr/sbin/NetworkManager", "usr/bin/NetworkManager")):
        if static:
            notes.append(
                "NetworkManager: set the static address after the first boot (it uses DHCP on wired NICs "
                "without a connection profile)"
            )
    else:
        notes.append("no known network configuration system found on the target: network left as it is")
    return notes
