"""How a disk boots, from its first blocks: GPT with an EFI System partition = UEFI, MBR with an active
partition = BIOS. Used before replication (the recovery volumes' first blocks against this machine's boot
mode: a Windows server must be failed back in the mode it was made for) and by conversion."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from failback_client.errors import EXIT_BOOT_MODE, ClientError
from failback_client.machine import boot_mode

if TYPE_CHECKING:
    from failback_client.api import DrsApi
    from failback_client.configure import ReplicationSetup
    from failback_client.console import Console
    from failback_client.settings import Settings

log = logging.getLogger(__name__)

SECTOR = 512
HEAD_BYTES = 1024 * 1024  # enough for the MBR, the GPT header and 128 partition entries at 512 or 4096 B
ESP_GUID = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
MBR_ESP, MBR_PROTECTIVE = 0xEF, 0xEE


BIOS_BOOT_GUID = uuid.UUID("21686148-6449-6E6F-744E-656564454649")  # GRUB's BIOS boot partition on GPT


def _gpt_kinds(head: bytes, sector: int) -> set[uuid.UUID] | None:
    """The ESP / BIOS boot type GUIDs among the GPT's entries; None when there is no GPT header at LBA 1."""
    hdr = head[sector : sector + 92]
    if len(hdr) < 92 or hdr[:8] != b"EFI PART":
        return None
    entries_lba, count, size = struct.unpack_from("<QII", hdr, 72)
    if size < 128 or count > 4096:
        return None
    found = set()
    for i in range(count):
        off = entries_lba * sector + i * size
        entry = head[off : off + 16]
        if len(entry) < 16:
            break
        kind = uuid.UUID(bytes_le=entry)
        if kind in (ESP_GUID, BIOS_BOOT_GUID):
            found.add(kind)
    return found


def layout_boot_mode(head: bytes) -> str:
    """ "uefi", "bios", "both" (a GPT with an ESP and a BIOS boot partition, as cloud Linux images have), or ""
    (cannot tell: no table, a GPT without ESP, an MBR without active partition)."""
    if len(head) < SECTOR or head[510:512] != b"\x55\xaa":
        return ""
    parts = [head[446 + 16 * i : 446 + 16 * (i + 1)] for i in range(4)]
    if any(p[4] == MBR_PROTECTIVE for p in parts):
        for sector in (SECTOR, 4096):
            kinds = _gpt_kinds(head, sector)
            if kinds is not None:
                if ESP_GUID not in kinds:
                    return ""
                return "both" if BIOS_BOOT_GUID in kinds else "uefi"
        return ""
    if any(p[4] == MBR_ESP for p in parts):
        return "uefi"
    return "bios" if any(p[0] == 0x80 and p[4] for p in parts) else ""


def disk_boot_mode(path: str) -> str:
    """layout_boot_mode of the disk or image at `path` ("" when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return layout_boot_mode(f.read(HEAD_BYTES))
    except OSError:
        return ""


# ---- before replication: the recovery volumes' first blocks against this machine's boot mode ------------------

# A copy of failback_replicator/wire.py's frame layout: the replication software is downloaded, not in the ISO's
# client venv, so it cannot be imported here. tests/test_bootmode.py keeps the two the same.
_FRAME = struct.Struct("!BI")
_BLOCK = struct.Struct("!HQBI32s")
FRAME_JSON, FRAME_BLOCK = 1, 2
CODEC_RAW, CODEC_ZLIB, CODEC_ZERO = 0, 2, 3
HEAD_BLOCK_SIZE = 1024 * 1024  # one block of this size holds what layout_boot_mode needs


class BootModeMismatch(ClientError):
    """A Windows server cannot boot here in this mode: nothing has been written to a local disk."""

    exit_status = EXIT_BOOT_MODE


def instance_os(instance: dict[str, Any]) -> str:
    """ "windows", "linux" or "" from recoveryInstanceProperties.os.fullString."""
    text = str(instance.get("recoveryInstanceProperties", {}).get("os", {}).get("fullString", "")).lower()
    return "windows" if "windows" in text else "linux" if text and "windows" not in text else ""


class _Agent:
    """Just enough of the replication protocol (client/replicator/PROTOCOL.md) to READ block 0 of each
    volume, over the same mutual TLS the replication software uses. Reads only."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock

    def send(self, msg: dict[str, Any]) -> None:
        body = json.dumps(msg).encode()
        self.sock.sendall(_FRAME.pack(FRAME_JSON, len(body)) + body)

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the agent closed the connection")
            buf += chunk
        return bytes(buf)

    def recv(self) -> tuple[int, bytes]:
        ftype, length = _FRAME.unpack(self._exact(_FRAME.size))
        if length > HEAD_BLOCK_SIZE + 1024:
            raise ConnectionError(f"the agent sent a {length}-byte frame")
        return ftype, self._exact(length)

    def recv_json(self) -> dict[str, Any]:
        ftype, body = self.recv()
        if ftype != FRAME_JSON:
            raise ConnectionError(f"expected a control message, got frame type {ftype}")
        return json.loads(body)


def read_heads(setup: ReplicationSetup, *, timeout: float = 60) -> dict[str, bytes]:
    """The first HEAD_BLOCK_SIZE bytes of each mapped recovery volume, read from the agent."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # the agent is reached by IP; its CN is checked below
    ctx.load_verify_locations(cafile=str(setup.tls.ca))
    ctx.load_cert_chain(certfile=str(setup.tls.cert), keyfile=str(setup.tls.key))
    raw = socket.create_connection((setup.agent_host, setup.agent_port), timeout=timeout)
    with ctx.wrap_socket(raw) as sock:
        cert = cast("dict[str, tuple[tuple[tuple[str, str], ...], ...]]", sock.getpeercert())  # CERT_REQUIRED
        subject = dict(x[0] for x in cert.get("subject", ()))
        if setup.agent_identity and subject.get("commonName") != setup.agent_identity:
            raise ConnectionError(
                f"the agent's certificate is for {subject.get('commonName')!r}, not {setup.agent_identity!r}"
            )
        agent = _Agent(sock)
        hello = {
            "op": "HELLO",
            "version": 2,
            "software": "failback-client-bootcheck",
            "client": setup.client_id,
            "recovery_instance": setup.recovery_instance_id,
            "block_size": HEAD_BLOCK_SIZE,
            "codecs": ["zlib"],
            "digests": ["sha256"],
        }
        agent.send(hello)
        reply = agent.recv_json()
        if reply.get("op") == "ERROR" and reply.get("error") == "VERSION":
            agent.send({k: v for k, v in hello.items() if k != "digests"} | {"version": 1})
            reply = agent.recv_json()
        if reply.get("op") != "HELLO":
            raise ConnectionError(
                f"the agent answered HELLO with {reply.get('error') or reply.get('op')}: {reply.get('message', '')}"
            )
        index = {v["name"]: i for i, v in enumerate(reply.get("volumes", []))}
        heads: dict[str, bytes] = {}
        for name, _target in setup.volumes:
            if name not in index:
                continue
            agent.send({"op": "READ", "volume": index[name], "blocks": [[0, 1]]})
            while True:
                ftype, body = agent.recv()
                if ftype == FRAME_JSON:
                    msg = json.loads(body)
                    if msg.get("op") == "ERROR":
                        raise ConnectionError(f"the agent refused READ: {msg.get('message')}")
                    break
                if ftype == FRAME_BLOCK:
                    _vol, _idx, codec, raw_len, _dig = _BLOCK.unpack_from(body)
                    data = body[_BLOCK.size :]
                    heads[name] = (
                        bytes(raw_len)
                        if codec == CODEC_ZERO
                        else zlib.decompress(data)
                        if codec == CODEC_ZLIB
                        else data
                    )
        with contextlib.suppress(OSError):
            agent.send({"op": "BYE"})
    return heads


@dataclass(frozen=True)
class Verdict:
    source_mode: str  # uefi, bios, "" unknown
    os: str  # windows, linux, ""
    this_mode: str  # uefi, bios
    per_volume: dict[str, str]

    @property
    def mismatch(self) -> bool:
        return self.source_mode in ("bios", "uefi") and self.source_mode != self.this_mode


def judge(heads: dict[str, bytes], os_name: str, this_mode: str) -> Verdict:
    modes = {name: layout_boot_mode(head) for name, head in heads.items()}
    found = set(modes.values()) - {""}
    source = next((m for m in ("both", "uefi", "bios") if m in found), "")
    return Verdict(source, os_name, this_mode.lower(), modes)


def check_boot_mode(verdict: Verdict, console: Console) -> None:
    """A Windows mismatch stops here (BootModeMismatch); Linux gets a note; unknown layouts a note."""
    shown = ", ".join(f"{n}: {m.upper() or 'unknown'}" for n, m in verdict.per_volume.items()) or "none read"
    log.info(
        "boot mode: recovery volumes %s; instance OS %s; this machine %s",
        shown,
        verdict.os or "unknown",
        verdict.this_mode,
    )
    if not verdict.source_mode:
        console.info(f"Boot mode: the recovery volumes' layout does not tell how they boot ({shown})")
        return
    if verdict.source_mode == "both":
        console.ok(
            f"Boot mode: the recovery volumes boot BIOS and UEFI ({shown}); this machine booted "
            f"{verdict.this_mode.upper()}"
        )
        return
    if not verdict.mismatch:
        console.ok(f"Boot mode: the recovery volumes boot {verdict.source_mode.upper()}, like this machine")
        return
    src, here = verdict.source_mode.upper(), verdict.this_mode.upper()
    if verdict.os == "windows":
        raise BootModeMismatch(
            f"the recovery instance runs Windows and its volumes boot {src} ({shown}), but this machine booted the "
            f"failback client in {here} mode: Windows only boots in the mode it was installed for. Nothing was "
            f"written to a local disk. Fix: reboot this ISO in {src} mode (firmware boot menu or setup) and start "
            "the failback client again"
        )
    what = "Linux" if verdict.os == "linux" else "the restored system (OS unknown)"
    console.warn(
        f"Boot mode: the recovery volumes boot {src} and this machine booted {here}; conversion installs "
        f"the boot loader of {what} for {here} (the guide asks Linux servers to boot the client in BIOS "
        "mode)"
    )


def before_replication(settings: Settings, console: Console, api: DrsApi, setup: ReplicationSetup) -> None:
    """Guide: a Windows server must be failed back in the boot mode of its source. Called after pairing and
    before the replication software starts: the first block of each recovery volume is read from the agent."""
    this = boot_mode(settings.sysroot).lower()
    try:
        instances = api.recovery_instances([setup.recovery_instance_id])
        os_name = instance_os(instances[0]) if instances else ""
        heads = read_heads(setup)
    except (OSError, ssl.SSLError, ConnectionError, ValueError, ClientError) as exc:
        # The replication software reports connection problems itself, with their DRS error names.
        console.warn(f"Boot mode: could not read the recovery volumes' first blocks ({exc}); not checked")
        return
    check_boot_mode(judge(heads, os_name, this), console)
