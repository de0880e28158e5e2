"""The DRS calls made while the replication software runs (guide steps 15-19), over the workflow's boto3 client.

Errors become one sentence through `api.calling`, like the workflow's own calls.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from failback_client.api import DrsApi, calling

log = logging.getLogger(__name__)

MAX_MESSAGE = 1000  # rawError / message: keep what DRS shows short


class ReplicationApi:
    def __init__(
        self, api: DrsApi, client_id: str, recovery_instance_id: str, bandwidth_mbps: int | None = None
    ) -> None:
        self.api = api
        self.ids = {"failbackClientID": client_id, "recoveryInstanceID": recovery_instance_id}
        # From the association (GetFailbackReplicationConfiguration is in neither failback policy).
        self.bandwidth_mbps = bandwidth_mbps

    @property
    def client(self) -> Any:
        return self.api.client  # follows the switch to DRS-issued credentials

    def _calling(self, action: str) -> contextlib.AbstractContextManager[None]:
        return calling(self.api.settings, action, log, installed=self.api.installed)

    def issue_certificate(self, csr_pem: str) -> dict[str, Any]:
        with self._calling("asking DRS to sign the replication software's certificate (IssueAgentCertificateForDrs)"):
            return self.client.issue_agent_certificate_for_drs(**self.ids, certificateSigningRequest=csr_pem)

    def update_info(self, **fields: Any) -> str | None:
        """UpdateAgentReplicationInfoForDrs with only the given fields; returns the failback state."""
        with self._calling("reporting the replication state to DRS"):
            return self.api.update_replication(**self.ids, **fields).get("failbackState")

    def progress(
        self, disks: list[dict[str, Any]], lag_seconds: int | None, eta: str | None, throughput: int | None
    ) -> None:
        fields: dict[str, Any] = {"replicatedDisks": disks}
        if lag_seconds is not None:
            fields["lagSeconds"] = max(0, int(lag_seconds))
        if eta:
            fields["etaDateTime"] = eta
        if throughput is not None:
            fields["throughputBytesPerSecond"] = max(0, int(throughput))
        with self._calling("reporting replication progress to DRS"):
            self.client.notify_agent_replication_progress_for_drs(**self.ids, **fields)

    def connected(self, version: str) -> None:
        with self._calling("telling DRS the replication software reached the agent"):
            self.client.notify_agent_connected_for_drs(**self.ids, agentVersion=version[:255])

    def disconnected(self, error: str | None, message: str | None) -> None:
        fields: dict[str, Any] = {}
        if error:
            fields["error"] = error
        if message:
            fields["message"] = message[:MAX_MESSAGE]
        with self._calling("telling DRS the link to the agent is down"):
            self.client.notify_agent_disconnected_for_drs(**self.ids, **fields)

    def consistency_attained(self, when: str, final_sync: bool) -> str | None:
        with self._calling("telling DRS the volumes are consistent"):
            return self.client.notify_consistency_attained_for_drs(
                **self.ids, consistencyDateTime=when, finalSync=final_sync
            ).get("failbackState")

    def seen(self) -> None:
        with self._calling("telling DRS this failback client is alive (UpdateFailbackClientLastSeenForDrs)"):
            self.client.update_failback_client_last_seen_for_drs(**self.ids)

    def metrics(self, metrics: list[dict[str, Any]]) -> None:
        with self._calling("sending metrics to DRS (SendClientMetricsForDrs)"):
            self.client.send_client_metrics_for_drs(**self.ids, metrics=metrics)

    def logs(self, events: list[dict[str, Any]]) -> None:
        with self._calling("sending the client log to DRS (SendClientLogsForDrs)"):
            self.client.send_client_logs_for_drs(**self.ids, logEvents=events)

    def command(self) -> dict[str, Any]:
        with self._calling("asking DRS what to do next (GetFailbackCommandForDrs)"):
            return self.client.get_failback_command_for_drs(**self.ids)
