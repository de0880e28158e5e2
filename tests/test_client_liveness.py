"""Liveness and reporting as DRS sees them: FAILBACK_CLIENT_NOT_SEEN set for a silent client and cleared when it
returns (control plane), the client's heartbeat, metrics and redacted log upload (failback_client.liveness), and
a real client process stopped with SIGSTOP while it replicates (slow)."""

from __future__ import annotations

import logging
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
from drs_controlplane.cli import main as controlplane_main
from failback_client.api import DrsApi
from failback_client.liveness import Liveness, metrics_from_status
from failback_client.logs import REDACTOR
from failback_client.replication_api import ReplicationApi
from failback_client.settings import Settings

from tests.controlplane_fixture import OTHER_MAC, RI, ClientProcess, blank, wait_for
from tests.test_client_replication_helpers import MiB, make_ext4, seed_for
from tests.test_controlplane import WEB01, _associate


def _error_of(cp, instance: str) -> str | None:  # type: ignore[no-untyped-def]
    item = cp.client().describe_recovery_instances(filters={"recoveryInstanceIDs": [instance]})["items"][0]
    return (item["dataReplicationInfo"].get("dataReplicationError") or {}).get("error")


def test_not_seen_is_set_after_the_configured_silence_and_cleared_on_return(drs_controlplane_factory):
    cp = drs_controlplane_factory(client_not_seen_after=120)
    client_id = _associate(cp)
    assert _error_of(cp, WEB01) is None
    cp.set_clock_offset(100)
    assert _error_of(cp, WEB01) is None  # within the configured time
    cp.set_clock_offset(130)
    assert _error_of(cp, WEB01) == "FAILBACK_CLIENT_NOT_SEEN"
    assert cp.recovery_instance(WEB01)["failback"]["state"] == "FAILBACK_ERROR"
    cp.client().update_failback_client_last_seen_for_drs(failbackClientID=client_id, recoveryInstanceID=WEB01)
    assert _error_of(cp, WEB01) is None
    assert cp.recovery_instance(WEB01)["failback"]["state"] == "FAILBACK_IN_PROGRESS"


def test_heartbeat_metrics_and_redacted_logs(drs_controlplane, tmp_path: Path, capsys):
    cp = drs_controlplane
    client_id = _associate(cp)
    api = DrsApi(
        Settings(region=cp.region, endpoint=cp.url, access_key_id=cp.access_key, secret_access_key=cp.secret_key)
    )
    rapi = ReplicationApi(api, client_id, WEB01)
    now = [0.0]
    liveness = Liveness(rapi, heartbeat_s=30, metrics_s=60, clock=lambda: now[0])
    try:
        status = {
            "replicatedDisks": [
                {
                    "deviceName": "/dev/nvme0n1",
                    "totalStorageBytes": 100,
                    "replicatedStorageBytes": 40,
                    "backloggedStorageBytes": 60,
                }
            ],
            "lagSeconds": 12,
            "throughputBytesPerSecond": 1000,
        }
        liveness.tick(status)
        now[0] = 10.0
        liveness.tick(status)  # neither period is over: nothing sent
        now[0] = 31.0
        liveness.tick(status)
        assert liveness.heartbeats == 2
        beats = [r for r in cp.plane.requests if r.operation == "UpdateFailbackClientLastSeenForDrs"]
        assert len(beats) == 2 and all(r.status == 200 for r in beats)
        metrics = {m["name"]: m["value"] for m in cp.client_metrics()}
        assert metrics == {m["name"]: m["value"] for m in metrics_from_status(status)}
        assert metrics["replicatedBytes"] == 40 and metrics["lag"] == 12
        REDACTOR.add("very-secret-token-value")
        logging.getLogger("failback_client.test").warning("refresh with very-secret-token-value failed")
        assert liveness.send_logs("completion")
    finally:
        liveness.close()
    logs = cp.client_logs()
    messages = [e["message"] for e in logs]
    assert any("refresh with **** failed" in m for m in messages), messages
    assert not any("very-secret-token-value" in m for m in messages)
    assert any(e["level"] == "WARNING" for e in logs)
    # the control plane's CLI shows what it received
    assert controlplane_main(["client-reports", "--state", str(cp.state_path)]) == 0
    out = capsys.readouterr().out
    assert "refresh with **** failed" in out and "replicatedBytes" in out and client_id in out


@pytest.mark.root
@pytest.mark.slow
def test_a_stopped_client_is_not_seen_until_it_continues(s3: str, stack_factory, tmp_path: Path) -> None:
    src = make_ext4(tmp_path / "root.img", 24, seed=7, fill_mib=8)
    size = src.stat().st_size
    stack = stack_factory(
        seed_for(RI, [("/dev/nvme0n1", size)], [OTHER_MAC]),
        {"/dev/nvme0n1": src},
        {"/dev/nvme0n1": blank(tmp_path / "t0.img", 32 * MiB)},
    )
    cp = stack.cp
    cp.plane.service.client_not_seen_after = timedelta(seconds=4)
    client = ClientProcess(stack.env(s3), tmp_path / "client.out")
    try:
        wait_for(
            "Ready for launch",
            lambda: cp.recovery_instance(RI)["failback"]["state"] == "FAILBACK_READY_FOR_LAUNCH",
            client,
        )
        assert _error_of(cp, RI) is None
        os.kill(client.proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        while _error_of(cp, RI) != "FAILBACK_CLIENT_NOT_SEEN":
            assert time.monotonic() - stopped < 20, "FAILBACK_CLIENT_NOT_SEEN not set for a stopped client"
            time.sleep(0.5)
        not_seen_after = time.monotonic() - stopped
        assert not_seen_after >= 2, not_seen_after  # not before the configured silence (4 s, minus a poll)
        assert cp.recovery_instance(RI)["failback"]["state"] == "FAILBACK_ERROR"
        os.kill(client.proc.pid, signal.SIGCONT)
        resumed = time.monotonic()
        while _error_of(cp, RI) is not None:
            assert time.monotonic() - resumed < 20, "FAILBACK_CLIENT_NOT_SEEN not cleared after the client resumed"
            time.sleep(0.5)
        print(
            f"\nnot seen after {not_seen_after:.1f} s of silence; cleared {time.monotonic() - resumed:.1f} s "
            "after resuming"
        )
        wait_for(
            "Ready again",
            lambda: cp.recovery_instance(RI)["failback"]["state"] == "FAILBACK_READY_FOR_LAUNCH",
            client,
            30,
        )
        cp.press_failback(RI)
        assert client.wait(120) == 0, client.output
    finally:
        if client.proc.poll() is None:
            os.kill(client.proc.pid, signal.SIGCONT)
        client.kill()
    stack.assert_targets_equal_sources()
    assert any(e["message"].endswith("sending the client log to DRS (completion)") for e in cp.client_logs())
    assert {"replicatedBytes", "totalBytes"} <= {m["name"] for m in cp.client_metrics()}
