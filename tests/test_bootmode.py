"""The boot-mode check before replication (client/failback_client/bootmode.py): the recovery volumes' first
block, read from the agent, against this machine's boot mode. A Windows mismatch stops the client before any
write to a local disk; Linux gets a note."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest
from failback_client.bootmode import EXIT_BOOT_MODE, BootModeMismatch, check_boot_mode, instance_os, judge
from failback_client.console import Console

from tests.controlplane_fixture import OTHER_MAC, RI, ClientProcess, blank
from tests.test_client_replication_helpers import MiB, seed_for

GPT_ESP = "label: gpt\nsize=4M, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\ntype=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n"
MBR_ACTIVE = "label: dos\nsize=4M, type=7, bootable\ntype=7\n"


def _disk(path: Path, table: str, size_mib: int = 16) -> Path:
    with path.open("wb") as f:
        f.truncate(size_mib * MiB)
    subprocess.run(["sfdisk", "-q", str(path)], input=table, text=True, check=True, capture_output=True)
    return path


def _head(tmp_path: Path, table: str) -> bytes:
    return _disk(tmp_path / "d.img", table).read_bytes()[:MiB]


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(stdin=io.StringIO(""), stdout=out, plain=True), out


def test_windows_mismatch_stops_with_the_fix(tmp_path: Path) -> None:
    console, _ = _console()
    verdict = judge({"/dev/nvme0n1": _head(tmp_path, GPT_ESP)}, "windows", "BIOS")
    assert verdict.source_mode == "uefi" and verdict.mismatch
    with pytest.raises(BootModeMismatch, match="reboot this ISO in UEFI mode") as info:
        check_boot_mode(verdict, console)
    assert info.value.exit_status == EXIT_BOOT_MODE and "Nothing was written" in str(info.value)


def test_windows_bios_source_on_a_uefi_machine_stops_too(tmp_path: Path) -> None:
    console, _ = _console()
    with pytest.raises(BootModeMismatch, match="reboot this ISO in BIOS mode"):
        check_boot_mode(judge({"/dev/sda": _head(tmp_path, MBR_ACTIVE)}, "windows", "UEFI"), console)


def test_linux_mismatch_is_a_note_and_a_match_is_ok(tmp_path: Path) -> None:
    console, out = _console()
    check_boot_mode(judge({"/dev/nvme0n1": _head(tmp_path, GPT_ESP)}, "linux", "BIOS"), console)
    assert "conversion installs the boot loader of Linux for BIOS" in out.getvalue()
    check_boot_mode(judge({"/dev/nvme0n1": _head(tmp_path, GPT_ESP)}, "windows", "UEFI"), console)
    assert "boot UEFI, like this machine" in out.getvalue()
    check_boot_mode(judge({"/dev/nvme1n1": bytes(MiB)}, "windows", "BIOS"), console)  # a data volume
    assert "layout does not tell" in out.getvalue()


def test_hybrid_layout_is_no_mismatch(tmp_path: Path) -> None:
    hybrid = (
        "label: gpt\nsize=3M, type=21686148-6449-6E6F-744E-656564454649\n"
        "size=4M, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\ntype=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n"
    )
    console, out = _console()
    verdict = judge({"/dev/nvme0n1": _head(tmp_path, hybrid)}, "windows", "BIOS")
    assert verdict.source_mode == "both" and not verdict.mismatch
    check_boot_mode(verdict, console)
    assert "boot BIOS and UEFI" in out.getvalue()


def test_instance_os() -> None:
    def ri(text: str) -> dict:
        return {"recoveryInstanceProperties": {"os": {"fullString": text}}}

    assert instance_os(ri("Microsoft Windows Server 2022 Datacenter")) == "windows"
    assert instance_os(ri("Linux version 6.1.0-13-cloud-amd64")) == "linux"
    assert instance_os({}) == ""


def test_the_frame_layout_is_the_replicators(tmp_path: Path) -> None:
    """bootmode keeps its own few lines of the wire format: the replication software (failback_replicator.wire)
    is downloaded, not in the ISO's client venv (image/stages/clientenv.py refuses it there), so the client
    cannot import it. The copy must say what wire.py says."""
    from failback_client import bootmode
    from failback_replicator import wire

    assert bootmode._FRAME.format == wire._HEADER.format and bootmode._BLOCK.format == wire._BLOCK.format
    assert (bootmode.FRAME_JSON, bootmode.FRAME_BLOCK) == (wire.FRAME_JSON, wire.FRAME_BLOCK)
    assert (bootmode.CODEC_RAW, bootmode.CODEC_ZLIB, bootmode.CODEC_ZERO) == (
        wire.CODEC_RAW,
        wire.CODEC_ZLIB,
        wire.CODEC_ZERO,
    )


@pytest.mark.parametrize("agent_version", [2, 1])
def test_read_heads_from_the_real_agent(tmp_path: Path, agent_version: int) -> None:
    """read_heads against the test agent on loopback (mutual TLS, the agent's protocol code): block 0 of each
    mapped volume, whether the agent sends it zlib-compressed (a partition table), raw (random bytes) or as a
    zero block; a version-1 agent (no digest negotiation) is asked again in version 1."""
    from drs_agent.testing import AGENT_CN, CLIENT_ID, RECOVERY_INSTANCE_ID, Pki, make_image, start_agent
    from failback_client.bootmode import read_heads
    from failback_client.configure import ReplicationSetup
    from failback_client.pairing import TlsPaths

    pki = Pki.create(tmp_path / "pki")
    volumes = {
        "/dev/nvme0n1": _disk(tmp_path / "gpt.img", GPT_ESP),
        "/dev/nvme1n1": make_image(tmp_path / "random.img", 2 * MiB, seed=3, zero_fraction=0.0),
        "/dev/nvme2n1": blank(tmp_path / "blank.img", 2 * MiB),
    }
    old = {"protocol_versions": (1,), "digests": ("sha256",)} if agent_version == 1 else {}
    with start_agent(pki, volumes, **old) as agent:
        setup = ReplicationSetup(
            recovery_instance_id=RECOVERY_INSTANCE_ID,
            client_id=CLIENT_ID,
            agent_host="127.0.0.1",
            agent_port=agent.port,
            volumes=[(name, f"/dev/sd{c}") for name, c in zip(volumes, "abc", strict=True)],
            rescan=False,
            bandwidth_mbps=None,
            state_dir=tmp_path / "state",
            tls=TlsPaths(ca=pki.client.ca, cert=pki.client.cert, key=pki.client.key),
            agent_identity=AGENT_CN,
        )
        heads = read_heads(setup, timeout=30)
    assert heads == {name: path.read_bytes()[:MiB] for name, path in volumes.items()}
    modes = judge(heads, "windows", "UEFI").per_volume
    assert modes == {"/dev/nvme0n1": "uefi", "/dev/nvme1n1": "", "/dev/nvme2n1": ""}


@pytest.mark.root
@pytest.mark.slow
def test_windows_uefi_source_on_this_bios_host_stops_before_any_write(s3: str, stack_factory, tmp_path: Path) -> None:
    if Path("/sys/firmware/efi").is_dir():
        pytest.skip("this host booted UEFI: the mismatch case needs a BIOS host")
    src = _disk(tmp_path / "windows.img", GPT_ESP)
    seed = seed_for(RI, [("/dev/nvme0n1", src.stat().st_size)], [OTHER_MAC])
    seed["source_servers"][0]["os"] = "Microsoft Windows Server 2022 Datacenter"
    target = blank(tmp_path / "t.img", 16 * MiB)
    stack = stack_factory(seed, {"/dev/nvme0n1": src}, {"/dev/nvme0n1": target})
    client = ClientProcess(stack.env(s3), tmp_path / "client.out")
    status = client.wait(120)
    out = client.output
    assert status == EXIT_BOOT_MODE, out
    assert "reboot this ISO in UEFI mode" in out and "/dev/nvme0n1: UEFI" in out
    assert target.read_bytes() == bytes(16 * MiB), "nothing may be written when the boot mode does not match"
