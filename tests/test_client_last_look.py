"""The last look before the first write (last_look.py), through a real pseudo-terminal (pexpect) and real loop
devices: the screen shows what each target holds now (partition table, file system, label, size, the OS on it)
and the recovery volume that will overwrite it. "no" writes nothing (the target's hash is unchanged); OVERWRITE
starts replication (slow: the whole stack, moto's S3 and the agent); --no-prompt with an explicit mapping is
consent (the table goes to the log); --no-prompt without one stops before writing.
"""

from __future__ import annotations

import io
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest

from image.stages.hashes import sha512_file
from tests.controlplane_fixture import OTHER_MAC, RI, ControlPlaneHandle, Stack, failback_state
from tests.test_client_helpers import SEED, agent_listener, client_command, client_env, run_in_process, subprocess_env
from tests.test_client_replication_helpers import MiB, loop_device, make_ext4, seed_for

OS_NAME = "Debian GNU/Linux 12 (bookworm)"


def old_system_disk(path: Path, size_mib: int = 32) -> Path:
    """What the target disk holds before the failback: GPT, p1 ext4 'oldroot' with an /etc/os-release."""
    tree = path.with_suffix(".tree")
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_text(f'PRETTY_NAME="{OS_NAME}"\nID=debian\n')
    part = path.with_suffix(".p1")
    subprocess.run(["truncate", "-s", f"{size_mib - 2}M", str(part)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "oldroot", "-d", str(tree), str(part)], check=True)
    subprocess.run(["truncate", "-s", f"{size_mib}M", str(path)], check=True)
    subprocess.run(["sfdisk", "-q", str(path)], input=f"label: gpt\n,{size_mib - 2}M,L\n", text=True, check=True)
    subprocess.run(["dd", f"if={part}", f"of={path}", "bs=1M", "seek=1", "conv=notrunc", "status=none"], check=True)
    part.unlink()
    return path


@pytest.fixture
def target(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    image = old_system_disk(tmp_path / "target.img")
    with loop_device(image) as device:
        yield device, image


def run_env(cp: ControlPlaneHandle, device: str, tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    """A real run (no --check-only) of the recovery instance RI onto the loop device `device`."""
    env = client_env(
        cp,
        root="/",
        agent_port=port,
        RECOVERY_INSTANCE_ID=RI,
        DEVICE_MAPPING=f"/dev/nvme0n1={device}",
        FAILBACK_INCLUDE_LOOP="1",
        FAILBACK_PLAIN="1",
        FAILBACK_WORK_DIR=str(tmp_path / "work"),
        REBOOT="0",
        **extra,
    )
    env.pop("FAILBACK_CHECK_ONLY")
    return env


def spawn(env: dict[str, str], tmp_path: Path) -> tuple[pexpect.spawn, io.StringIO]:
    command = client_command("--log-file", str(tmp_path / "client.log"))
    child = pexpect.spawn(
        command[0], command[1:], env=subprocess_env(env), encoding="utf-8", timeout=30, dimensions=(50, 250)
    )
    transcript = io.StringIO()
    child.logfile_read = transcript
    return child, transcript


def expect_last_look(child: pexpect.spawn, device: str) -> None:
    child.expect_exact(f"Last look: these local disks will be OVERWRITTEN with {RI}'s volumes")
    child.expect_exact(f"{device}  32.0 MiB")
    child.expect_exact(f"on it now:      gpt partition table: p1 ext4 'oldroot' 30.0 MiB [{OS_NAME}]")
    child.expect_exact("overwritten by: /dev/nvme0n1 (32.0 MiB)")
    child.expect_exact(f"Type OVERWRITE to overwrite {device}: ")


@pytest.mark.root
def test_answer_no_writes_nothing(drs_controlplane_factory, target, tmp_path: Path) -> None:
    device, image = target
    cp = drs_controlplane_factory(seed=seed_for(RI, [("/dev/nvme0n1", 32 * MiB)], [OTHER_MAC]))
    before = sha512_file(image, image.stat().st_size)
    with agent_listener() as port:
        child, transcript = spawn(run_env(cp, device, tmp_path, port), tmp_path)
        expect_last_look(child, device)
        child.sendline("no")
        child.expect_exact(f"nothing was written to {device}")
        child.expect(pexpect.EOF)
        child.close()
    assert child.exitstatus == 5, transcript.getvalue()
    assert sha512_file(image, image.stat().st_size) == before
    assert sha512_file(device, image.stat().st_size) == before
    assert "Downloading the replication software" not in transcript.getvalue()
    assert not (tmp_path / "work").exists()  # not even the software was fetched


@pytest.mark.root
def test_no_prompt_with_explicit_mapping_is_consent_and_logs_the_table(
    drs_controlplane_factory, target, monkeypatch, capsys, tmp_path: Path
) -> None:
    device, image = target
    cp = drs_controlplane_factory(seed=seed_for(RI, [("/dev/nvme0n1", 32 * MiB)], [OTHER_MAC]))
    before = sha512_file(image, image.stat().st_size)
    with agent_listener() as port:
        # FAILBACK_S3_ENDPOINT is the control plane, not S3: the download fails, so this run stops right after
        # the point it is about (going on past the last look) and before any write.
        run = run_in_process(monkeypatch, capsys, tmp_path, run_env(cp, device, tmp_path, port), "--no-prompt")
    assert (
        "--no-prompt with the volume mapping from variable DEVICE_MAPPING: taken as consent to overwrite "
        f"{device}" in run.out
    )
    assert re.search(
        r"INFO failback_client.console:     on it now:      gpt partition table: p1 ext4 'oldroot' "
        r"30.0 MiB \[" + re.escape(OS_NAME) + r"\]\n.*INFO failback_client.console:     overwritten by: "
        r"/dev/nvme0n1 \(32.0 MiB\)",
        run.log,
    ), run.log
    assert "Downloading the replication software" in run.out, run.all
    assert run.status == 8 and sha512_file(image, image.stat().st_size) == before


def test_no_prompt_without_explicit_mapping_stops_before_writing(
    monkeypatch, capsys, tmp_path: Path, drs_controlplane_factory
) -> None:
    """The original server's automatic mapping is no consent for an unattended overwrite."""
    cp = drs_controlplane_factory(seed=SEED)
    with agent_listener() as port:
        env = client_env(cp, agent_port=port, FAILBACK_WORK_DIR=str(tmp_path / "work"))
        env.pop("FAILBACK_CHECK_ONLY")
        run = run_in_process(monkeypatch, capsys, tmp_path, env, "--no-prompt")
    assert run.status == 5, run.all
    assert "Volumes mapped automatically" in run.out
    assert "--no-prompt without an explicit volume mapping: nothing is overwritten without consent" in run.out
    assert "Downloading the replication software" not in run.out and not (tmp_path / "work").exists()


@pytest.mark.root
@pytest.mark.slow
def test_answer_overwrite_starts_replication(s3: str, stack_factory: Callable[..., Stack], tmp_path: Path) -> None:
    src = make_ext4(tmp_path / "root.img", 32, seed=11, fill_mib=8)
    image = old_system_disk(tmp_path / "t.img")
    before = sha512_file(image, image.stat().st_size)
    stack = stack_factory(
        seed_for(RI, [("/dev/nvme0n1", src.stat().st_size)], [OTHER_MAC]),
        {"/dev/nvme0n1": src},
        {"/dev/nvme0n1": image},
    )
    device = stack.devices["/dev/nvme0n1"]
    env = stack.env(s3)
    env.pop("NO_PROMPT")
    child, transcript = spawn(env, tmp_path)
    try:
        expect_last_look(child, device)
        child.sendline("overwrite")
        child.expect_exact(f"Confirmed: {device} will be overwritten")
        child.expect_exact("Downloading the replication software")
        for _ in range(600):
            if failback_state(stack.cp) == "FAILBACK_READY_FOR_LAUNCH":
                break
            child.expect([pexpect.TIMEOUT, pexpect.EOF], timeout=0.2)
            assert child.isalive(), transcript.getvalue()
        else:
            raise AssertionError(f"replication did not reach Ready for launch:\n{transcript.getvalue()}")
        stack.cp.client().stop_failback(recoveryInstanceID=RI)
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, transcript.getvalue()
    size = src.stat().st_size
    assert sha512_file(image, size) != before and sha512_file(device, size) == sha512_file(src, size)


def test_a_mapping_from_the_seed_is_consent_without_asking() -> None:
    """An unattended seed run must not wait for OVERWRITE: the seed's DEVICE_MAPPING is the consent."""
    from failback_client.console import Console
    from failback_client.devices import discover
    from failback_client.last_look import NotConfirmed, confirm_overwrite
    from failback_client.mapping import MappedVolume, RecoveryDisk
    from failback_client.settings import Settings

    from tests.test_client_helpers import BIOS_ROOT

    sda = {d.name: d for d in discover(BIOS_ROOT)}["sda"]
    volumes = [MappedVolume(RecoveryDisk("/dev/nvme0n1", 2**30), sda)]
    seeded = Settings(
        sysroot=BIOS_ROOT,
        device_mapping="/dev/nvme0n1=/dev/sda",
        origin={"device_mapping": "seed volume FBSEED:failback-seed.env line 3"},
    )
    out = io.StringIO()
    confirm_overwrite(seeded, Console(stdin=io.StringIO(""), stdout=out, plain=True), volumes, RI)  # no EOFError
    assert (
        "The volume mapping from seed volume FBSEED:failback-seed.env line 3: taken as consent to overwrite "
        "/dev/sda" in out.getvalue()
    )
    typed = Settings(
        sysroot=BIOS_ROOT,
        device_mapping="/dev/nvme0n1=/dev/sda",
        origin={"device_mapping": "argument --device-mapping"},
    )
    with pytest.raises(NotConfirmed, match="'overwrite please' typed"):  # interactive: the word, nothing else
        confirm_overwrite(
            typed, Console(stdin=io.StringIO("overwrite please\n"), stdout=io.StringIO(), plain=True), volumes, RI
        )
