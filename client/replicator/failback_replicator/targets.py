"""The local volumes the engine writes: one `Target` per mapped recovery volume, opened at start
and bound to the agent's volume (index, size, journal) at each HELLO."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .blockio import block_count, device_size, is_block_device, open_volume
from .config import ReplicatorConfig, VolumeMapping
from .interfaces import DiskProgress, ReplicationError
from .journal import DigestTable, Journal

log = logging.getLogger("failback_replicator")


class ReplicationFailed(Exception):
    """Unrecoverable: carries the DRS error name reported before raising."""

    def __init__(self, error: ReplicationError, message: str) -> None:
        super().__init__(f"{error}: {message}")
        self.error = error


@dataclass
class Target:
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


def open_targets(cfg: ReplicatorConfig) -> list[Target]:
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    targets: list[Target] = []
    for m in cfg.volumes:
        fd = open_volume(m.target, writable=True)
        local_size = device_size(fd)
        progress = DiskProgress(device_name=m.recovery_device, target=str(m.target), total_bytes=0)
        # Size and journal are settled once the agent tells us the source size (HELLO).
        targets.append(
            Target(mapping=m, fd=fd, size=local_size, blocks=0, journal=None, progress=progress)  # type: ignore[arg-type]
        )
        log.info("target %s: %d bytes (%s)", m.target, local_size, "block device" if is_block_device(fd) else "file")
    return targets


def bind_targets(cfg: ReplicatorConfig, targets: list[Target], volumes: list[dict], algorithm: str) -> None:
    """Matches each target to the agent's volume of its name (HELLO's list) and loads its journal,
    whose digests are `algorithm`'s (the session's block digest)."""
    by_name = {v["name"]: (i, int(v["size"])) for i, v in enumerate(volumes)}
    for t in targets:
        name = t.mapping.recovery_device
        if name not in by_name:
            raise ReplicationFailed(
                ReplicationError.FAILED_TO_CONFIGURE_REPLICATION_SOFTWARE,
                f"the agent has no volume {name!r} (it serves: {', '.join(sorted(by_name))}); fix the device mapping",
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
            t.readback = bytearray(b"\x01") * block_count(size, cfg.block_size)
            t.size = size
            t.blocks = block_count(size, cfg.block_size)
            identity = {
                "recovery_instance": cfg.recovery_instance_id,
                "volume": name,
                "size": size,
                "block_size": cfg.block_size,
                "target": str(t.mapping.target),
            }
            safe = "".join(c if c.isalnum() else "_" for c in name).strip("_")
            path = Path(cfg.state_dir) / f"journal-{safe}.bin"
            t.journal, how = Journal.load_or_new(path, identity, t.blocks, algorithm)
            log.info("%s: %s", name, how)
            t.progress.total_bytes = size
        # Digests of another algorithm (an older journal, or the last session negotiated another
        # one) are never compared with this session's: the blocks they vouched for are re-read.
        was = t.journal.digest
        vouched = t.journal.adopt_digest(algorithm)
        if vouched is not None:
            t.recompute = vouched
            log.info(
                "%s: journal digests are %s, this session's are %s: %d verified block(s) will be re-read "
                "locally to recompute them",
                name, was, algorithm, vouched.count(1),
            )  # fmt: skip
