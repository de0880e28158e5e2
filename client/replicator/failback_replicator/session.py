"""One TCP+TLS session with the agent and the policy between sessions: connect and pair (mutual
TLS, the agent's identity pinned), HELLO (protocol version, block digest, volumes), and
reconnecting with backoff until the agent is back, the service says stop, or a give-up time."""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import PROTOCOL_VERSION, __version__
from .blockio import BlockHasher, block_hasher
from .config import ReplicatorConfig
from .interfaces import (
    Command,
    CommandSource,
    InitiationStep,
    ReplicationError,
    ReplicationState,
    StateReporter,
    StepStatus,
)
from .reporting import Reports, Stats
from .targets import ReplicationFailed, Target, bind_targets
from .tlsconf import PairingError, client_context, require_identity
from .wire import (
    DIGEST_ALGORITHMS,
    DIGEST_SHA256,
    Connection,
    ProtocolError,
    available_codecs,
    available_digests,
)

log = logging.getLogger("failback_replicator")


class Outcome(enum.StrEnum):
    COMPLETED = "COMPLETED"  # final sync done: local volumes equal the source
    STOPPED = "STOPPED"  # the service said STOP (StopFailback) or COMPLETE


class StopRequested(Exception):
    pass


class AgentRefused(Exception):
    """The agent answered with an ERROR message."""


def expect(conn: Connection, op: str) -> dict:
    """The agent's next JSON message, which must be `op` (an ERROR becomes AgentRefused)."""
    msg = conn.recv_json()
    if msg["op"] == "ERROR":
        raise AgentRefused(f"{msg.get('error')}: {msg.get('message')}")
    if msg["op"] != op:
        raise ProtocolError(f"expected {op}, agent sent {msg['op']}")
    return msg


class Link:
    """The replicator's link to the agent across sessions: pairing and HELLO state, the session's
    block digest, and the reconnect policy."""

    def __init__(
        self,
        cfg: ReplicatorConfig,
        reporter: StateReporter,
        reports: Reports,
        stats: Stats,
        targets: list[Target],
        commands: CommandSource,
        sleep: Callable[[float], None],
    ) -> None:
        self.cfg = cfg
        self.reporter = reporter
        self.reports = reports
        self.stats = stats
        self.targets = targets
        self.commands = commands
        self.sleep = sleep
        self.paired = False
        self.established = False
        self.conn: Connection | None = None  # the live session's connection
        self.hash: BlockHasher = block_hasher(DIGEST_SHA256)  # the session's block digest (HELLO)

    def run(self, session: Callable[[Connection], Outcome]) -> Outcome:
        """Runs `session` on each new connection until one returns; reconnects after network errors."""
        backoff = 1.0
        down_since: float | None = None
        while True:
            self._check_stop_while_down()
            try:
                conn = self.connect()
                down_since = None
                backoff = 1.0
                try:
                    return session(conn)
                finally:
                    self.stats.wire_bytes_in += conn.bytes_in
                    self.conn = None
                    with contextlib.suppress(OSError):
                        conn.sock.close()
            except StopRequested:
                self.reports.set_state(ReplicationState.STOPPED)
                return Outcome.STOPPED
            except (PairingError, ssl.SSLCertVerificationError, AgentRefused) as exc:
                self._pairing_failed(
                    f"pairing with the agent at {self.cfg.agent_host}:{self.cfg.agent_port} failed: {exc}", exc
                )
            except (OSError, ConnectionError, ProtocolError, ssl.SSLError) as exc:
                if _is_pairing_alert(exc):
                    self._pairing_failed(
                        f"the agent at {self.cfg.agent_host}:{self.cfg.agent_port} refused our certificate: {exc}", exc
                    )
                now = time.monotonic()
                if down_since is None:
                    down_since = now
                was_up = self.established
                self.reports.set_state(ReplicationState.DISCONNECTED if was_up else ReplicationState.INITIATING)
                what = _describe_network_error(exc, self.cfg.agent_host, self.cfg.agent_port)
                if now - down_since >= self.cfg.agent_not_seen_after:
                    self.reports.report_error(ReplicationError.AGENT_NOT_SEEN, what)
                elif was_up:
                    self.reports.report_error(ReplicationError.UNSTABLE_NETWORK, what)
                else:
                    log.warning("agent not reachable yet: %s", what)
                if self.cfg.give_up_after is not None and now - down_since >= self.cfg.give_up_after:
                    error = (
                        ReplicationError.AGENT_NOT_SEEN if not self.established else ReplicationError.UNSTABLE_NETWORK
                    )
                    if not self.established:
                        self.reporter.initiation_step(
                            InitiationStep.ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION
                            if self.paired
                            else InitiationStep.PAIR_AGENT_WITH_REPLICATION_SOFTWARE,
                            StepStatus.FAILED,
                        )
                    raise ReplicationFailed(error, f"gave up after {self.cfg.give_up_after:.0f} s: {what}") from exc
                log.info("reconnecting in %.0f s", backoff)
                self.sleep(backoff)
                backoff = min(backoff * 2, 15.0)

    def _pairing_failed(self, msg: str, exc: BaseException) -> None:
        """A certificate or identity problem does not heal by retrying: report it and give up."""
        if not self.established:
            step = (
                InitiationStep.ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION
                if self.paired
                else InitiationStep.PAIR_AGENT_WITH_REPLICATION_SOFTWARE
            )
            self.reporter.initiation_step(step, StepStatus.FAILED)
        log.error("%s", msg)
        self.reports.report_error(ReplicationError.FAILED_TO_PAIR_AGENT_WITH_REPLICATION_SOFTWARE, msg)
        raise ReplicationFailed(ReplicationError.FAILED_TO_PAIR_AGENT_WITH_REPLICATION_SOFTWARE, msg) from exc

    def _check_stop_while_down(self) -> None:
        cmd, _ = self.commands.poll()
        if cmd in (Command.STOP, Command.COMPLETE):
            raise StopRequested()

    def connect(self) -> Connection:
        if not self.paired:
            self.reporter.initiation_step(InitiationStep.PAIR_AGENT_WITH_REPLICATION_SOFTWARE, StepStatus.IN_PROGRESS)
        ctx = client_context(self.cfg.tls)
        raw = socket.create_connection((self.cfg.agent_host, self.cfg.agent_port), timeout=self.cfg.connect_timeout)
        try:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = ctx.wrap_socket(raw, server_hostname=None)
            require_identity(sock, {self.cfg.agent_identity}, "agent")
        except BaseException:
            raw.close()
            raise
        sock.settimeout(self.cfg.io_timeout)
        self.stats.sessions += 1
        cipher = sock.cipher()
        log.info(
            "paired with agent %s at %s:%d (%s, %s)",
            self.cfg.agent_identity,
            self.cfg.agent_host,
            self.cfg.agent_port,
            sock.version(),
            cipher[0] if cipher else "?",
        )
        if not self.paired:
            self.paired = True
            self.reporter.initiation_step(InitiationStep.PAIR_AGENT_WITH_REPLICATION_SOFTWARE, StepStatus.SUCCEEDED)
        conn = Connection(sock)
        self.conn = conn
        return conn

    def hello(self, conn: Connection) -> None:
        if not self.established:
            self.reporter.initiation_step(
                InitiationStep.ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION, StepStatus.IN_PROGRESS
            )
        offered = [a for a in (self.cfg.digests or DIGEST_ALGORITHMS) if a in available_digests()]
        if not offered:
            raise ReplicationFailed(
                ReplicationError.FAILED_TO_CONFIGURE_REPLICATION_SOFTWARE,
                f"none of the configured block digests {list(self.cfg.digests or ())} is available here "
                f"(have: {', '.join(available_digests())})",
            )
        hello = {
            "op": "HELLO",
            "version": PROTOCOL_VERSION,
            "software": f"failback-replicator/{__version__}",
            "client": self.cfg.client_identity,
            "recovery_instance": self.cfg.recovery_instance_id,
            "block_size": self.cfg.block_size,
            "codecs": available_codecs(),
            "digests": offered,
        }
        conn.send_json(hello)
        reply = conn.recv_json()
        if reply["op"] == "ERROR" and reply.get("error") == "VERSION" and DIGEST_SHA256 in offered:
            # A version-1 agent refuses HELLO 2 but keeps the connection: say HELLO again in version 1,
            # whose only digest is SHA-256.
            log.info("the agent speaks protocol version 1 (%s): using version 1, SHA-256", reply.get("message"))
            hello = {k: v for k, v in hello.items() if k != "digests"} | {"version": 1}
            conn.send_json(hello)
            reply = conn.recv_json()
        if reply["op"] == "ERROR":
            raise AgentRefused(f"{reply.get('error')}: {reply.get('message')}")
        if reply["op"] != "HELLO":
            raise ProtocolError(f"expected HELLO, agent sent {reply['op']}")
        version = hello["version"]
        assert isinstance(version, int)  # the HELLO above sets it
        if reply.get("version") != version:
            raise AgentRefused(f"agent speaks protocol version {reply.get('version')}, we speak {version}")
        algorithm = reply.get("digest") if version >= 2 else DIGEST_SHA256
        if algorithm not in offered:  # does not heal by reconnecting: refused, like a version mismatch
            raise AgentRefused(f"agent picked block digest {algorithm!r}, we offered {offered}")
        self.hash = block_hasher(algorithm)
        self.stats.protocol_version, self.stats.digest_algorithm = version, algorithm
        log.info("agent: protocol version %d, block digest %s, codec %s", version, algorithm, reply.get("codec"))
        if reply.get("recovery_instance") != self.cfg.recovery_instance_id:
            raise AgentRefused(
                f"agent serves recovery instance {reply.get('recovery_instance')!r}, "
                f"not {self.cfg.recovery_instance_id!r}"
            )
        bind_targets(self.cfg, self.targets, reply["volumes"], self.hash.algorithm)
        if not self.established:
            self.established = True
            self.reporter.initiation_step(
                InitiationStep.ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION, StepStatus.SUCCEEDED
            )


@dataclass(frozen=True)
class EngineContext:
    """What the engine's steps (compare.Comparer, transfer.BlockTransfer) share: the configuration, the link
    (its session's block digest), the reports and counters, and the lock the reader/writer threads take to
    update counters and digests."""

    cfg: ReplicatorConfig
    link: Link
    reports: Reports
    stats: Stats
    stats_lock: threading.Lock


_PAIRING_ALERTS = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "CERTIFICATE_REQUIRED", "ACCESS_DENIED")


def _is_pairing_alert(exc: BaseException) -> bool:
    """TLS alerts by which the agent says it does not accept our certificate (TLS 1.3 sends them
    after our side of the handshake is done, so they surface on the first read)."""
    reason = str(getattr(exc, "reason", "") or "")
    return isinstance(exc, ssl.SSLError) and any(a in reason.upper() for a in _PAIRING_ALERTS)


def _describe_network_error(exc: BaseException, host: str, port: int) -> str:
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return f"connection to the agent at {host}:{port} refused (is the agent running? TCP {port} open?)"
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"no answer from the agent at {host}:{port} (security group / route / proxy on TCP {port}?)"
    return f"link to the agent at {host}:{port} lost: {exc.__class__.__name__}: {exc}"
