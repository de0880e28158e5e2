"""Guide steps 8-9: find the recovery instance to fail back from.

On the original server, this machine's identity (physical NIC MACs, the DMI system UUID read as a VMware
UUID) matches a source server through DescribeSourceServers' hardwareId filter, and that server's recovery
instance is chosen automatically. Otherwise the admin picks from the recovery instances whose volumes fit
this machine's disks.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from failback_client.api import DrsApi
from failback_client.console import Console
from failback_client.devices import LocalDisk, _read, _under, human_size
from failback_client.errors import IdentifyError, UsageError
from failback_client.mapping import RecoveryDisk, fit_problem
from failback_client.settings import RECOVERY_INSTANCE_ID_RE, missing_error

log = logging.getLogger(__name__)

VIRTUAL_NET_PREFIXES = ("lo", "veth", "docker", "br-", "virbr", "tun", "tap", "vxlan", "bond", "team", "wg")


@dataclass
class LocalIdentity:
    macs: list[str] = field(default_factory=list)
    system_uuid: str | None = None
    hostname: str = ""

    def vmware_uuids(self) -> list[str]:
        """The DMI UUID as read, and with its first three fields byte-swapped: SMBIOS before 2.6 and VMware
        disagree on their byte order, so the hardware id DRS stored may be either."""
        if not self.system_uuid:
            return []
        try:
            u = uuid.UUID(self.system_uuid)
        except ValueError:
            return []
        swapped = uuid.UUID(bytes_le=u.bytes)
        forms = [str(u), str(swapped)]
        return list(dict.fromkeys(forms))

    def hardware_ids(self) -> list[str]:
        return [*self.macs, *self.vmware_uuids()]


def local_identity(root: str = "/") -> LocalIdentity:
    """Physical NICs (those with a `device` link in sysfs) and the DMI product UUID."""
    macs: list[str] = []
    net = _under(root, "/sys/class/net")
    try:
        names = sorted(os.listdir(net))
    except OSError:
        names = []
    for name in names:
        if name.startswith(VIRTUAL_NET_PREFIXES) or not os.path.exists(os.path.join(net, name, "device")):
            continue
        mac = _read(os.path.join(net, name, "address")).lower()
        if len(mac) == 17 and mac != "00:00:00:00:00:00":
            macs.append(mac)
    product_uuid = _read(_under(root, "/sys/class/dmi/id/product_uuid")).lower() or None
    hostname = _read(_under(root, "/etc/hostname")) or os.uname().nodename
    return LocalIdentity(macs=list(dict.fromkeys(macs)), system_uuid=product_uuid, hostname=hostname)


def recovery_disks(instance: dict[str, Any]) -> list[RecoveryDisk]:
    disks = instance.get("recoveryInstanceProperties", {}).get("disks", [])
    return [RecoveryDisk(d.get("internalDeviceName", "?"), int(d.get("bytes", 0))) for d in disks]


def hostname_of(instance: dict[str, Any]) -> str:
    hints = instance.get("recoveryInstanceProperties", {}).get("identificationHints", {})
    return hints.get("hostname") or hints.get("fqdn") or "-"


def state_of(instance: dict[str, Any]) -> str:
    failback = instance.get("failback", {}).get("state", "")
    ec2 = instance.get("ec2InstanceState", "")
    drill = "drill" if instance.get("isDrill") else ""
    return " / ".join(s for s in (failback.removeprefix("FAILBACK_"), ec2, drill) if s) or "-"


@dataclass
class Choice:
    instance: dict[str, Any]
    reason: str
    original_server: bool  # identified as the original source server (auto-map applies)

    @property
    def id(self) -> str:
        return self.instance["recoveryInstanceID"]


def by_hardware(api: DrsApi, identity: LocalIdentity) -> tuple[dict[str, Any], str] | None:
    """The recovery instance of the source server this machine is, with the reason; None when not found."""
    found: dict[str, tuple[dict[str, Any], str]] = {}
    for hwid in identity.hardware_ids():
        for server in api.source_servers_by_hardware_id(hwid):
            kind = "MAC address" if ":" in hwid else "VMware UUID"
            found.setdefault(server["sourceServerID"], (server, f"{kind} {hwid}"))
    candidates: dict[str, tuple[dict[str, Any], str]] = {}
    for server_id, (server, why) in found.items():
        ri_id = server.get("recoveryInstanceId")
        instances = api.recovery_instances([ri_id]) if ri_id else []
        if not instances:
            instances = [ri for ri in api.recovery_instances() if ri.get("sourceServerID") == server_id]
        for ri in instances:
            hostname = server.get("sourceProperties", {}).get("identificationHints", {}).get("hostname", "")
            label = f"{server_id} ({hostname})" if hostname else server_id
            candidates.setdefault(ri["recoveryInstanceID"], (
                ri, f"this machine's {why} belongs to source server {label}, whose recovery instance is "
                    f"{ri['recoveryInstanceID']}"))
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    if len(candidates) > 1:
        log.info("this machine matches several recovery instances: %s", ", ".join(candidates))
    return None


def choose(api: DrsApi, console: Console, identity: LocalIdentity, local: list[LocalDisk], *,
           wanted_id: str | None, no_prompt: bool) -> Choice:
    """Steps 8-9: --recovery-instance-id, else automatic by hardware id, else pick from a list."""
    if wanted_id:
        if not RECOVERY_INSTANCE_ID_RE.match(wanted_id):
            problem = f"--recovery-instance-id {wanted_id!r} is not a recovery instance ID (i- and 8+ hex digits)"
            if no_prompt:
                raise UsageError(problem)
            console.error(problem)
        else:
            found = api.recovery_instances([wanted_id])
            if found:
                reason = f"{wanted_id} was given with --recovery-instance-id / RECOVERY_INSTANCE_ID"
                problem = fit_problem(recovery_disks(found[0]), local)
                if problem:
                    raise IdentifyError(f"Recovery instance {wanted_id} cannot fail back to this machine: {problem}")
                return Choice(found[0], reason, original_server=False)
            problem = f"recovery instance {wanted_id} was not found in {api.settings.region}"
            if no_prompt:
                raise IdentifyError(f"The {problem}: check --recovery-instance-id and --region")
            console.error(f"The {problem}; choose one from the list instead.")
    else:
        hit = by_hardware(api, identity)
        if hit is not None:
            instance, reason = hit
            problem = fit_problem(recovery_disks(instance), local)
            if problem is None:
                return Choice(instance, reason, original_server=True)
            console.warn(f"{reason}, but it cannot fail back here: {problem}")
    if no_prompt:
        raise missing_error("recovery_instance_id", "the recovery instance could not be chosen automatically; it")
    return pick(api, console, local)


def pick(api: DrsApi, console: Console, local: list[LocalDisk]) -> Choice:
    """Step 9: a numbered table of the recovery instances that fit; choose by number or full ID."""
    instances = api.recovery_instances()
    fitting: list[dict[str, Any]] = []
    refused: list[str] = []
    for ri in instances:
        problem = fit_problem(recovery_disks(ri), local)
        if problem is None:
            fitting.append(ri)
        else:
            refused.append(f"{ri['recoveryInstanceID']}: {problem}")
    if not fitting:
        if not instances:
            raise IdentifyError(f"There are no recovery instances in {api.settings.region}: check the region")
        raise IdentifyError("No recovery instance fits this machine's disks: " + "; ".join(refused))
    rows = []
    for n, ri in enumerate(fitting, 1):
        vols = ", ".join(f"{d.name} {human_size(d.size_bytes)}" for d in recovery_disks(ri))
        rows.append((str(n), ri["recoveryInstanceID"], hostname_of(ri), ri.get("sourceServerID", "-"), vols,
                     state_of(ri)))
    console.heading("Recovery instances that fit this machine")
    console.table(("#", "Recovery instance", "Hostname", "Source server", "Volumes", "State"), rows)
    if refused:
        console.info(f"Not listed ({len(refused)}), their volumes do not fit: " + "; ".join(refused))
    by_id = {ri["recoveryInstanceID"].lower(): ri for ri in fitting}
    refused_ids = {r.split(":", 1)[0].lower(): r for r in refused}
    while True:
        answer = console.ask(f"Choose the recovery instance to fail back from (1-{len(fitting)} or its ID): ").strip()
        if answer.isdigit() and 1 <= int(answer) <= len(fitting):
            ri = fitting[int(answer) - 1]
            return Choice(ri, f"chosen from the list (#{answer})", original_server=False)
        if answer.lower() in by_id:
            ri = by_id[answer.lower()]
            return Choice(ri, "chosen from the list by ID", original_server=False)
        if answer.lower() in refused_ids:
            console.error(f"{refused_ids[answer.lower()]}. Please choose another.")
        elif not answer:
            console.error("Please enter a number from the list or a full recovery instance ID.")
        else:
            console.error(f"{answer!r} is neither a number from 1 to {len(fitting)} nor a listed recovery instance "
                          "ID. Please try again.")
