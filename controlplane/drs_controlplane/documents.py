"""Seed entries → the API documents DRS returns (SourceServer, RecoveryInstance), and time formatting."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from failback_client.drs_model import FAILBACK_INITIATION_STEPS

from drs_controlplane.seed import Seed, SeedRecoveryInstance, SeedSourceServer
from drs_controlplane.store import RecoveryInstanceRecord, Store

AGENT_PORT = 1500
FAILBACK_STEPS = FAILBACK_INITIATION_STEPS


def iso(moment: datetime) -> str:
    """The model's ISO8601DatetimeString: 2026-11-25T20:00:00.123456Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _hints(hostname: str, fqdn: str | None, vmware_uuid: str | None, aws_id: str | None) -> dict[str, str]:
    hints = {"hostname": hostname, "fqdn": fqdn, "vmWareUuid": vmware_uuid, "awsInstanceID": aws_id}
    return {k: v for k, v in hints.items() if v}


def source_server_document(
    server: SeedSourceServer, account: str, region: str, now: datetime, recovery_instance_id: str | None
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "sourceServerID": server.id,
        "arn": f"arn:aws:drs:{region}:{account}:source-server/{server.id}",
        "tags": {},
        "lifeCycle": {"addedToServiceDateTime": iso(now)},
        "dataReplicationInfo": {"dataReplicationState": "STOPPED"},
        "sourceProperties": {
            "lastUpdatedDateTime": iso(now),
            "identificationHints": _hints(server.hostname, server.fqdn, server.vmware_uuid, server.aws_instance_id),
            "networkInterfaces": [
                {"macAddress": n.mac, "ips": list(n.ips), "isPrimary": n.primary} for n in server.nics
            ],
            "disks": [{"deviceName": d.device, "bytes": d.bytes} for d in server.disks],
            "cpus": [{"cores": server.cpus, "modelName": "Intel(R) Xeon(R) CPU"}],
            "ramBytes": server.ram_bytes,
            "os": {"fullString": server.os},
        },
        "replicationDirection": "FAILOVER",
    }
    if recovery_instance_id:
        doc["recoveryInstanceId"] = recovery_instance_id
    return doc


def recovery_instance_record(
    instance: SeedRecoveryInstance, server: SeedSourceServer, account: str, region: str, now: datetime
) -> RecoveryInstanceRecord:
    if instance.disks:
        disks = list(instance.disks)
        source_devices = [d.source_device for d in disks]
    else:  # the recovered EC2 instance sees the source disks as NVMe volumes, in order
        disks = [type(d)(f"/dev/nvme{i}n1", d.bytes) for i, d in enumerate(server.disks)]
        source_devices = [d.device for d in server.disks]
    for i, device in enumerate(source_devices):
        if device is None and i < len(server.disks):
            source_devices[i] = server.disks[i].device
    ips = [instance.private_ip] + ([instance.public_ip] if instance.public_ip else [])
    doc: dict[str, Any] = {
        "ec2InstanceID": instance.id,
        "ec2InstanceState": instance.ec2_state,
        "recoveryInstanceID": instance.id,
        "sourceServerID": server.id,
        "arn": f"arn:aws:drs:{region}:{account}:recovery-instance/{instance.id}",
        "tags": {},
        "isDrill": instance.is_drill,
        "originEnvironment": instance.origin_environment,
        "failback": {"state": "FAILBACK_NOT_STARTED", "failbackToOriginalServer": False},
        "dataReplicationInfo": {"dataReplicationState": "NOT_STARTED", "replicatedDisks": []},
        "recoveryInstanceProperties": {
            "lastUpdatedDateTime": iso(now),
            "identificationHints": _hints(server.hostname, server.fqdn, None, instance.id),
            "networkInterfaces": [{"macAddress": instance.mac.lower(), "ips": ips, "isPrimary": True}],
            "disks": [
                {"internalDeviceName": d.device, "bytes": d.bytes, "ebsVolumeID": _volume_id(instance.id, d.device)}
                for i, d in enumerate(disks)
            ],
            "cpus": [{"cores": server.cpus, "modelName": "Intel(R) Xeon(R) Platinum"}],
            "ramBytes": server.ram_bytes,
            "os": {"fullString": server.os},
        },
    }
    internal = {
        "privateIP": instance.private_ip,
        "publicIP": instance.public_ip,
        "sourceDevices": {d.device: src for d, src in zip(disks, source_devices, strict=True) if src},
        "replicationConfiguration": {
            "name": "",
            "bandwidthThrottling": instance.bandwidth_mbps,
            "usePrivateIP": instance.use_private_ip,
            "internetProtocol": "IPV4",
        },
        "failbackClientID": None,
        "launchRequested": False,
        "stopped": False,
        "completed": False,
    }
    return RecoveryInstanceRecord(doc, internal)


def _volume_id(instance_id: str, device: str) -> str:
    # 8 hex digits: the model caps EbsVolumeID at 19 characters, too short for the 17-digit form.
    return "vol-" + hashlib.sha256(f"{instance_id}{device}".encode()).hexdigest()[:8]


def apply_seed(store: Store, seed: Seed, region: str, now: datetime) -> None:
    """Fill an empty state database from the seed (an existing state is left as it is)."""
    with store.transaction():
        if store.get("seeded"):
            return
        servers = {s.id: s for s in seed.source_servers}
        by_server = {r.source_server: r.id for r in seed.recovery_instances}
        for server in seed.source_servers:
            store.save_source_server(
                source_server_document(server, seed.account, region, now, by_server.get(server.id))
            )
        for instance in seed.recovery_instances:
            store.save_recovery_instance(
                recovery_instance_record(instance, servers[instance.source_server], seed.account, region, now)
            )
        store.put("account", seed.account)
        store.put("region", region)
        store.put("seeded", iso(now))
