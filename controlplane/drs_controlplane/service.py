"""What each operation does to the state: the DRS failback behaviour, as far as the failback client sees it.

Handlers take the validated request (a dict shaped like the operation's input) and return a dict shaped
like its output; the HTTP layer validates both against the model.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import string
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from drs_controlplane import errors
from drs_controlplane.certs import CsrError, agent_common_name, sign_csr
from drs_controlplane.documents import AGENT_PORT, FAILBACK_STEPS, iso
from drs_controlplane.store import RecoveryInstanceRecord, Store

Handler = Callable[[dict[str, Any]], dict[str, Any]]
RI_TYPE = "RECOVERY_INSTANCE"
GIB = 1024**3
DEFAULT_PAGE = 1000
NOT_SEEN = "FAILBACK_CLIENT_NOT_SEEN"
DEFAULT_NOT_SEEN_AFTER = timedelta(minutes=5)
_ALNUM = string.ascii_lowercase + string.digits


def _random_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(17))


def normalize_hardware_id(value: str) -> str:
    """MACs in any case/separator, VMware UUIDs with or without dashes, EC2 ids: one comparable form."""
    return value.strip().lower().replace("-", "").replace(":", "")


class DrsService:
    def __init__(self, store: Store, region: str, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.region = region
        self.clock = clock
        # A linked failback client silent longer than this gets FAILBACK_CLIENT_NOT_SEEN (cleared when it calls).
        self.client_not_seen_after = DEFAULT_NOT_SEEN_AFTER
        self.handlers: dict[str, Handler] = {
            "DescribeRecoveryInstances": self.describe_recovery_instances,
            "DescribeSourceServers": self.describe_source_servers,
            "DescribeJobs": self.describe_jobs,
            "StartFailbackLaunch": self.start_failback_launch,
            "StopFailback": self.stop_failback,
            "GetFailbackReplicationConfiguration": self.get_failback_replication_configuration,
            "UpdateFailbackReplicationConfiguration": self.update_failback_replication_configuration,
            "AssociateFailbackClientToRecoveryInstanceForDrs": self.associate,
            "GetSuggestedFailbackClientDeviceMappingForDrs": self.suggest_mapping,
            "UpdateFailbackClientDeviceMappingForDrs": self.update_mapping,
            "IssueAgentCertificateForDrs": self.issue_agent_certificate,
            "UpdateAgentReplicationInfoForDrs": self.update_agent_replication_info,
            # The same update from the installed client (its service-role policy allows only this name).
            "UpdateAgentReplicationProcessStateForDrs": self.update_agent_replication_info,
            "UpdateFailbackClientLastSeenForDrs": self.update_last_seen,
            "GetFailbackCommandForDrs": self.get_failback_command,
            "GetFailbackLaunchRequestedForDrs": self.get_failback_launch_requested,
            "NotifyAgentConnectedForDrs": self.notify_agent_connected,
            "NotifyAgentDisconnectedForDrs": self.notify_agent_disconnected,
            "NotifyAgentReplicationProgressForDrs": self.notify_replication_progress,
            "NotifyConsistencyAttainedForDrs": self.notify_consistency_attained,
            "SendClientLogsForDrs": self.send_client_logs,
            "SendClientMetricsForDrs": self.send_client_metrics,
        }

    # helpers -----------------------------------------------------------------------------------
    def _now(self) -> str:
        return iso(self.clock())

    def _instance(self, instance_id: str) -> RecoveryInstanceRecord:
        record = self.store.recovery_instance(instance_id)
        if record is None:
            raise errors.not_found(RI_TYPE, instance_id, "Recovery instance")
        return record

    def _linked(self, p: dict[str, Any]) -> RecoveryInstanceRecord:
        """The recovery instance, if this failback client is the one linked to it (and mark it seen)."""
        record = self._instance(p["recoveryInstanceID"])
        linked = record.internal.get("failbackClientID")
        if linked != p["failbackClientID"]:
            why = "no failback client is linked to it" if not linked else "it is linked to another failback client"
            raise errors.conflict(
                RI_TYPE,
                record.id,
                f"Failback client {p['failbackClientID']} is not associated "
                f"with recovery instance {record.id}: {why}. Associate again.",
            )
        self._seen(record)
        return record

    def _seen(self, record: RecoveryInstanceRecord) -> None:
        record.doc["failback"]["failbackClientLastSeenByServiceDateTime"] = self._now()
        info = record.doc["dataReplicationInfo"]
        if (info.get("dataReplicationError") or {}).get("error") == NOT_SEEN:
            info.pop("dataReplicationError")

    def check_seen(self, record: RecoveryInstanceRecord) -> bool:
        """FAILBACK_CLIENT_NOT_SEEN for a linked, running failback client silent too long; True if it changed."""
        internal, info = record.internal, record.doc["dataReplicationInfo"]
        seen = record.doc.get("failback", {}).get("failbackClientLastSeenByServiceDateTime")
        if (
            not internal.get("failbackClientID")
            or internal.get("stopped")
            or internal.get("completed")
            or not seen
            or info.get("dataReplicationError")
        ):
            return False
        silent = self.clock() - datetime.fromisoformat(seen.replace("Z", "+00:00"))
        if silent <= self.client_not_seen_after:
            return False
        info["dataReplicationError"] = {
            "error": NOT_SEEN,
            "rawError": f"The failback client "
            f"{internal['failbackClientID']} was last seen {int(silent.total_seconds())} "
            "s ago",
        }
        self._save(record)
        return True

    def check_all_seen(self) -> None:
        for record in self.store.recovery_instances():
            self.check_seen(record)

    @staticmethod
    def _page(items: list[dict[str, Any]], p: dict[str, Any], operation: str) -> dict[str, Any]:
        start = 0
        if p.get("nextToken"):
            try:
                token = json.loads(base64.urlsafe_b64decode(p["nextToken"].encode()))
                start = int(token["offset"])
                if token["operation"] != operation or start < 0:
                    raise ValueError
            except (ValueError, KeyError, TypeError, binascii.Error):
                raise errors.validation(
                    "Invalid nextToken", [("nextToken", "not a token this API returned")], "other"
                ) from None
        size = p.get("maxResults") or DEFAULT_PAGE
        out: dict[str, Any] = {"items": items[start : start + size]}
        if start + size < len(items):
            out["nextToken"] = base64.urlsafe_b64encode(
                json.dumps({"operation": operation, "offset": start + size}).encode()
            ).decode()
        return out

    def _refresh_state(self, record: RecoveryInstanceRecord) -> str:
        """Failback state from what the service knows (the console's Failback state column)."""
        internal, info = record.internal, record.doc["dataReplicationInfo"]
        if internal.get("completed"):
            state = "FAILBACK_COMPLETED"
        elif internal.get("stopped") or not internal.get("failbackClientID"):
            state = "FAILBACK_NOT_STARTED"
        elif info.get("dataReplicationError"):
            state = "FAILBACK_ERROR"
        elif internal.get("launchRequested"):
            state = "FAILBACK_IN_PROGRESS"
        elif info.get("dataReplicationState") == "CONTINUOUS":
            state = "FAILBACK_READY_FOR_LAUNCH"
        else:
            state = "FAILBACK_IN_PROGRESS"
        record.doc["failback"]["state"] = state
        return state

    def _save(self, record: RecoveryInstanceRecord) -> str:
        state = self._refresh_state(record)
        self.store.save_recovery_instance(record)
        return state

    def _matches_source(self, record: RecoveryInstanceRecord, ident: dict[str, Any]) -> bool:
        server = self.store.source_server(record.doc["sourceServerID"])
        if server is None:
            return False
        return record.doc["sourceServerID"] in {
            s["sourceServerID"]
            for s in self._hardware_matches(
                [server],
                [*ident.get("macAddresses", []), ident.get("vmWareUuid") or "", ident.get("awsInstanceID") or ""],
            )
        }

    @staticmethod
    def _hardware_matches(servers: list[dict[str, Any]], hardware_ids: list[str]) -> list[dict[str, Any]]:
        wanted = {normalize_hardware_id(h) for h in hardware_ids if h and h.strip()}
        found = []
        for server in servers:
            props = server.get("sourceProperties", {})
            hints = props.get("identificationHints", {})
            have = {
                normalize_hardware_id(n["macAddress"])
                for n in props.get("networkInterfaces", [])
                if n.get("macAddress")
            }
            have |= {normalize_hardware_id(hints[k]) for k in ("vmWareUuid", "awsInstanceID") if hints.get(k)}
            if wanted & have:
                found.append(server)
        return found

    # public operations -------------------------------------------------------------------------
    def describe_recovery_instances(self, p: dict[str, Any]) -> dict[str, Any]:
        self.check_all_seen()
        f = p.get("filters") or {}
        ids, servers = set(f.get("recoveryInstanceIDs") or []), set(f.get("sourceServerIDs") or [])
        items = [
            r.doc
            for r in self.store.recovery_instances()
            if (not ids or r.id in ids) and (not servers or r.doc["sourceServerID"] in servers)
        ]
        return self._page(items, p, "DescribeRecoveryInstances")

    def describe_source_servers(self, p: dict[str, Any]) -> dict[str, Any]:
        f = p.get("filters") or {}
        ids = set(f.get("sourceServerIDs") or [])
        items = [s for s in self.store.source_servers() if not ids or s["sourceServerID"] in ids]
        if f.get("hardwareId"):
            items = self._hardware_matches(items, [f["hardwareId"]])
        return self._page(items, p, "DescribeSourceServers")

    def describe_jobs(self, p: dict[str, Any]) -> dict[str, Any]:
        f = p.get("filters") or {}
        ids = set(f.get("jobIDs") or [])
        # ISO8601DatetimeString values of one format compare correctly as text.
        items = [
            j
            for j in sorted(self.store.jobs(), key=lambda j: j.get("creationDateTime", ""))
            if (not ids or j["jobID"] in ids)
            and (not f.get("fromDate") or j.get("creationDateTime", "") >= f["fromDate"])
            and (not f.get("toDate") or j.get("creationDateTime", "") <= f["toDate"])
        ]
        return self._page(items, p, "DescribeJobs")

    def start_failback_launch(self, p: dict[str, Any]) -> dict[str, Any]:
        records = []
        for instance_id in p["recoveryInstanceIDs"]:
            record = self.store.recovery_instance(instance_id)
            if record is None:
                raise errors.validation(
                    f"Recovery instance {instance_id} not found",
                    [("recoveryInstanceIDs", f"{instance_id} does not exist")],
                    "other",
                )
            state = record.doc["failback"]["state"]
            if state != "FAILBACK_READY_FOR_LAUNCH" or record.internal.get("launchRequested"):
                raise errors.conflict(
                    RI_TYPE,
                    instance_id,
                    f"Recovery instance {instance_id} is not ready for failback launch (failback state {state}).",
                )
            records.append(record)
        now = self._now()
        job = {
            "jobID": _random_id("drsjob-"),
            "type": "LAUNCH",
            "initiatedBy": "FAILBACK",
            "creationDateTime": now,
            "status": "STARTED",
            "participatingServers": [
                {"sourceServerID": r.doc["sourceServerID"], "recoveryInstanceID": r.id, "launchStatus": "PENDING"}
                for r in records
            ],
            "tags": p.get("tags") or {},
        }
        job["arn"] = f"arn:aws:drs:{self.region}:{self.store.get('account')}:job/{job['jobID']}"
        self.store.save_job(job)
        for record in records:
            record.internal["launchRequested"] = True
            record.doc["failback"]["failbackJobID"] = job["jobID"]
            record.doc["failback"]["failbackLaunchType"] = "DRILL" if record.doc.get("isDrill") else "RECOVERY"
            self._save(record)
        return {"job": job}

    def stop_failback(self, p: dict[str, Any]) -> dict[str, Any]:
        record = self._instance(p["recoveryInstanceID"])
        if record.internal.get("launchRequested") and not record.internal.get("completed"):
            self._end_launch(record, "FAILED")
        record.internal.update(stopped=True, launchRequested=False)
        record.doc["dataReplicationInfo"]["dataReplicationState"] = "STOPPED"
        self._save(record)
        return {}

    def _end_launch(self, record: RecoveryInstanceRecord, launch_status: str) -> None:
        """This server's part of its LAUNCH job is over (LAUNCHED, or FAILED when stopped); the job completes
        when no server of it is still PENDING."""
        job = self.store.job(record.doc["failback"].get("failbackJobID") or "")
        if job is None:
            return
        for server in job["participatingServers"]:
            if server["recoveryInstanceID"] == record.id:
                server["launchStatus"] = launch_status
        if all(s["launchStatus"] in ("LAUNCHED", "FAILED") for s in job["participatingServers"]):
            job.update(status="COMPLETED", endDateTime=self._now())
        self.store.save_job(job)

    def get_failback_replication_configuration(self, p: dict[str, Any]) -> dict[str, Any]:
        record = self._instance(p["recoveryInstanceID"])
        return {"recoveryInstanceID": record.id, **record.internal["replicationConfiguration"]}

    def update_failback_replication_configuration(self, p: dict[str, Any]) -> dict[str, Any]:
        record = self._instance(p["recoveryInstanceID"])
        config = record.internal["replicationConfiguration"]
        for key in ("name", "bandwidthThrottling", "usePrivateIP", "internetProtocol"):
            if key in p:
                config[key] = p[key]
        self._save(record)
        return {}

    # the failback client's operations ----------------------------------------------------------
    def associate(self, p: dict[str, Any]) -> dict[str, Any]:
        record = self._instance(p["recoveryInstanceID"])
        ec2_state = record.doc["ec2InstanceState"]
        if ec2_state != "RUNNING":
            raise errors.conflict(
                RI_TYPE,
                record.id,
                f"Recovery instance {record.id} is not running (EC2 state {ec2_state}); start it before failing back.",
            )
        if record.internal.get("launchRequested") and not record.internal.get("completed"):
            raise errors.conflict(RI_TYPE, record.id, f"A failback launch of {record.id} is in progress.")
        now = self._now()
        client_id = _random_id("fbc-")
        original = self._matches_source(record, p.get("identification") or {})
        record.internal.update(
            failbackClientID=client_id,
            stopped=False,
            launchRequested=False,
            completed=False,
            deviceMapping=None,
            identification=p.get("identification") or {},
            localDisks=p.get("localDisks") or [],
            failbackClientVersion=p.get("failbackClientVersion"),
            lagSeconds=None,
        )
        record.doc["failback"] = {
            "failbackClientID": client_id,
            "failbackInitiationTime": now,
            "state": "FAILBACK_IN_PROGRESS",
            "failbackToOriginalServer": original,
            "failbackClientLastSeenByServiceDateTime": now,
        }
        record.doc["dataReplicationInfo"] = {
            "dataReplicationState": "INITIATING",
            "replicatedDisks": [],
            "dataReplicationInitiation": {
                "startDateTime": now,
                "steps": [
                    {"name": name, "status": "IN_PROGRESS" if i == 0 else "NOT_STARTED"}
                    for i, name in enumerate(FAILBACK_STEPS)
                ],
            },
        }
        self._save(record)
        config = record.internal["replicationConfiguration"]
        endpoint: dict[str, Any] = {
            "port": AGENT_PORT,
            "usePrivateIP": config["usePrivateIP"],
            "internetProtocol": config["internetProtocol"],
            "privateIP": record.internal["privateIP"],
        }
        if record.internal.get("publicIP"):
            endpoint["publicIP"] = record.internal["publicIP"]
        return {
            "failbackClientID": client_id,
            "failbackToOriginalServer": original,
            "sourceServerID": record.doc["sourceServerID"],
            "replicationEndpoint": endpoint,
            "bandwidthThrottling": config["bandwidthThrottling"],
        }

    def suggest_mapping(self, p: dict[str, Any]) -> dict[str, Any]:
        record = self._linked(p)
        original = bool(record.doc["failback"].get("failbackToOriginalServer"))
        mapping = []
        if original:
            local = {}
            for disk in p.get("localDisks") or record.internal.get("localDisks") or []:
                for name in [disk["deviceName"], *disk.get("persistentNames", [])]:
                    local[name] = disk
            for disk in record.doc["recoveryInstanceProperties"]["disks"]:
                source_device = record.internal["sourceDevices"].get(disk["internalDeviceName"])
                target = local.get(source_device) if source_device else None
                if target and target["bytes"] >= disk["bytes"]:
                    mapping.append(
                        {
                            "recoveryInstanceDeviceName": disk["internalDeviceName"],
                            "failbackClientDeviceName": target["deviceName"],
                        }
                    )
        self._save(record)
        return {"deviceMapping": mapping, "failbackToOriginalServer": original}

    def update_mapping(self, p: dict[str, Any]) -> dict[str, Any]:
        record = self._linked(p)
        disks = {d["internalDeviceName"]: d for d in record.doc["recoveryInstanceProperties"]["disks"]}
        local: dict[str, dict[str, Any]] = {}
        for disk in record.internal.get("localDisks") or []:
            for name in [disk["deviceName"], *disk.get("persistentNames", [])]:
                local[name] = disk
        problems: list[tuple[str, str]] = []
        seen_ri: set[str] = set()
        used_local: dict[str, str] = {}
        for i, entry in enumerate(p["deviceMapping"], start=1):
            ri_dev, fb_dev = entry["recoveryInstanceDeviceName"], entry["failbackClientDeviceName"]
            where = f"deviceMapping.{i}"
            if ri_dev not in disks:
                problems.append(
                    (
                        f"{where}.recoveryInstanceDeviceName",
                        f"{ri_dev} is not a volume of {record.id} ({', '.join(disks)})",
                    )
                )
                continue
            if ri_dev in seen_ri:
                problems.append((f"{where}.recoveryInstanceDeviceName", f"{ri_dev} is mapped twice"))
            seen_ri.add(ri_dev)
            if fb_dev == "EXCLUDE":
                continue
            target = local.get(fb_dev)
            key = target["deviceName"] if target else fb_dev
            if key in used_local:
                problems.append(
                    (f"{where}.failbackClientDeviceName", f"{fb_dev} is already the target of {used_local[key]}")
                )
            used_local[key] = ri_dev
            if local and target is None:
                problems.append(
                    (f"{where}.failbackClientDeviceName", f"{fb_dev} is not a disk the failback client reported")
                )
            elif target and target["bytes"] <= disks[ri_dev]["bytes"] - GIB:
                problems.append(
                    (
                        f"{where}.failbackClientDeviceName",
                        f"{fb_dev} ({target['bytes']} bytes) is smaller than {ri_dev} ({disks[ri_dev]['bytes']} bytes)",
                    )
                )
        for name in disks:
            if name not in seen_ri:
                problems.append(("deviceMapping", f"{name} has no target: map it to a local disk or EXCLUDE"))
        if not problems and not used_local:
            problems.append(("deviceMapping", "every volume is EXCLUDEd: at least one must be replicated"))
        if problems:
            raise errors.validation("Invalid device mapping: " + "; ".join(m for _, m in problems), problems)
        record.internal["deviceMapping"] = p["deviceMapping"]
        replicated = [
            {
                "deviceName": e["recoveryInstanceDeviceName"],
                "totalStorageBytes": disks[e["recoveryInstanceDeviceName"]]["bytes"],
                "replicatedStorageBytes": 0,
                "rescannedStorageBytes": 0,
                "backloggedStorageBytes": 0,
            }
            for e in p["deviceMapping"]
            if e["failbackClientDeviceName"] != "EXCLUDE"
        ]
        record.doc["dataReplicationInfo"]["replicatedDisks"] = replicated
        self._save(record)
        return {"deviceMapping": p["deviceMapping"], "replicatedDisks": replicated}

    def issue_agent_certificate(self, p: dict[str, Any]) -> dict[str, Any]:
        record = self._linked(p)
        try:
            issued = sign_csr(
                self.store,
                p["certificateSigningRequest"],
                expected_cn=p["failbackClientID"],
                now=self.clock(),
                server=False,
            )
        except CsrError as exc:
            raise errors.validation(str(exc), [("certificateSigningRequest", str(exc))]) from None
        # Kept: GetFailbackClientCredentialsForDrs checks the client's proof of identity against it.
        record.internal["clientCertificate"] = issued.certificate_pem
        self._save(record)
        return {
            "certificate": issued.certificate_pem,
            "caCertificate": issued.ca_certificate_pem,
            "agentCommonName": agent_common_name(record.id),
            "expirationDateTime": iso(issued.not_after),
        }

    def _replicated_disks(self, record: RecoveryInstanceRecord, disks: list[dict[str, Any]]) -> None:
        current = {d["deviceName"]: d for d in record.doc["dataReplicationInfo"].get("replicatedDisks", [])}
        for i, disk in enumerate(disks, start=1):
            if disk.get("deviceName") not in current:
                raise errors.validation(
                    f"{disk.get('deviceName')} is not a replicated volume of {record.id}",
                    [(f"replicatedDisks.{i}.deviceName", f"not one of: {', '.join(current) or 'none mapped yet'}")],
                )
            current[disk["deviceName"]].update(disk)
        info = record.doc["dataReplicationInfo"]
        info["replicatedDisks"] = list(current.values())
        if any(d.get("replicatedStorageBytes") for d in current.values()):
            record.doc["failback"].setdefault("firstByteDateTime", self._now())

    def update_agent_replication_info(self, p: dict[str, Any]) -> dict[str, Any]:
        record = self._linked(p)
        info = record.doc["dataReplicationInfo"]
        if "dataReplicationState" in p:
            info["dataReplicationState"] = p["dataReplicationState"]
        if "initiationSteps" in p:
            steps = info.setdefault("dataReplicationInitiation", {"startDateTime": self._now(), "steps": []})
            by_name = {s["name"]: s for s in steps["steps"]}
            for step in p["initiationSteps"]:
                if step.get("name") in by_name:
                    by_name[step["name"]].update(step)
                else:
                    steps["steps"].append(step)
        if "replicatedDisks" in p:
            self._replicated_disks(record, p["replicatedDisks"])
        if "lagSeconds" in p:
            record.internal["lagSeconds"] = p["lagSeconds"]
        if "etaDateTime" in p:
            info["etaDateTime"] = p["etaDateTime"]
        if "dataReplicationError" in p:
            if p["dataReplicationError"]:
                info["dataReplicationError"] = p["dataReplicationError"]
            else:
                info.pop("dataReplicationError", None)
        return {"failbackState": self._save(record)}

    def update_last_seen(self, p: dict[str, Any]) -> dict[str, Any]:
        record = self._linked(p)
        self._save(record)
        return {"lastSeenDateTime": record.doc["failback"]["failbackClientLastSeenByServiceDateTime"]}

    def get_failback_command(self, p: dict[str, Any]) -> dict[str, Any]:
        record = self._instance(p["recoveryInstanceID"])
        internal = record.internal
        config = internal["replicationConfiguration"]
        out: dict[str, Any] = {"bandwidthThrottling": config["bandwidthThrottling"]}
        if internal.get("failbackClientID") != p["failbackClientID"]:
            return {**out, "command": "STOP", "reason": f"{record.id} is now linked to another failback client"}
        self._seen(record)
        self._save(record)
        job_id = record.doc["failback"].get("failbackJobID")
        if internal.get("stopped"):
            return {**out, "command": "STOP", "reason": "failback was stopped (StopFailback)"}
        if internal.get("completed"):
            return {**out, "command": "COMPLETE", "failbackJobID": job_id}
        if internal.get("launchRequested"):
            return {
                **out,
                "command": "FINAL_SYNC",
                "failbackJobID": job_id,
                "reason": "failback launch requested: finish the last sync, then report consistency",
            }
        return {**out, "command": "CONTINUE"}

    def get_failback_launch_requested(self, p: dict[str, Any]) -> dict[str, Any]:
        record = self._linked(p)
        self._save(record)
        out: dict[str, Any] = {"launchRequested": bool(record.internal.get("launchRequested"))}
        if out["launchRequested"]:
            out["failbackJobID"] = record.doc["failback"]["failbackJobID"]
        return out

    def notify_agent_connected(self, p: dict[str, Any]) -> dict[str, Any]:
        record = self._linked(p)
        record.doc["failback"]["agentLastSeenByServiceDateTime"] = self._now()
        info = record.doc["dataReplicationInfo"]
        if info.get("dataReplicationState") == "DISCONNECTED":
            info["dataReplicationState"] = record.internal.get("stateBeforeDisconnect") or "RESCAN"
        self._save(record)
        return {}

    def notify_agent_disconnected(self, p: dict[str, Any]) -> dict[str, Any]:
        record = self._linked(p)
        info = record.doc["dataReplicationInfo"]
        if info.get("dataReplicationState") != "DISCONNECTED":
            record.internal["stateBeforeDisconnect"] = info.get("dataReplicationState")
        info["dataReplicationState"] = "DISCONNECTED"
        if p.get("error"):
            info["dataReplicationError"] = {
                "error": p["error"],
                **({"rawError": p["message"]} if p.get("message") else {}),
            }
        self._save(record)
        return {}

    def notify_replication_progress(self, p: dict[str, Any]) -> dict[str, Any]:
        record = self._linked(p)
        self._replicated_disks(record, p["replicatedDisks"])
        record.doc["failback"]["agentLastSeenByServiceDateTime"] = self._now()
        info = record.doc["dataReplicationInfo"]
        if info.get("dataReplicationState") in ("INITIATING", "NOT_STARTED"):
            info["dataReplicationState"] = "INITIAL_SYNC"
        if "lagSeconds" in p:
            record.internal["lagSeconds"] = p["lagSeconds"]
        if "etaDateTime" in p:
            info["etaDateTime"] = p["etaDateTime"]
        if "throughputBytesPerSecond" in p:
            record.internal["throughputBytesPerSecond"] = p["throughputBytesPerSecond"]
        self._save(record)
        return {}

    def notify_consistency_attained(self, p: dict[str, Any]) -> dict[str, Any]:
        record = self._linked(p)
        info = record.doc["dataReplicationInfo"]
        info["dataReplicationState"] = "CONTINUOUS"
        info.pop("etaDateTime", None)
        for disk in info.get("replicatedDisks", []):
            disk.update(
                replicatedStorageBytes=disk["totalStorageBytes"], backloggedStorageBytes=0, rescannedStorageBytes=0
            )
        record.internal["lagSeconds"] = 0
        if p.get("finalSync") and record.internal.get("launchRequested"):
            self._complete_launch(record)
        return {"failbackState": self._save(record)}

    def _complete_launch(self, record: RecoveryInstanceRecord) -> None:
        record.internal["completed"] = True
        record.doc["dataReplicationInfo"]["dataReplicationState"] = "STOPPED"
        self._end_launch(record, "LAUNCHED")

    def send_client_logs(self, p: dict[str, Any]) -> dict[str, Any]:
        self.store.add_logs(p.get("failbackClientID"), p.get("recoveryInstanceID"), p["logEvents"])
        return {}

    def send_client_metrics(self, p: dict[str, Any]) -> dict[str, Any]:
        self.store.add_metrics(p.get("failbackClientID"), p.get("recoveryInstanceID"), p["metrics"])
        return {}
