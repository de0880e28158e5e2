"""The replication engine: pairs with the agent, brings every mapped volume in sync, keeps it in
sync until the service asks for the final sync, and resumes from the journal after any interruption.

Every session (a TCP+TLS connection) runs the same idempotent steps, so resuming after a cut is
not a special case: compare the source's block digests with what the journal says is verified
locally, fetch what differs (verifying each block on arrival), verify both sides in full, then
follow the source's changes.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import queue
import socket
import ssl
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import PROTOCOL_VERSION, __version__
from .blockio import (
    BlockHasher,
    block_count,
    block_hasher,
    block_span,
    device_size,
    drop_cache,
    is_block_device,
    open_volume,
    read_block_into,
    write_all,
    write_zeros,
)
from .buffers import BufferPool, window_for
from .config import ConfigError, ReplicatorConfig, VolumeMapping
from .interfaces import (
    Command,
    CommandSource,
    DiskProgress,
    InitiationStep,
    LoggingReporter,
    QueueCommandSource,
    ReplicationError,
    ReplicationSnapshot,
    ReplicationState,
    StateReporter,
    StepStatus,
)
from .journal import DigestTable, Journal
from .throttle import TokenBucket
from .tlsconf import PairingError, client_context, require_identity
from .wire import (
    BLOCK_HEADER_SIZE,
    CODEC_ZERO,
    DIGEST_ALGORITHMS,
    DIGEST_SHA256,
    DIGEST_SIZE,
    FRAME_BLOCK,
    FRAME_DIGESTS,
    FRAME_JSON,
    Connection,
    Decoder,
    ProtocolError,
    available_codecs,
    available_digests,
    parse_block,
    parse_digest_frame,
    parse_json,
    to_ranges,
)

log = logging.getLogger("failback_replicator")


class Outcome(enum.StrEnum):
    COMPLETED = "COMPLETED"  # final sync done: local volumes equal the source
    STOPPED = "STOPPED"  # the service said STOP (StopFailback) or COMPLETE


class ReplicationFailed(Exception):
    """Unrecoverable: carries the DRS error name reported before raising."""

    def __init__(self, error: ReplicationError, message: str) -> None:
        super().__init__(f"{error}: {message}")
        self.error = error


class _StopRequested(Exception):
    pass


class AgentRefused(Exception):
    """The agent answered with an ERROR message."""


@dataclass
class Stats:
    """Counters for tests and the benchmark (what was really sent and written)."""

    sessions: int = 0
    blocks_fetched: int = 0
    bytes_written: int = 0
    wire_bytes_in: int = 0
    digest_failures: int = 0
    verify_passes: int = 0
    local_blocks_read: int = 0
    blocks_received: int = 0  # every block that arrived, checkpointed or not (resume cost)
    transfer_seconds: float = 0.0  # time spent streaming blocks
    ready_seconds: float | None = None  # run() start -> first consistency attained
    protocol_version: int = 0  # negotiated with the agent in the last session
    digest_algorithm: str = ""  # block digest negotiated in the last session
    # Every block index fetched, in order (tests, benchmark): 8 bytes a block in an array('q'),
    # not ~40 in a list of ints, since it grows for as long as continuous replication runs.
    fetched_by_volume: dict[str, array] = field(default_factory=dict)


@dataclass
class _Target:
    mapping: VolumeMapping
    fd: int
    size: int  # source volume size (the local device may be larger)
    blocks: int
    journal: Journal
    progress: DiskProgress
    index: int = -1  # the agent's volume index in this session
    generation: int = 0  # agent generation the local copy is known to match
    need_bytes: int = 0
    # Blocks whose on-disk contents have not been read back since this process wrote them (or since
    # it started: a reboot may have happened): one byte per block, 1 = to read back. The
    # verification pass re-reads exactly these.
    readback: bytearray = field(default_factory=bytearray)
    # Blocks the journal vouched for under another digest algorithm (one byte a block, 1 = re-read
    # locally to recompute its digest before comparing), or None.
    recompute: bytearray | None = None

    @property
    def local(self) -> DigestTable:
        return self.journal.verified


class _RateMeter:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.bytes = 0
        self.rate = 0.0
        self._last = self.start
        self._acc = 0

    def add(self, n: int) -> None:
        self.bytes += n
        self._acc += n
        now = time.monotonic()
        if now - self._last >= 0.5:
            inst = self._acc / (now - self._last)
            self.rate = inst if not self.rate else 0.7 * self.rate + 0.3 * inst
            self._last, self._acc = now, 0


class Replicator:
    def __init__(
        self,
        config: ReplicatorConfig,
        reporter: StateReporter | None = None,
        commands: CommandSource | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        config.validate()
        self.cfg = config
        self.reporter: StateReporter = reporter or LoggingReporter()
        self.commands: CommandSource = commands or QueueCommandSource()
        self.stats = Stats()
        self._stats_lock = threading.Lock()
        self._sleep = sleep
        self._targets: list[_Target] = []
        self._bucket = TokenBucket(config.bandwidth_mbps)
        self._throttle_mbps = config.bandwidth_mbps
        self._state = ReplicationState.INITIATING
        self._paired = False
        self._established = False
        self._error: ReplicationError | None = None
        self._last_report = 0.0
        self._in_sync_since: float | None = None
        self._session_start = time.monotonic()
        self._meter = _RateMeter()
        self._conn: Connection | None = None
        self._hash: BlockHasher = block_hasher(DIGEST_SHA256)  # the session's block digest (HELLO)

    # ------------------------------------------------------------------ public
    def run(self) -> Outcome:
        """Replicates until the final sync is done (COMPLETED) or the service says STOP."""
        self._run_started = time.perf_counter()
        try:
            self._open_targets()
        except (OSError, ConfigError) as exc:
            self.reporter.error(ReplicationError.FAILED_TO_CONFIGURE_REPLICATION_SOFTWARE, str(exc))
            raise ReplicationFailed(ReplicationError.FAILED_TO_CONFIGURE_REPLICATION_SOFTWARE, str(exc)) from exc
        try:
            return self._run_sessions()
        except ReplicationFailed as exc:
            if exc.error is ReplicationError.FAILED_TO_CONFIGURE_REPLICATION_SOFTWARE and not self._established:
                self.reporter.initiation_step(
                    InitiationStep.ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION, StepStatus.FAILED
                )
            if self._error is not exc.error:
                self._report_error(exc.error, str(exc).split(": ", 1)[-1])
            raise
        finally:
            for t in self._targets:
                try:
                    os.fsync(t.fd)
                    os.close(t.fd)
                except OSError:
                    pass

    # ------------------------------------------------------------------ set-up
    def _open_targets(self) -> None:
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        for m in self.cfg.volumes:
            fd = open_volume(m.target, writable=True)
            local_size = device_size(fd)
            progress = DiskProgress(device_name=m.recovery_device, target=str(m.target), total_bytes=0)
            # Size and journal are settled once the agent tells us the source size (HELLO).
            self._targets.append(
                _Target(mapping=m, fd=fd, size=local_size, blocks=0, journal=None, progress=progress)  # type: ignore[arg-type]
            )
            log.info(
                "target %s: %d bytes (%s)", m.target, local_size, "block device" if is_block_device(fd) else "file"
            )

    def _bind_targets(self, volumes: list[dict]) -> None:
        by_name = {v["name"]: (i, int(v["size"])) for i, v in enumerate(volumes)}
        for t in self._targets:
            name = t.mapping.recovery_device
            if name not in by_name:
                raise ReplicationFailed(
                    ReplicationError.FAILED_TO_CONFIGURE_REPLICATION_SOFTWARE,
                    f"the agent has no volume {name!r} (it serves: {', '.join(sorted(by_name))}); "
                    "fix the device mapping",
                )
            index, size = by_name[name]
            local_size = device_size(t.fd)
            if local_size < size:
                raise ReplicationFailed(
                    ReplicationError.FAILED_TO_CONFIGURE_REPLICATION_SOFTWARE,
                    f"{t.mapping.target} holds {local_size} bytes but recovery volume {name} needs {size}",
                )
            t.index = index
            if t.journal is None or t.size != size:
                t.readback = bytearray(b"\x01") * block_count(size, self.cfg.block_size)
                t.size = size
                t.blocks = block_count(size, self.cfg.block_size)
                identity = {
                    "recovery_instance": self.cfg.recovery_instance_id,
                    "volume": name,
                    "size": size,
                    "block_size": self.cfg.block_size,
                    "target": str(t.mapping.target),
                }
                safe = "".join(c if c.isalnum() else "_" for c in name).strip("_")
                path = Path(self.cfg.state_dir) / f"journal-{safe}.bin"
                t.journal, how = Journal.load_or_new(path, identity, t.blocks, self._hash.algorithm)
                log.info("%s: %s", name, how)
                t.progress.total_bytes = size
            # Digests of another algorithm (an older journal, or the last session negotiated another
            # one) are never compared with this session's: the blocks they vouched for are re-read.
            was = t.journal.digest
            vouched = t.journal.adopt_digest(self._hash.algorithm)
            if vouched is not None:
                t.recompute = vouched
                log.info(
                    "%s: journal digests are %s, this session's are %s: %d verified block(s) will be re-read "
                    "locally to recompute them",
                    name, was, self._hash.algorithm, vouched.count(1),
                )  # fmt: skip

    # ------------------------------------------------------------------ sessions
    def _run_sessions(self) -> Outcome:
        backoff = 1.0
        down_since: float | None = None
        while True:
            self._check_stop_while_down()
            try:
                conn = self._connect()
                down_since = None
                backoff = 1.0
                try:
                    return self._session(conn)
                finally:
                    self.stats.wire_bytes_in += conn.bytes_in
                    self._conn = None
                    with contextlib.suppress(OSError):
                        conn.sock.close()
            except _StopRequested:
                self._set_state(ReplicationState.STOPPED)
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
                was_up = self._established
                self._set_state(ReplicationState.DISCONNECTED if was_up else ReplicationState.INITIATING)
                what = _describe_network_error(exc, self.cfg.agent_host, self.cfg.agent_port)
                if now - down_since >= self.cfg.agent_not_seen_after:
                    self._report_error(ReplicationError.AGENT_NOT_SEEN, what)
                elif was_up:
                    self._report_error(ReplicationError.UNSTABLE_NETWORK, what)
                else:
                    log.warning("agent not reachable yet: %s", what)
                if self.cfg.give_up_after is not None and now - down_since >= self.cfg.give_up_after:
                    error = (
                        ReplicationError.AGENT_NOT_SEEN if not self._established else ReplicationError.UNSTABLE_NETWORK
                    )
                    if not self._established:
                        self.reporter.initiation_step(
                            InitiationStep.ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION
                            if self._paired
                            else InitiationStep.PAIR_AGENT_WITH_REPLICATION_SOFTWARE,
                            StepStatus.FAILED,
                        )
                    raise ReplicationFailed(error, f"gave up after {self.cfg.give_up_after:.0f} s: {what}") from exc
                log.info("reconnecting in %.0f s", backoff)
                self._sleep(backoff)
                backoff = min(backoff * 2, 15.0)

    def _pairing_failed(self, msg: str, exc: BaseException) -> None:
        """A certificate or identity problem does not heal by retrying: report it and give up."""
        if not self._established:
            step = (
                InitiationStep.ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION
                if self._paired
                else InitiationStep.PAIR_AGENT_WITH_REPLICATION_SOFTWARE
            )
            self.reporter.initiation_step(step, StepStatus.FAILED)
        log.error("%s", msg)
        self._report_error(ReplicationError.FAILED_TO_PAIR_AGENT_WITH_REPLICATION_SOFTWARE, msg)
        raise ReplicationFailed(ReplicationError.FAILED_TO_PAIR_AGENT_WITH_REPLICATION_SOFTWARE, msg) from exc

    def _check_stop(self) -> None:
        cmd, mbps = self.commands.poll()
        self._apply_throttle(mbps)
        if cmd in (Command.STOP, Command.COMPLETE):
            raise _StopRequested()

    def _check_stop_while_down(self) -> None:
        cmd, _ = self.commands.poll()
        if cmd in (Command.STOP, Command.COMPLETE):
            raise _StopRequested()

    def _connect(self) -> Connection:
        if not self._paired:
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
        log.info(
            "paired with agent %s at %s:%d (%s, %s)",
            self.cfg.agent_identity,
            self.cfg.agent_host,
            self.cfg.agent_port,
            sock.version(),
            sock.cipher()[0] if sock.cipher() else "?",
        )
        if not self._paired:
            self._paired = True
            self.reporter.initiation_step(InitiationStep.PAIR_AGENT_WITH_REPLICATION_SOFTWARE, StepStatus.SUCCEEDED)
        conn = Connection(sock)
        self._conn = conn
        return conn

    def _hello(self, conn: Connection) -> None:
        if not self._established:
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
        if reply.get("version") != hello["version"]:
            raise AgentRefused(f"agent speaks protocol version {reply.get('version')}, we speak {hello['version']}")
        algorithm = reply.get("digest") if hello["version"] >= 2 else DIGEST_SHA256
        if algorithm not in offered:  # does not heal by reconnecting: refused, like a version mismatch
            raise AgentRefused(f"agent picked block digest {algorithm!r}, we offered {offered}")
        self._hash = block_hasher(algorithm)
        self.stats.protocol_version, self.stats.digest_algorithm = hello["version"], algorithm
        log.info(
            "agent: protocol version %d, block digest %s, codec %s", hello["version"], algorithm, reply.get("codec")
        )
        if reply.get("recovery_instance") != self.cfg.recovery_instance_id:
            raise AgentRefused(
                f"agent serves recovery instance {reply.get('recovery_instance')!r}, "
                f"not {self.cfg.recovery_instance_id!r}"
            )
        self._bind_targets(reply["volumes"])
        if not self._established:
            self._established = True
            self.reporter.initiation_step(
                InitiationStep.ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION, StepStatus.SUCCEEDED
            )

    def _expect(self, conn: Connection, op: str) -> dict:
        msg = conn.recv_json()
        if msg["op"] == "ERROR":
            raise AgentRefused(f"{msg.get('error')}: {msg.get('message')}")
        if msg["op"] != op:
            raise ProtocolError(f"expected {op}, agent sent {msg['op']}")
        return msg

    # ------------------------------------------------------------------ one session
    def _session(self, conn: Connection) -> Outcome:
        self._hello(conn)
        self._clear_error()
        self._session_start = time.monotonic()
        first = all(t.journal.phase == "SYNC" for t in self._targets)
        self._set_state(ReplicationState.RESCAN if (self.cfg.rescan or not first) else ReplicationState.INITIAL_SYNC)
        self._converge(conn, full_verify=True)
        for t in self._targets:
            t.journal.phase = "VERIFIED"
            t.journal.save()
        self._in_sync_since = time.monotonic()
        self._set_state(ReplicationState.CONTINUOUS)
        self._report_progress(force=True)
        if self.stats.ready_seconds is None:
            self.stats.ready_seconds = time.perf_counter() - self._run_started
        self.reporter.consistency_attained()
        while True:
            cmd, mbps = self.commands.poll()
            self._apply_throttle(mbps)
            if cmd in (Command.STOP, Command.COMPLETE):
                log.info("service command %s: stopping replication", cmd)
                self._bye(conn)
                self._set_state(ReplicationState.STOPPED)
                return Outcome.STOPPED
            if cmd is Command.FINAL_SYNC:
                log.info("failback launch requested: final sync")
                conn.send_json({"op": "SCAN"})
                self._expect(conn, "SCAN")
                self._follow_changes(conn, wait=0.0)
                # SCAN + CHANGES already brought the last writes: go straight to the verification.
                self._converge(conn, full_verify=True, compare_first=False)
                self.reporter.completed()
                self._bye(conn)
                return Outcome.COMPLETED
            self._follow_changes(conn, wait=self.cfg.changes_wait)
            self._report_progress()

    def _bye(self, conn: Connection) -> None:
        with contextlib.suppress(OSError):
            conn.send_json({"op": "BYE"})

    def _apply_throttle(self, mbps: int | None) -> None:
        # None: the service did not say (keep the configured value); 0: no throttling.
        if mbps is not None and mbps != self._throttle_mbps:
            log.info("bandwidth throttling: %s", f"{mbps} Mbps" if mbps else "off")
            self._throttle_mbps = mbps
            self._bucket.set_rate(mbps)

    # ------------------------------------------------------------------ sync steps
    def _converge(self, conn: Connection, full_verify: bool, compare_first: bool = True) -> None:
        """Fetch until source digests equal local ones; with full_verify, first read back every block
        written (or never read) since the last read-back and compare it too."""
        if compare_first:
            self._fetch_all(conn, self._compare(conn, reread_local=False))
        rounds = 0
        while True:
            rounds += 1
            need = self._compare(conn, reread_local=full_verify)
            if full_verify:
                self.stats.verify_passes += 1
                full_verify = False
            if not any(need.values()):
                return
            n = sum(len(v) for v in need.values())
            log.info("verification found %d block(s) that differ (changed on the source meanwhile?); fetching", n)
            if rounds >= self.cfg.max_converge_rounds:
                self._report_error(ReplicationError.NOT_CONVERGING, f"{n} block(s) still differ after {rounds} rounds")
            self._fetch_all(conn, need)

    def _compare(self, conn: Connection, reread_local: bool) -> dict[int, Sequence[int]]:
        """Asks the agent for fresh digests of every volume and lists the blocks that differ locally."""
        need: dict[int, Sequence[int]] = {}
        for t in self._targets:
            if not reread_local and not self.cfg.rescan and t.local.known == 0 and t.recompute is None:
                # A full sync with nothing verified yet: every block is needed, no digests to compare.
                need[t.index] = range(t.blocks)
                t.need_bytes = t.size
                t.progress.backlogged_bytes, t.progress.replicated_bytes = t.size, 0
                log.info("%s: full sync of %d blocks (%d bytes)", t.mapping.recovery_device, t.blocks, t.size)
                continue
            # Blocks with no trusted local digest are read locally when we expect them to be
            # mostly equal (rescan, or a verification pass); in a full sync they are just fetched.
            local_result: list[BaseException] = []
            indices: list[int] = []
            if reread_local:
                # Verification: read back whatever this process wrote (or never read) since its last read.
                marks = bytearray(t.readback)
                for i in t.local.unknown():
                    marks[i] = 1
                indices = [i for i, m in enumerate(marks) if m]
                drop_cache(t.fd)
            elif self.cfg.rescan:
                indices = list(t.local.unknown())
            elif t.recompute is not None:  # a full sync that already verified blocks under another digest
                indices = [i for i, m in enumerate(t.recompute) if m]
            t.recompute = None
            local_jobs = []
            hashed: queue.SimpleQueue[int] = queue.SimpleQueue()  # blocks whose local digest is known
            halt = threading.Event()
            if indices:
                # Two readers: hashing releases the GIL, so a local rescan uses both cores of a small
                # box -- and runs while the agent digests its side (the DIGESTS request goes out now).
                for part in (indices[0::2], indices[1::2]):
                    job = threading.Thread(target=self._digest_local, args=(t, part, local_result, hashed, halt))
                    job.start()
                    local_jobs.append(job)
            early = 0
            try:
                source = self._source_digests(conn, t)
                if local_jobs and not reread_local:
                    early = self._fetch_while_hashing(conn, t, source, local_jobs, local_result, hashed)
            except BaseException:
                halt.set()  # the readers must not outlive this (the caller may close the device)
                raise
            finally:
                for job in local_jobs:
                    job.join()
            if local_result:
                raise local_result[0]
            differ = t.local.differing(source)
            need[t.index] = differ
            t.need_bytes = sum(block_span(i, t.size, self.cfg.block_size)[1] for i in differ)
            t.progress.backlogged_bytes = t.need_bytes
            t.progress.replicated_bytes = t.size - t.need_bytes
            log.info(
                "%s: %d of %d blocks differ (%d bytes)%s%s",
                t.mapping.recovery_device,
                len(differ),
                t.blocks,
                t.need_bytes,
                f" [verification pass, {len(indices)} block(s) read back]" if reread_local else "",
                f" [{early} more fetched during the rescan]" if early else "",
            )
        self._report_progress(force=True)
        return need

    def _source_digests(self, conn: Connection, t: _Target) -> bytearray:
        """The agent's digests of every block of the volume, packed (32 bytes a block)."""
        conn.send_json({"op": "DIGESTS", "volume": t.index})
        source = bytearray()
        while True:
            ftype, body = conn.recv_frame()
            if ftype == FRAME_DIGESTS:
                vol, first, packed = parse_digest_frame(body)
                if vol != t.index or first != len(source) // DIGEST_SIZE:
                    raise ProtocolError("digest frames out of order")
                source += packed
                t.progress.rescanned_bytes = min(t.size, len(source) // DIGEST_SIZE * self.cfg.block_size)
                self._report_progress()
            elif ftype == FRAME_JSON:
                msg = parse_json(body)
                if msg["op"] == "ERROR":
                    raise AgentRefused(f"{msg.get('error')}: {msg.get('message')}")
                if msg["op"] != "DIGESTS":
                    raise ProtocolError(f"expected DIGESTS, agent sent {msg['op']}")
                t.generation = int(msg["generation"])
                break
            else:
                raise ProtocolError(f"unexpected frame type {ftype} in a digest list")
        if len(source) != t.blocks * DIGEST_SIZE:
            raise ProtocolError(f"agent sent {len(source) // DIGEST_SIZE} digests for {t.blocks} blocks")
        return source

    def _digest_local(
        self,
        t: _Target,
        indices: list[int],
        result: list,
        hashed: queue.SimpleQueue[int],
        halt: threading.Event,
    ) -> None:
        try:
            buf = bytearray(self.cfg.block_size)  # one per reader thread, reused for every block
            for i in indices:
                if halt.is_set():
                    return
                d = self._hash(read_block_into(t.fd, i, t.size, self.cfg.block_size, buf))
                with self._stats_lock:
                    t.local[i] = d
                    t.readback[i] = 0
                    self.stats.local_blocks_read += 1
                hashed.put(i)
        except BaseException as exc:  # surfaced in the calling thread
            result.append(exc)

    def _fetch_while_hashing(
        self,
        conn: Connection,
        t: _Target,
        source: bytearray,
        jobs: list[threading.Thread],
        errors: list[BaseException],
        hashed: queue.SimpleQueue[int],
    ) -> int:
        """A rescan reads the whole local disk (minutes on a big one): the blocks found to differ
        are fetched while the readers go on, so the link does not wait for the last block to be
        read. What is found after the readers end is left to the caller's comparison of the whole
        table. Returns how many blocks it fetched.

        A checkpoint may write the journal while a reader stores a digest: the journal then holds
        a torn digest for that one block, which can only differ from the source's (a refetch)."""
        fetched = 0
        pending: list[int] = []
        since = 0.0  # when the oldest pending block was found
        t.need_bytes = 0  # the backlog during a rescan: what it found to differ and has not fetched yet
        while not errors:
            # Sleep until the readers end, a pending block is due, or a quarter second passed (not
            # woken per block: that would take the GIL from the readers 256 times a GiB).
            deadline = since + 0.5 if pending else time.monotonic() + 0.25
            for job in jobs:
                job.join(timeout=max(0.0, deadline - time.monotonic()))
            running = any(job.is_alive() for job in jobs)
            with contextlib.suppress(queue.Empty):
                while True:
                    i = hashed.get_nowait()
                    if t.local[i] != bytes(source[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]):
                        since = since if pending else time.monotonic()
                        pending.append(i)
            if not running:
                break
            if len(pending) >= self.cfg.checkpoint_blocks or (pending and time.monotonic() - since >= 0.5):
                pending.sort()
                n_bytes = sum(block_span(i, t.size, self.cfg.block_size)[1] for i in pending)
                t.need_bytes += n_bytes
                t.progress.backlogged_bytes = t.need_bytes
                self._fetch(conn, t, pending)
                fetched += len(pending)
                pending = []
        return fetched

    def _follow_changes(self, conn: Connection, wait: float) -> None:
        conn.send_json({"op": "CHANGES", "since": {str(t.index): t.generation for t in self._targets}, "wait": wait})
        msg = self._expect(conn, "CHANGES")
        changed = {int(k): [i for s, c in v for i in range(s, s + c)] for k, v in msg["changed"].items()}
        if any(changed.values()):
            if self._in_sync_since is not None:
                self._set_state(ReplicationState.CONTINUOUS)
            self._fetch_all(conn, changed)
        for t in self._targets:
            t.generation = int(msg["generations"][str(t.index)])
        self._in_sync_since = time.monotonic()

    # ------------------------------------------------------------------ block transfer
    def _fetch_all(self, conn: Connection, need: dict[int, Sequence[int]]) -> None:
        for t in self._targets:
            blocks = need.get(t.index, [])
            if blocks:
                self._fetch(conn, t, blocks)

    def _fetch(self, conn: Connection, t: _Target, wanted: Sequence[int]) -> None:
        """Streams `wanted` blocks from the agent into the target, checkpointing the journal.

        This thread receives (decryption); a writer thread decodes, verifies, writes and
        checkpoints (fdatasync + journal) in order, so the link keeps flowing during a checkpoint.
        The next batch is requested before the current one is received, so the agent never idles.
        Memory: every block between the socket and the disk sits in one buffer of a fixed pool
        (`window_for(block_size)` buffers); when the writer falls behind, this thread waits for a
        free buffer and TCP flow control stops the agent.
        """
        bs = self.cfg.block_size
        # Each checkpoint rewrites the whole journal (32 bytes per block): on big volumes checkpoint
        # less often so journal writes stay under ~5 % of the data written.
        cp = max(self.cfg.checkpoint_blocks, t.blocks * DIGEST_SIZE * 20 // bs)
        batches = [wanted[i : i + cp] for i in range(0, len(wanted), cp)]
        t.journal.mark_inflight(batches[0])
        t.journal.save()
        pool = BufferPool(window_for(bs), bs + BLOCK_HEADER_SIZE)
        # Unbounded in type only: block items each hold a pool buffer, and there is one checkpoint
        # item per batch (a batch is longer than the pool, so at most two are ever queued).
        work: queue.SimpleQueue = queue.SimpleQueue()
        checkpoints: deque[dict[int, bytes]] = deque()  # made durable by the writer, reported here
        to_read_back: queue.SimpleQueue = queue.SimpleQueue()  # checkpointed batches, for the verifier
        failures: list[int] = []
        errors: list[BaseException] = []
        hasher = self._hash

        def verifier() -> None:
            """Reads each checkpointed batch back from the device while the transfer goes on, so the
            verification pass after the sync has (almost) nothing left to re-read."""
            buf = bytearray(bs)
            while (batch := to_read_back.get()) is not None:
                if errors:
                    continue
                try:
                    for start, count in to_ranges(batch):
                        drop_cache(t.fd, start * bs, count * bs)
                    for i in batch:
                        if not t.readback[i]:
                            continue
                        d = hasher(read_block_into(t.fd, i, t.size, bs, buf))
                        with self._stats_lock:
                            self.stats.local_blocks_read += 1
                            if d != t.local[i]:  # the device does not hold what was written
                                log.warning("%s block %d reads back wrong", t.mapping.recovery_device, i)
                                t.local[i] = d  # the verification pass will see it differ: refetched
                            t.readback[i] = 0
                except BaseException as exc:
                    errors.append(exc)

        def writer() -> None:
            decoder = Decoder()
            done: dict[int, bytes] = {}
            while (item := work.get()) is not None:
                if len(item) == 2:  # checkpoint: data durable first, then the journal says so
                    batch, nxt = item
                    if errors:
                        continue
                    try:
                        os.fdatasync(t.fd)
                        verified = {i: done.pop(i) for i in batch if i in done}
                        with self._stats_lock:
                            t.journal.mark_verified(verified, nxt)
                        t.journal.save()
                        checkpoints.append(verified)
                        to_read_back.put(list(verified))
                    except BaseException as exc:
                        errors.append(exc)
                    continue
                index, codec, raw_len, dig, payload, buf = item
                try:
                    if errors:
                        continue
                    off, length = block_span(index, t.size, bs)
                    if length != raw_len:
                        raise ProtocolError(f"block {index} has {raw_len} bytes, expected {length}")
                    # A zero block (free space) carries no data: its digest must be the zero digest,
                    # and the kernel zeroes the range (no 1 MiB of zeros hashed and copied here).
                    zero = codec == CODEC_ZERO
                    data = None if zero else decoder.decode(codec, payload, raw_len)
                    if (hasher.zero(raw_len) if zero else hasher(data)) != dig:
                        failures.append(index)
                        log.warning(
                            "%s block %d failed verification on arrival: refetching", t.mapping.recovery_device, index
                        )
                        continue
                    if zero:
                        write_zeros(t.fd, off, length)
                    else:
                        write_all(t.fd, data, off)
                    t.readback[index] = 1
                    done[index] = dig
                except BaseException as exc:
                    errors.append(exc)
                finally:
                    del payload
                    pool.put(buf)

        thread = threading.Thread(target=writer, name="replicator-writer", daemon=True)
        thread.start()
        checker = threading.Thread(target=verifier, name="replicator-read-back", daemon=True)
        checker.start()
        started = time.perf_counter()
        try:
            self._request(conn, t, batches[0])
            for k, batch in enumerate(batches):
                if k + 1 < len(batches):
                    self._request(conn, t, batches[k + 1])
                self._check_stop()
                want = set(batch)
                for _ in range(len(batch)):
                    buf = pool.get()
                    try:
                        ftype, body = conn.recv_frame(buf, limit=bs + BLOCK_HEADER_SIZE)
                        if ftype == FRAME_JSON:
                            msg = parse_json(body)
                            raise AgentRefused(f"{msg.get('error')}: {msg.get('message')}")
                        if ftype != FRAME_BLOCK:
                            raise ProtocolError(f"expected a block, got frame type {ftype}")
                        vol, index, codec, raw_len, dig, payload = parse_block(body)
                        if vol != t.index or index not in want:
                            raise ProtocolError(f"unrequested block {vol}/{index}")
                    except BaseException:
                        pool.put(buf)
                        raise
                    self._bucket.consume(len(body))
                    self.stats.blocks_received += 1
                    work.put((index, codec, raw_len, dig, payload, buf))
                    if errors:
                        raise errors[0]
                self._expect(conn, "READ")
                work.put((batch, batches[k + 1] if k + 1 < len(batches) else []))
                self._report_checkpoints(t, checkpoints)
                if errors:
                    raise errors[0]
        finally:
            work.put(None)
            thread.join()
            to_read_back.put(None)
            checker.join()
            self._report_checkpoints(t, checkpoints)  # whatever the writer made durable meanwhile
            self.stats.transfer_seconds += time.perf_counter() - started
        if errors:
            raise errors[0]
        if failures:
            self.stats.digest_failures += len(failures)
            if self.stats.digest_failures > 64:
                raise ProtocolError(f"{self.stats.digest_failures} blocks failed verification: link corrupts data")
            self._fetch(conn, t, sorted(set(failures)))

    def _report_checkpoints(self, t: _Target, checkpoints: deque[dict[int, bytes]]) -> None:
        while checkpoints:
            verified = checkpoints.popleft()
            n_bytes = sum(block_span(i, t.size, self.cfg.block_size)[1] for i in verified)
            self.stats.blocks_fetched += len(verified)
            self.stats.bytes_written += n_bytes
            self.stats.fetched_by_volume.setdefault(t.mapping.recovery_device, array("q")).extend(verified)
            self._meter.add(n_bytes)
            t.need_bytes = max(0, t.need_bytes - n_bytes)
            t.progress.backlogged_bytes = t.need_bytes
            t.progress.replicated_bytes = min(t.size, t.progress.replicated_bytes + n_bytes)
            t.progress.rate_bps = self._meter.rate
            self._report_progress()

    def _request(self, conn: Connection, t: _Target, batch: Sequence[int]) -> None:
        conn.send_json({"op": "READ", "volume": t.index, "blocks": to_ranges(batch)})

    # ------------------------------------------------------------------ reporting
    def _set_state(self, state: ReplicationState) -> None:
        if state != self._state:
            self._state = state
            self.reporter.replication_state(state)

    def _report_error(self, error: ReplicationError, raw: str) -> None:
        log.warning("%s: %s", error, raw)
        self._error = error
        self.reporter.error(error, raw)

    def _clear_error(self) -> None:
        if self._error is not None:
            self._error = None
            self.reporter.error_cleared()

    def snapshot(self) -> ReplicationSnapshot:
        backlog = sum(t.progress.backlogged_bytes for t in self._targets)
        rate = self._meter.rate
        lag = 0 if not backlog else int(time.monotonic() - (self._in_sync_since or self._session_start))
        return ReplicationSnapshot(
            state=self._state,
            disks=[t.progress for t in self._targets],
            lag_seconds=lag,
            eta_seconds=(backlog / rate if rate > 0 else None) if backlog else 0.0,
            throughput_bps=rate,
            wire_bytes=self.stats.wire_bytes_in + (self._conn.bytes_in if self._conn else 0),
        )

    def _report_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_report >= 1.0:
            self._last_report = now
            self.reporter.progress(self.snapshot())


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
