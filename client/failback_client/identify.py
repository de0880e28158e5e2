"""Guide steps 8-9: find the recovery instance to fail back from.

On the original server, this machine's identity (physical NIC MACs, the DMI system UUID read as a VMware
UUID) matches a source server through DescribeSourceServers' hardwareId filter, and that server's recovery
instance is chosen automatically. Otherwise the admin picks from the recovery instances whose volumes fit
this machine's disks.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from failback_client.api import DrsApi
from failback_client.console import Console
from failback_client.devices import LocalDisk, _read, _under, human_size
from failback_client.errors import ClientError, IdentifyError, UsageError
from failback_client.mapping import RecoveryDisk, fit_problem
from failback_client.settings import RECOVERY_INSTANCE_ID_RE, missing_error

log = logging.getLogger(__name__)

EC2_ID_RE = re.compile(r"^i-[0-9a-f]{8}([0-9a-f]{9})?$")
VIRTUAL_NET_PREFIXES = ("lo", "veth", "docker", "br-", "virbr", "tun", "tap", "vxlan", "bond", "team", "wg")


@dataclass
class LocalIdentity:
    macs: list[str] = field(default_factory=list)
    system_uuid: str | None = None
    hostname: str = ""
    ec2_instance_id: str | None = None  # on EC2 (Nitro): the DMI board asset tag is the instance id

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
        return [*self.macs, *self.vmware_uuids(), *([self.ec2_instance_id] if self.ec2_instance_id else [])]


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
    asset_tag = _read(_under(root, "/sys/class/dmi/id/board_asset_tag")).lower()
    return LocalIdentity(
        macs=list(dict.fromkeys(macs)),
        system_uuid=product_uuid,
        hostname=hostname,
        ec2_instance_id=asset_tag if EC2_ID_RE.match(asset_tag) else None,
    )


def kind_of(hardware_id: str) -> str:
    return "MAC address" if ":" in hardware_id else "EC2 instance id" if hardware_id.startswith("i-") else "VMware UUID"


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


def by_hardware(
    api: DrsApi, identity: LocalIdentity, tried: list[str] | None = None
) -> tuple[dict[str, Any], str] | None:
    """The recovery instance of the source server this machine is, with the reason; None when not found.
    `tried` receives one line per hardware id looked up, and why nothing matched."""
    tried = [] if tried is None else tried
    found: dict[str, tuple[dict[str, Any], str]] = {}
    if not identity.hardware_ids():
        tried.append("this machine shows no physical NIC MAC address, no DMI system UUID and no EC2 instance id")
    for hwid in identity.hardware_ids():
        servers = api.source_servers_by_hardware_id(hwid)
        tried.append(
            f"{kind_of(hwid)} {hwid}: "
            + (", ".join(s["sourceServerID"] for s in servers) if servers else "no source server")
        )
        for server in servers:
            found.setdefault(server["sourceServerID"], (server, f"{kind_of(hwid)} {hwid}"))
    candidates: dict[str, tuple[dict[str, Any], str]] = {}
    for server_id, (server, why) in found.items():
        ri_id = server.get("recoveryInstanceId")
        instances = api.recovery_instances([ri_id]) if ri_id else []
        if not instances:
            instances = [ri for ri in api.recovery_instances() if ri.get("sourceServerID") == server_id]
        for ri in instances:
            hostname = server.get("sourceProperties", {}).get("identificationHints", {}).get("hostname", "")
            label = f"{server_id} ({hostname})" if hostname else server_id
            candidates.setdefault(
                ri["recoveryInstanceID"],
                (
                    ri,
                    f"this machine's {why} belongs to source server {label}, whose recovery instance is "
                    f"{ri['recoveryInstanceID']}",
                ),
            )
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    if len(candidates) > 1:
        log.info("this machine matches several recovery instances: %s", ", ".join(candidates))
        tried.append(f"it matches several recovery instances ({', '.join(candidates)}): choose one")
    elif found:
        tried.append(f"source server(s) {', '.join(found)} matched but have no recovery instance")
    else:
        tried.append(f"source servers in {api.settings.region}: {seen_servers(api)}")
    return None


def seen_servers(api: DrsApi, limit: int = 10) -> str:
    """The region's source servers and the hardware ids DRS knows them by (what would have matched)."""
    try:
        servers = api.source_servers()
    except ClientError as e:
        return f"could not be listed ({e})"
    if not servers:
        return "none"
    shown = []
    for server in servers[:limit]:
        props = server.get("sourceProperties", {})
        hints = props.get("identificationHints", {})
        ids = [n["macAddress"] for n in props.get("networkInterfaces", []) if n.get("macAddress")]
        ids += [hints[k] for k in ("vmWareUuid", "awsInstanceID") if hints.get(k)]
        name = f" {hints['hostname']}" if hints.get("hostname") else ""
        shown.append(f"{server['sourceServerID']}{name} ({', '.join(ids) or 'no hardware id'})")
    more = f" and {len(servers) - limit} more" if len(servers) > limit else ""
    return "; ".join(shown) + more


def choose(
    api: DrsApi,
    console: Console,
    identity: LocalIdentity,
    local: list[LocalDisk],
    *,
    wanted_id: str | None,
    no_prompt: bool,
) -> Choice:
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
                unfit = fit_problem(recovery_disks(found[0]), local)
                if unfit:
                    raise IdentifyError(f"Recovery instance {wanted_id} cannot fail back to this machine: {unfit}")
                return Choice(found[0], reason, original_server=False)
            problem = f"recovery instance {wanted_id} was not found in {api.settings.region}"
            if no_prompt:
                raise IdentifyError(f"The {problem}: check --recovery-instance-id and --region")
            console.error(f"The {problem}; choose one from the list instead.")
    else:
        tried: list[str] = []
        hit = by_hardware(api, identity, tried)
        if hit is not None:
            instance, reason = hit
            unfit = fit_problem(recovery_disks(instance), local)
            if unfit is None:
                return Choice(instance, reason, original_server=True)
            tried.append(f"{reason}, but it cannot fail back here: {unfit}")
            console.warn(tried[-1])
        why = "; ".join(tried)
        if not no_prompt:
            console.info(f"This machine was not identified as a source server: tried {why}.")
        else:
            raise missing_error(
                "recovery_instance_id", f"the recovery instance could not be chosen automatically (tried {why}); it"
            )
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
        rows.append(
            (str(n), ri["recoveryInstanceID"], hostname_of(ri), ri.get("sourceServerID", "-"), vols, state_of(ri))
        )
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
            console.error(
                f"{answer!r} is neither a number from 1 to {len(fitting)} nor a listed recovery instance "
                "ID. Please try again."
            )
