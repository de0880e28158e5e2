"""Guide steps 15-18: run the downloaded replication software as a child process and supervise it.

The child (`failback_assets/bin/failback-replicator --config C --status-file S --command-file F`) pairs with
the agent, replicates and keeps the status file current. This side:
- forwards the status file to DRS: initiation steps (UpdateAgentReplicationInfoForDrs), the data replication
  state, per-disk progress with lag and ETA (NotifyAgentReplicationProgressForDrs), consistency
  (NotifyConsistencyAttainedForDrs: the console's Ready / Healthy), link loss with the real error names
  (NotifyAgentDisconnectedForDrs) and its end (NotifyAgentConnectedForDrs);
- polls GetFailbackCommandForDrs and writes the answer into the command file (CONTINUE / FINAL_SYNC / STOP and
  the bandwidth limit in Mbps);
- shows progress per volume on the console as plain lines (bytes, rate, ETA), which a serial console takes;
- restarts the child if it dies of a signal (its journal makes the restart resume, not start over).
A DRS call that fails while replicating is logged and retried on the next round: replication goes on.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from failback_client.configure import ConfigureError, ReplicationSetup
from failback_client.console import Console
from failback_client.download import Software
from failback_client.errors import EXIT_REPLICATION, ClientError
from failback_client.liveness import Liveness
from failback_client.replication_api import ReplicationApi
from failback_client.verify import StepReporter

log = logging.getLogger(__name__)

NETWORK_ERRORS = ("AGENT_NOT_SEEN", "UNSTABLE_NETWORK")
MAX_RESTARTS = 3
STOP_GRACE_S = 30.0


class ReplicationFailedError(ClientError):
    exit_status = EXIT_REPLICATION


class Outcome(enum.StrEnum):
    COMPLETED = "COMPLETED"  # final sync flushed and verified by the replication software
    STOPPED = "STOPPED"  # StopFailback (or another failback client took the recovery instance over)


@dataclass
class Timing:
    poll_s: float = 0.5  # status file reads
    command_s: float = 2.0  # GetFailbackCommandForDrs
    progress_report_s: float = 5.0  # NotifyAgentReplicationProgressForDrs at most this often
    console_s: float = 10.0  # plain progress lines at most this often (state changes always show)
    heartbeat_s: float = 30.0  # UpdateFailbackClientLastSeenForDrs
    metrics_s: float = 60.0  # SendClientMetricsForDrs


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class ProgressView:
    """Per-volume progress lines from the status file; the rate comes from successive readings. A steady
    state (nothing changed) is repeated only every `quiet` seconds, so a serial console is not flooded."""

    def __init__(self, console: Console, targets: dict[str, str], interval: float, quiet: float = 300.0) -> None:
        self.console = console
        self.targets = targets
        self.interval = interval
        self.quiet = quiet
        self._last_at: float | None = None
        self._last_bytes: dict[str, int] = {}
        self._last_shown: tuple[Any, ...] | None = None
        self._last_shown_at = 0.0
        self.lines_shown = 0

    def show(self, status: dict[str, Any], force: bool = False) -> None:
        now = time.monotonic()
        if not force and self._last_at is not None and now - self._last_at < self.interval:
            return
        state = status.get("dataReplicationState") or "INITIATING"
        disks = status.get("replicatedDisks") or []
        fingerprint = (state, json.dumps(disks, sort_keys=True))
        if not force and fingerprint == self._last_shown and now - self._last_shown_at < self.quiet:
            self._last_at = now
            return
        self._last_shown, self._last_shown_at = fingerprint, now
        elapsed = now - self._last_at if self._last_at is not None else None
        for d in disks:
            name = d["deviceName"]
            total, done = int(d.get("totalStorageBytes") or 0), int(d.get("replicatedStorageBytes") or 0)
            backlog = int(d.get("backloggedStorageBytes") or 0)
            before = self._last_bytes.get(name)
            rate = (done - before) / elapsed if elapsed and before is not None and done >= before else None
            self._last_bytes[name] = done
            pct = 100.0 * done / total if total else 100.0
            left = max(total - done, backlog)
            eta = 0.0 if not left else (left / rate if rate else None)
            rate_text = f"{human_bytes(rate)}/s" if rate is not None else "-- B/s"
            self.console.line(
                f"{state}: {name} -> {self.targets.get(name, '?')}: {human_bytes(done)} / "
                f"{human_bytes(total)} ({pct:5.1f}%)  {rate_text}  ETA {human_eta(eta)}"
                + (f"  backlog {human_bytes(backlog)}" if backlog else "")
            )
            self.lines_shown += 1
        self._last_at = now


@dataclass
class Forwarder:
    """What has been told to DRS so far, and the next thing to tell it."""

    rapi: ReplicationApi
    steps: StepReporter
    console: Console
    software_version: str
    steps_seen: dict[str, str] = field(default_factory=dict)
    state: str | None = None
    error: tuple[str, str] | None = None
    consistent: bool = False
    last_progress: str = ""
    last_progress_at: float = 0.0
    failed_calls: int = 0
    resend: bool = False  # the last UpdateAgentReplicationInfoForDrs failed: send everything again

    def _safe(self, what: str, call: Any, *args: Any, **kwargs: Any) -> tuple[bool, Any]:
        """(True, answer) or (False, None) when the call failed (warned about, retried on a later round)."""
        try:
            return True, call(*args, **kwargs)
        except ClientError as e:
            self.failed_calls += 1
            if self.failed_calls in (1, 10) or self.failed_calls % 100 == 0:
                self.console.warn(f"Could not report {what} to DRS (replication goes on): {e}")
            log.warning("reporting %s failed: %s", what, e)
            return False, None

    def forward(self, status: dict[str, Any], timing: Timing) -> None:
        new_steps = {k: v for k, v in (status.get("initiationSteps") or {}).items() if self.steps_seen.get(k) != v}
        state = status.get("dataReplicationState")
        resend, self.resend = self.resend, False
        update: dict[str, Any] = {}
        if new_steps or resend:
            for name, value in new_steps.items():
                self.steps_seen[name] = value
                if name in self.steps.status and self.steps.status[name] != value:
                    self.steps.status[name] = value
                    shown = {"SUCCEEDED": self.console.ok, "FAILED": self.console.error}.get(value, self.console.info)
                    shown(f"{name}: {value}")
            update["initiationSteps"] = [{"name": n, "status": s} for n, s in self.steps.status.items()]
        error = status.get("error")
        error_key = (error["error"], error.get("rawError", "")) if error else None
        if resend and error_key is None:
            update["dataReplicationError"] = {}
        if (
            resend
            and state
            and state == self.state
            and state != "DISCONNECTED"
            and (state != "CONTINUOUS" or self.consistent)
        ):
            update["dataReplicationState"] = state
        if error_key != self.error or (resend and error_key):
            if error_key is None:
                self.console.ok("Replication problem cleared")
                update["dataReplicationError"] = {}
            else:
                if error_key != self.error:
                    self.console.warn(f"Replication problem {error_key[0]}: {error_key[1]}")
                if error_key[0] not in NETWORK_ERRORS:
                    update["dataReplicationError"] = {"error": error_key[0], "rawError": error_key[1][:1000]}
        if state and state != self.state:
            if state == "DISCONNECTED":
                self._safe(
                    "the lost link",
                    self.rapi.disconnected,
                    error_key[0] if error_key else None,
                    error_key[1] if error_key else "the link to the agent was lost",
                )
            else:
                if self.state in (None, "INITIATING", "DISCONNECTED") and state not in ("INITIATING", "STOPPED"):
                    self._safe("the link to the agent", self.rapi.connected, self.software_version)
                # The first CONTINUOUS is told by NotifyConsistencyAttainedForDrs, after the final progress:
                # DRS must not show Ready before every byte is there and verified.
                if state != "CONTINUOUS" or self.consistent:
                    update["dataReplicationState"] = state
            self.console.info(f"Data replication state: {state}")
        elif error_key != self.error and error_key and error_key[0] in NETWORK_ERRORS:
            self._safe("the link problem", self.rapi.disconnected, *error_key)
        if update:
            ok, _ = self._safe("the replication state", self.rapi.update_info, **update)
            self.resend = not ok
        self.error = error_key
        if state:
            self.state = state
        disks = status.get("replicatedDisks")
        now = time.monotonic()
        if disks:
            fingerprint = json.dumps([disks, status.get("lagSeconds")], sort_keys=True)
            due = now - self.last_progress_at >= timing.progress_report_s
            if fingerprint != self.last_progress and (due or status.get("consistencyAttained")):
                eta_s = status.get("etaSeconds")
                eta = iso(datetime.now(UTC) + timedelta(seconds=float(eta_s))) if eta_s else None
                ok, _ = self._safe(
                    "progress",
                    self.rapi.progress,
                    disks,
                    status.get("lagSeconds"),
                    eta,
                    status.get("throughputBytesPerSecond"),
                )
                if ok:
                    self.last_progress, self.last_progress_at = fingerprint, now
        if status.get("consistencyAttained") and not self.consistent:
            ok, verdict = self._safe("consistency", self.rapi.consistency_attained, iso(datetime.now(UTC)), False)
            if ok:
                self.consistent = True
                self.console.ok(
                    "Every volume is replicated and verified; replication continues. DRS shows the "
                    "recovery instance Ready / Healthy: choose Failback in the console when ready "
                    f"(failback state {verdict})"
                )


class Supervisor:
    def __init__(
        self,
        software: Software,
        setup: ReplicationSetup,
        config_path: Path,
        rapi: ReplicationApi,
        steps: StepReporter,
        console: Console,
        timing: Timing | None = None,
    ) -> None:
        self.software = software
        self.setup = setup
        self.config_path = config_path
        self.rapi = rapi
        self.console = console
        self.timing = timing or Timing()
        run_dir = config_path.parent
        self.status_file = run_dir / "status.json"
        self.command_file = run_dir / "command"
        self.log_file = run_dir / "replicator.log"
        self.forwarder = Forwarder(rapi, steps, console, f"failback-replicator/{software.version}")
        self.view = ProgressView(console, dict(setup.volumes), self.timing.console_s)
        self.liveness = Liveness(rapi, heartbeat_s=self.timing.heartbeat_s, metrics_s=self.timing.metrics_s)
        self.command = "CONTINUE"
        self.command_reason = ""
        self.job_id: str | None = None
        self._command_text = ""
        self.restarts = 0
        self.proc: subprocess.Popen[bytes] | None = None

    # ---- the command file ----------------------------------------------------------------------
    def _write_command(self, command: str, mbps: int | None) -> None:
        text = f"{command} {mbps}\n" if mbps is not None else f"{command}\n"
        if text == self._command_text:
            return
        tmp = self.command_file.with_name(self.command_file.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.command_file)
        self._command_text = text
        log.info("command file: %s", text.strip())

    def poll_command(self) -> None:
        try:
            answer = self.rapi.command()
        except ClientError as e:
            log.warning("GetFailbackCommandForDrs failed (keeping %s): %s", self.command, e)
            return
        command = answer.get("command", "CONTINUE")
        mbps = answer.get("bandwidthThrottling")
        if command == "COMPLETE" and self.command != "FINAL_SYNC":
            command = "STOP"  # completed by someone else: nothing more to do here
        if command != self.command:
            self.command_reason = answer.get("reason", "")
            self.job_id = answer.get("failbackJobID") or self.job_id
            if command == "FINAL_SYNC":
                self.console.info(
                    f"Failback launch requested (job {self.job_id}): final sync of the last changes, "
                    "then flush and verify every volume"
                )
            elif command == "STOP":
                self.console.warn(f"DRS says stop: {self.command_reason or 'failback was stopped'}")
            self.command = command
        if command != "COMPLETE":
            self._write_command(command, mbps)

    # ---- the child -------------------------------------------------------------------------------
    def _start(self) -> subprocess.Popen[bytes]:
        fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # it needs no credentials
            return subprocess.Popen(
                [
                    str(self.software.launcher),
                    "--config",
                    str(self.config_path),
                    "--status-file",
                    str(self.status_file),
                    "--command-file",
                    str(self.command_file),
                    "--progress-interval",
                    "60",
                ],
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                env=env,
                cwd=str(self.config_path.parent),
                start_new_session=True,
            )
        finally:
            os.close(fd)

    def read_status(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.status_file.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as e:
            log.warning("status file %s unreadable: %s", self.status_file, e)
            return None

    def _tail_log(self, lines: int = 3) -> str:
        try:
            text = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def run(self) -> Outcome:
        self.status_file.unlink(missing_ok=True)
        self.poll_command()
        self._write_command(self.command, None)
        self.proc = self._start()
        log.info("replication software started: pid %d", self.proc.pid)
        next_command = time.monotonic() + self.timing.command_s
        try:
            while True:
                rc = self.proc.poll()
                status = self.read_status()
                if status is not None:
                    changed = status.get("dataReplicationState") != self.forwarder.state
                    self.forwarder.forward(status, self.timing)
                    self.view.show(status, force=changed)
                if rc is not None:
                    outcome = self._finished(rc, status or {})
                    if outcome is not None:
                        if status:
                            self.view.show(status, force=True)
                        return outcome
                    continue
                now = time.monotonic()
                if now >= next_command:
                    self.poll_command()
                    next_command = now + self.timing.command_s
                self.liveness.tick(status)
                time.sleep(self.timing.poll_s)
        finally:
            self.terminate()

    def _finished(self, rc: int, status: dict[str, Any]) -> Outcome | None:
        log.info("replication software exited with status %d", rc)
        if rc == 0 and status.get("completed"):
            return Outcome.COMPLETED
        if rc == 3 or (rc == 0 and self.command == "STOP"):
            return Outcome.STOPPED
        if rc == 2:
            raise ConfigureError(f"The replication software refused its configuration: {self._tail_log(1)}")
        error = status.get("error") or {}
        if rc == 1:
            what = f"{error.get('error')}: {error.get('rawError')}" if error else self._tail_log()
            raise ReplicationFailedError(f"Replication failed ({what}); the log is {self.log_file}")
        if self.command == "STOP":
            return Outcome.STOPPED
        if self.restarts >= MAX_RESTARTS:
            raise ReplicationFailedError(
                f"The replication software ended unexpectedly (status {rc}) "
                f"{self.restarts + 1} times; the log is {self.log_file}"
            )
        self.restarts += 1
        self.console.warn(
            f"The replication software ended unexpectedly (status {rc}); restarting it "
            f"({self.restarts}/{MAX_RESTARTS}): it resumes from what is verified"
        )
        self.proc = self._start()
        return None

    def terminate(self) -> None:
        """Stop a child that is still running (interrupt, error): SIGTERM means STOP to it."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
