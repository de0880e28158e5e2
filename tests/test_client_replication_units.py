"""Fast checks of the client's replication pieces without a network: the configuration contract with the
replication software, what the supervisor tells DRS for each status change, the command file, progress lines,
and the finish step off the LiveCD."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from failback_client.configure import ConfigureError, ReplicationSetup, mapped_volumes, write_config
from failback_client.console import Console
from failback_client.devices import LocalDisk
from failback_client.errors import ClientError
from failback_client.finish import finish, on_livecd
from failback_client.mapping import MappedVolume, RecoveryDisk
from failback_client.pairing import tls_paths
from failback_client.replicate import Forwarder, ProgressView, Supervisor, Timing
from failback_client.settings import Settings


class FakeApi:
    """Records the ReplicationApi calls; `fail` makes the next N calls raise like a refused DRS call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail = 0
        self.answer: dict[str, Any] = {"command": "CONTINUE", "bandwidthThrottling": 0}
        self.ids = {"failbackClientID": "fbc-x", "recoveryInstanceID": "i-0123456789abcdef0"}

    def _rec(self, name: str, value: Any) -> Any:
        if self.fail:
            self.fail -= 1
            raise ClientError("DRS refused it")
        self.calls.append((name, value))
        return value

    def update_info(self, **fields: Any) -> str:
        return self._rec("update_info", fields) and "FAILBACK_IN_PROGRESS"

    def progress(self, disks: Any, lag: Any, eta: Any, throughput: Any) -> None:
        self._rec("progress", (disks, lag, eta, throughput))

    def connected(self, version: str) -> None:
        self._rec("connected", version)

    def disconnected(self, error: Any, message: Any) -> None:
        self._rec("disconnected", (error, message))

    def consistency_attained(self, when: str, final_sync: bool) -> str:
        self._rec("consistency_attained", final_sync)
        return "FAILBACK_READY_FOR_LAUNCH"

    def command(self) -> dict[str, Any]:
        return self._rec("command", dict(self.answer))

    def names(self) -> list[str]:
        return [n for n, _ in self.calls]


class Steps:
    def __init__(self) -> None:
        from failback_client.drs_model import FAILBACK_INITIATION_STEPS

        self.status = dict.fromkeys(FAILBACK_INITIATION_STEPS, "SUCCEEDED")
        self.status["PAIR_AGENT_WITH_REPLICATION_SOFTWARE"] = "IN_PROGRESS"
        self.status["ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION"] = "NOT_STARTED"


def console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(stdin=io.StringIO(), stdout=out, plain=True), out


DISK = {
    "deviceName": "/dev/xvda",
    "totalStorageBytes": 100,
    "replicatedStorageBytes": 40,
    "rescannedStorageBytes": 0,
    "backloggedStorageBytes": 60,
}


def test_forwarder_tells_drs_each_change_once() -> None:
    api, steps = FakeApi(), Steps()
    con, out = console()
    fw = Forwarder(api, steps, con, "failback-replicator/0.1.0")  # type: ignore[arg-type]
    timing = Timing(progress_report_s=0)
    fw.forward(
        {
            "initiationSteps": {
                "PAIR_AGENT_WITH_REPLICATION_SOFTWARE": "SUCCEEDED",
                "ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION": "SUCCEEDED",
            },
            "dataReplicationState": "INITIAL_SYNC",
            "replicatedDisks": [DISK],
            "lagSeconds": 3,
            "etaSeconds": 12,
            "throughputBytesPerSecond": 5,
            "error": None,
        },
        timing,
    )
    assert api.names() == ["connected", "update_info", "progress"]
    update = api.calls[1][1]
    assert update["dataReplicationState"] == "INITIAL_SYNC"
    assert {s["name"]: s["status"] for s in update["initiationSteps"]}[
        "PAIR_AGENT_WITH_REPLICATION_SOFTWARE"
    ] == "SUCCEEDED"
    assert api.calls[2][1][0] == [DISK] and api.calls[2][1][1] == 3 and api.calls[2][1][2].endswith("Z")
    api.calls.clear()
    same = {"dataReplicationState": "INITIAL_SYNC", "replicatedDisks": [DISK], "lagSeconds": 3, "error": None}
    fw.forward(same, timing)
    assert api.names() == [], "nothing changed: nothing sent"
    # the link drops: DRS hears UNSTABLE_NETWORK through NotifyAgentDisconnected, with the reason
    fw.forward(
        {
            **same,
            "dataReplicationState": "DISCONNECTED",
            "error": {"error": "UNSTABLE_NETWORK", "rawError": "link lost"},
        },
        timing,
    )
    assert api.calls == [("disconnected", ("UNSTABLE_NETWORK", "link lost"))]
    assert "Replication problem UNSTABLE_NETWORK: link lost" in out.getvalue()
    api.calls.clear()
    # back: connected again, the error cleared, state forwarded; consistency reported exactly once
    done = {
        **same,
        "dataReplicationState": "CONTINUOUS",
        "replicatedDisks": [{**DISK, "replicatedStorageBytes": 100, "backloggedStorageBytes": 0}],
        "consistencyAttained": True,
    }
    fw.forward(done, timing)
    fw.forward(done, timing)
    assert api.names() == ["connected", "update_info", "progress", "consistency_attained"]
    # the first CONTINUOUS goes with NotifyConsistencyAttained (after the progress), not before it
    assert api.calls[1][1] == {"dataReplicationError": {}}
    assert "Ready / Healthy" in out.getvalue()
    api.calls.clear()
    # after Ready, a reconnect's CONTINUOUS is forwarded as a state again
    fw.forward({**done, "dataReplicationState": "RESCAN"}, timing)
    fw.forward(done, timing)
    assert [c[1].get("dataReplicationState") for c in api.calls if c[0] == "update_info"] == ["RESCAN", "CONTINUOUS"]


def test_forwarder_resends_after_a_refused_update_and_reports_other_errors_as_replication_errors() -> None:
    api, steps = FakeApi(), Steps()
    con, _ = console()
    fw = Forwarder(api, steps, con, "v")  # type: ignore[arg-type]
    api.fail = 2  # connected + update_info refused
    status = {"dataReplicationState": "RESCAN", "error": None}
    fw.forward(status, Timing())
    assert api.names() == [] and fw.resend
    fw.forward(status, Timing())
    assert api.names() == ["update_info"] and api.calls[0][1]["dataReplicationState"] == "RESCAN"
    api.calls.clear()
    fw.forward({**status, "error": {"error": "NOT_CONVERGING", "rawError": "source changes too fast"}}, Timing())
    assert api.calls == [
        ("update_info", {"dataReplicationError": {"error": "NOT_CONVERGING", "rawError": "source changes too fast"}})
    ]


def test_progress_lines_have_bytes_rate_eta_and_stay_quiet_when_nothing_moves(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    con, out = console()
    clock = [1000.0]
    monkeypatch.setattr("failback_client.replicate.time.monotonic", lambda: clock[0])
    view = ProgressView(con, {"/dev/xvda": "/dev/sda"}, interval=10, quiet=300)
    mib = 1024 * 1024
    disk = {
        "deviceName": "/dev/xvda",
        "totalStorageBytes": 100 * mib,
        "replicatedStorageBytes": 10 * mib,
        "backloggedStorageBytes": 90 * mib,
    }
    view.show({"dataReplicationState": "INITIAL_SYNC", "replicatedDisks": [disk]})
    clock[0] += 5
    view.show({"dataReplicationState": "INITIAL_SYNC", "replicatedDisks": [disk]})  # within the interval
    clock[0] += 5
    view.show(
        {
            "dataReplicationState": "INITIAL_SYNC",
            "replicatedDisks": [{**disk, "replicatedStorageBytes": 30 * mib, "backloggedStorageBytes": 70 * mib}],
        }
    )
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[1] == (
        "INITIAL_SYNC: /dev/xvda -> /dev/sda: 30.0 MiB / 100.0 MiB ( 30.0%)  2.0 MiB/s  ETA 00:35  backlog 70.0 MiB"
    )
    steady = {
        "dataReplicationState": "CONTINUOUS",
        "replicatedDisks": [{**disk, "replicatedStorageBytes": 100 * mib, "backloggedStorageBytes": 0}],
    }
    for _ in range(20):
        clock[0] += 11
        view.show(steady)
    assert len(out.getvalue().splitlines()) == 3, "a steady state is not repeated every interval"
    clock[0] += 300
    view.show(steady)
    assert len(out.getvalue().splitlines()) == 4


def test_command_file_follows_drs(tmp_path: Path) -> None:
    api, steps = FakeApi(), Steps()
    con, out = console()
    run = tmp_path / "run"
    run.mkdir()
    setup = ReplicationSetup(
        "i-0123456789abcdef0",
        "fbc-x",
        "127.0.0.1",
        1500,
        [("/dev/xvda", "/dev/sda")],
        True,
        None,
        tmp_path / "state",
        tls_paths(tmp_path / "tls"),
    )
    software = type("S", (), {"version": "0.1.0", "launcher": Path("/bin/false")})()
    sup = Supervisor(software, setup, run / "replicator.json", api, steps, con, Timing())  # type: ignore[arg-type]
    api.answer = {"command": "CONTINUE", "bandwidthThrottling": 100}
    sup.poll_command()
    assert (run / "command").read_text() == "CONTINUE 100\n"
    api.answer = {"command": "FINAL_SYNC", "bandwidthThrottling": 0, "failbackJobID": "drsjob-1"}
    sup.poll_command()
    assert (run / "command").read_text() == "FINAL_SYNC 0\n"
    assert "Failback launch requested (job drsjob-1)" in out.getvalue()
    # COMPLETE before our own final sync finished means someone else completed it: stop, do not go on
    sup.command = "CONTINUE"
    api.answer = {"command": "COMPLETE", "bandwidthThrottling": 0}
    sup.poll_command()
    assert (run / "command").read_text() == "STOP 0\n"
    api.fail = 1
    sup.poll_command()  # a failed poll keeps the last command
    assert sup.command == "STOP"


def test_configuration_is_what_the_replication_software_reads(tmp_path: Path) -> None:
    from failback_replicator.config import ReplicatorConfig

    volumes = [
        MappedVolume(RecoveryDisk("/dev/xvda", 10), LocalDisk("sda", 20)),
        MappedVolume(RecoveryDisk("/dev/xvdb", 10), None),
    ]
    setup = ReplicationSetup(
        "i-0123456789abcdef0",
        "fbc-x",
        "10.0.0.5",
        1500,
        mapped_volumes(volumes),
        False,
        50,
        tmp_path / "state",
        tls_paths(tmp_path / "tls"),
        agent_identity="agent.i-0.drs.local",
    )
    path = write_config(setup, tmp_path / "run" / "replicator.json")
    assert os.stat(path).st_mode & 0o777 == 0o600
    cfg = ReplicatorConfig.from_dict(json.loads(path.read_text()))
    assert cfg.agent_host == "10.0.0.5" and cfg.agent_identity == "agent.i-0.drs.local"
    assert [(v.recovery_device, str(v.target)) for v in cfg.volumes] == [("/dev/xvda", "/dev/sda")]
    assert cfg.rescan is False and cfg.bandwidth_mbps == 50 and cfg.state_dir == tmp_path / "state"
    assert cfg.tls.key == tmp_path / "tls" / "replicator.key"
    with pytest.raises(ConfigureError, match="EXCLUDEd"):
        mapped_volumes([MappedVolume(RecoveryDisk("/dev/xvda", 10), None)])


def test_finish_never_reboots_off_the_livecd(tmp_path: Path) -> None:
    assert not on_livecd("/")
    con, out = console()
    finish(Settings(reboot=True, sysroot="/"), con)
    assert "Not running from the failback LiveCD" in out.getvalue()
    con, out = console()
    finish(Settings(reboot=False), con)
    assert "Not rebooting (REBOOT=0" in out.getvalue()


def test_reboot_setting_from_flag_and_variable() -> None:
    from failback_client.cli import build_parser
    from failback_client.settings import from_arguments

    assert from_arguments(build_parser().parse_args([]), {}).reboot is True
    assert from_arguments(build_parser().parse_args(["--no-reboot"]), {}).reboot is False
    assert from_arguments(build_parser().parse_args([]), {"REBOOT": "0"}).reboot is False
    assert from_arguments(build_parser().parse_args([]), {"FAILBACK_CHECK_ONLY": "1"}).check_only is True


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        ("BOOT_IMAGE=/live/vmlinuz boot=failback quiet", True),  # the LiveCD's own initramfs script
        ("boot=live components quiet", True),  # live-boot (boot=live in image.yaml)
        ("root=/dev/sda1 ro quiet", False),  # an installed system: never ejected or rebooted from here
    ],
)
def test_on_livecd_needs_the_boot_argument_and_the_mounted_medium(tmp_path: Path, cmdline: str, expected: bool) -> None:
    import subprocess
    import sys

    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cmdline").write_text(cmdline + "\n")
    (tmp_path / "run/live/medium").mkdir(parents=True)
    assert not on_livecd(str(tmp_path))  # nothing mounted there
    # A real mount, in a private mount namespace so the host's mounts are untouched.
    code = (
        "import sys, subprocess; from failback_client.finish import on_livecd; "
        f"subprocess.run(['mount', '-t', 'tmpfs', 'medium', '{tmp_path}/run/live/medium'], check=True); "
        f"print(on_livecd('{tmp_path}'))"
    )
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip() == str(expected)
