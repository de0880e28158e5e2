"""The two small interfaces through which the engine meets the rest of the failback client.

`StateReporter` receives everything the control plane (UpdateAgentReplicationInfoForDrs,
NotifyAgentReplicationProgressForDrs, NotifyConsistencyAttainedForDrs, ...) and the console need;
`CommandSource` answers what the service wants next (GetFailbackCommandForDrs). The engine knows
nothing about boto3: the client adapts these in a few lines.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("failback_replicator")


class InitiationStep(enum.StrEnum):
    DOWNLOAD_REPLICATION_SOFTWARE_TO_FAILBACK_CLIENT = "DOWNLOAD_REPLICATION_SOFTWARE_TO_FAILBACK_CLIENT"
    CONFIGURE_REPLICATION_SOFTWARE = "CONFIGURE_REPLICATION_SOFTWARE"
    PAIR_AGENT_WITH_REPLICATION_SOFTWARE = "PAIR_AGENT_WITH_REPLICATION_SOFTWARE"
    ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION = "ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION"


class StepStatus(enum.StrEnum):
    NOT_STARTED = "NOT_STARTED"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"


class ReplicationState(enum.StrEnum):
    INITIATING = "INITIATING"
    INITIAL_SYNC = "INITIAL_SYNC"
    RESCAN = "RESCAN"
    BACKLOG = "BACKLOG"
    CONTINUOUS = "CONTINUOUS"
    DISCONNECTED = "DISCONNECTED"
    STALLED = "STALLED"
    STOPPED = "STOPPED"


class ReplicationError(enum.StrEnum):
    """The service's failback error names (dataReplicationError.error in the DRS API reference)."""

    AGENT_NOT_SEEN = "AGENT_NOT_SEEN"
    NOT_CONVERGING = "NOT_CONVERGING"
    UNSTABLE_NETWORK = "UNSTABLE_NETWORK"
    FAILED_TO_CONFIGURE_REPLICATION_SOFTWARE = "FAILED_TO_CONFIGURE_REPLICATION_SOFTWARE"
    FAILED_TO_PAIR_AGENT_WITH_REPLICATION_SOFTWARE = "FAILED_TO_PAIR_AGENT_WITH_REPLICATION_SOFTWARE"
    FAILED_TO_ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION = (
        "FAILED_TO_ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION"
    )


class Command(enum.StrEnum):
    """GetFailbackCommandForDrs' FailbackCommand."""

    CONTINUE = "CONTINUE"
    FINAL_SYNC = "FINAL_SYNC"
    STOP = "STOP"
    COMPLETE = "COMPLETE"


@dataclass
class DiskProgress:
    """One replicated disk, in the shape of DRS' replicatedDisks[] entries."""

    device_name: str  # the recovery instance's device name
    target: str  # the local device or image file it lands on
    total_bytes: int
    replicated_bytes: int = 0
    rescanned_bytes: int = 0
    backlogged_bytes: int = 0
    rate_bps: float = 0.0  # recent bytes/s written for this disk

    def as_drs(self) -> dict[str, object]:
        return {
            "deviceName": self.device_name,
            "totalStorageBytes": self.total_bytes,
            "replicatedStorageBytes": self.replicated_bytes,
            "rescannedStorageBytes": self.rescanned_bytes,
            "backloggedStorageBytes": self.backlogged_bytes,
        }


@dataclass
class ReplicationSnapshot:
    state: ReplicationState
    disks: list[DiskProgress] = field(default_factory=list)
    lag_seconds: int = 0
    eta_seconds: float | None = None  # None = unknown
    throughput_bps: float = 0.0
    wire_bytes: int = 0  # bytes received on the link (after compression)


class StateReporter(Protocol):
    def initiation_step(self, step: InitiationStep, status: StepStatus) -> None: ...
    def replication_state(self, state: ReplicationState) -> None: ...
    def progress(self, snapshot: ReplicationSnapshot) -> None: ...
    def error(self, error: ReplicationError, raw: str) -> None: ...
    def error_cleared(self) -> None: ...
    def consistency_attained(self) -> None: ...  # ready for launch (CONTINUOUS after a clean verify)
    def completed(self) -> None: ...  # final sync flushed and verified


class CommandSource(Protocol):
    def poll(self) -> tuple[Command, int | None]:
        """The service's current command and bandwidth throttle in Mbps (0 = unlimited, None = unchanged)."""
        ...


class LoggingReporter:
    """Reports to the log only: the default, and what the CLI uses standalone."""

    def initiation_step(self, step: InitiationStep, status: StepStatus) -> None:
        log.info("initiation step %s: %s", step, status)

    def replication_state(self, state: ReplicationState) -> None:
        log.info("data replication state: %s", state)

    def progress(self, snapshot: ReplicationSnapshot) -> None:
        log.debug("progress: %s", snapshot)

    def error(self, error: ReplicationError, raw: str) -> None:
        log.error("replication error %s: %s", error, raw)

    def error_cleared(self) -> None:
        log.info("replication error cleared")

    def consistency_attained(self) -> None:
        log.info("consistency attained: ready for failback launch")

    def completed(self) -> None:
        log.info("final sync completed: the local volumes equal the recovery instance's")


class TeeReporter:
    """Fans every report out to several reporters (e.g. control plane + console progress)."""

    def __init__(self, *reporters: StateReporter) -> None:
        self.reporters = reporters

    def __getattr__(self, name: str) -> Callable[..., None]:
        def call(*args: Any, **kwargs: Any) -> None:
            for r in self.reporters:
                getattr(r, name)(*args, **kwargs)

        return call


class QueueCommandSource:
    """A command source fed by code (tests, the CLI's signal handlers, an adapter thread)."""

    def __init__(self, command: Command = Command.CONTINUE, throttle_mbps: int | None = None) -> None:
        self._lock = threading.Lock()
        self._command = command
        self._throttle = throttle_mbps
        self.changed = queue.SimpleQueue[Command]()

    def set(self, command: Command, throttle_mbps: int | None = -1) -> None:  # -1 = keep
        with self._lock:
            self._command = command
            if throttle_mbps != -1:
                self._throttle = throttle_mbps
        self.changed.put(command)

    def poll(self) -> tuple[Command, int | None]:
        with self._lock:
            return self._command, self._throttle
