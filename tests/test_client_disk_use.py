"""In-use disks are never targets (disk_use.py), whichever way the mapping comes: --device-mapping, a seed,
DRS's suggestion, the per-volume prompt and ALL="…".

Real loop devices (root): one mounted, one active swap, one carrying the boot medium's ISO9660 volume id, one
a FAT seed volume labelled FBSEED. Holders (LVM, MD, dm-crypt) and a mounted partition on recorded /sys trees:
this host's kernel has no device-mapper and its loop devices scan no partitions.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from failback_client.cli import build_parser
from failback_client.console import Console
from failback_client.devices import LocalDisk, discover, free_targets
from failback_client.errors import ClientError
from failback_client.map_volumes import choose_mapping
from failback_client.mapping import RecoveryDisk
from failback_client.seed import parse_env
from failback_client.settings import from_arguments_and_seed

from tests.controlplane_fixture import ControlPlaneHandle
from tests.test_client_helpers import BIOS_ROOT, OTHER_RI, SEED, UEFI_ROOT, client_env, run_in_process

MiB = 2**20
REC = [RecoveryDisk("/dev/xvda", 32 * MiB)]
# What each refusal must say: what uses the disk, and how to free it.
REASONS = {
    "mounted": ("is mounted at", "umount"),
    "swap": ("is active swap", "swapoff"),
    "boot": ("the failback client's boot medium", "choose another disk"),
    "seed": ("the seed volume (label FBSEED)", "choose another disk"),
}


def _run(*argv: str) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def busy_loops(tmp_path: Path) -> Iterator[dict[str, str]]:
    """name -> loop device: mounted, swap, boot (ISO9660 DRSFAILBACK), seed (FAT FBSEED) and a free one.
    Everything is undone even when the test fails."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("losetup", "mkswap", "swapon", "mkfs.vfat")):
        pytest.skip("needs root, losetup, mkswap, swapon and mkfs.vfat")
    devices: dict[str, str] = {}
    with contextlib.ExitStack() as undo:
        for name in ("mounted", "swap", "boot", "seed", "free"):
            image = tmp_path / f"{name}.img"
            with open(image, "wb") as f:
                f.truncate(40 * MiB if name != "free" else 64 * MiB)
                if name == "boot":
                    f.seek(16 * 2048)
                    f.write(b"\x01CD001\x01\x00" + b" " * 32 + b"DRSFAILBACK".ljust(32))
            if name == "mounted":
                _run("mkfs.ext4", "-q", "-F", str(image))
            if name == "seed":
                _run("mkfs.vfat", "-n", "FBSEED", str(image))
            device = _run("losetup", "--find", "--show", str(image))
            undo.callback(subprocess.run, ["losetup", "-d", device], check=False, capture_output=True)
            devices[name] = device
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        _run("mount", devices["mounted"], str(mnt))
        undo.callback(subprocess.run, ["umount", str(mnt)], check=False, capture_output=True)
        _run("mkswap", devices["swap"])
        _run("swapon", devices["swap"])
        undo.callback(subprocess.run, ["swapoff", devices["swap"]], check=False, capture_output=True)
        yield devices


def _console(answers: str = "") -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(stdin=io.StringIO(answers), stdout=out, plain=True), out


class SuggestingApi:
    """DRS's GetSuggestedFailbackClientDeviceMappingForDrs answer, fixed: the suggestion is what is under test."""

    def __init__(self, target: str) -> None:
        self.target = target

    def suggested_mapping(self, *_: Any) -> dict[str, Any]:
        return {"deviceMapping": [{"recoveryInstanceDeviceName": "/dev/xvda", "failbackClientDeviceName": self.target}]}


def refusal(path: str, target: str, free: str, local: list[LocalDisk]) -> str:
    """The text the admin sees when `target` is chosen for /dev/xvda by `path`."""
    common: dict[str, Any] = dict(
        client_id="fc", recovery_instance_id="i-0", recovery=REC, local=local, local_api=[], value_format="dev-name"
    )
    if path in ("device-mapping", "seed"):
        mapping = f"/dev/xvda={target}"
        if path == "seed":  # the FBSEED/kernel-argument seed's DEVICE_MAPPING, through the settings
            seed = parse_env(f"DEVICE_MAPPING={mapping}\n", "seed test")
            mapping = from_arguments_and_seed(build_parser().parse_args([]), seed, env={}).device_mapping or ""
        console, out = _console()
        with pytest.raises(ClientError) as e:
            choose_mapping(
                None,
                console,
                original_server=False,
                device_mapping=mapping,
                no_prompt=True,  # type: ignore[arg-type]
                **common,
            )
        return str(e.value) + out.getvalue()
    if path == "suggestion":
        console, out = _console()
        with pytest.raises(ClientError) as e:
            choose_mapping(
                SuggestingApi(target),
                console,
                original_server=True,
                device_mapping=None,  # type: ignore[arg-type]
                no_prompt=True,
                **common,
            )
        return str(e.value) + out.getvalue()
    answer = f'ALL="/dev/xvda={target}"' if path == "ALL=" else target
    console, out = _console(f"{answer}\n{free}\n")
    volumes = choose_mapping(
        None,
        console,
        original_server=False,
        device_mapping=None,
        no_prompt=False,  # type: ignore[arg-type]
        **common,
    )
    assert [v.target for v in volumes] == [free]  # asked again, and the free disk taken
    return out.getvalue()


PATHS = ("device-mapping", "seed", "suggestion", "prompt", "ALL=")


@pytest.mark.root
def test_real_busy_loop_devices_are_refused_in_every_mapping_path(busy_loops: dict[str, str]) -> None:
    local = discover("/", include_loop=True)
    by_path = {d.path: d for d in local}
    for name, (what, _) in REASONS.items():
        disk = by_path[busy_loops[name]]
        assert disk.in_use, f"{name}: {disk}"
        assert what in disk.in_use[0].what or name in ("boot", "seed"), disk.in_use
    assert [d.path for d in free_targets(local) if d.path in busy_loops.values()] == [busy_loops["free"]]
    for name, (what, free_hint) in REASONS.items():
        for path in PATHS:
            text = refusal(path, busy_loops[name], busy_loops["free"], local)
            assert busy_loops[name] in text and what in text and free_hint in text, (name, path, text)


@pytest.mark.root
def test_mount_point_and_swap_are_named_with_how_to_free_them(busy_loops: dict[str, str], tmp_path: Path) -> None:
    by_path = {d.path: d for d in discover("/", include_loop=True)}
    mounted = by_path[busy_loops["mounted"]].in_use
    assert [(u.what, u.free) for u in mounted] == [
        (
            f"{os.path.basename(busy_loops['mounted'])} is mounted at {tmp_path / 'mnt'}",
            f"unmount it: umount {tmp_path / 'mnt'}",
        )
    ]
    swap = by_path[busy_loops["swap"]].in_use
    assert [(u.what, u.free) for u in swap] == [
        (f"{os.path.basename(busy_loops['swap'])} is active swap", f"turn it off: swapoff {busy_loops['swap']}")
    ]


@pytest.mark.root
def test_whole_client_refuses_a_mounted_disk_from_device_mapping(
    drs_controlplane_factory,
    monkeypatch,
    capsys,
    tmp_path: Path,
) -> None:
    """The issue's case end to end: --device-mapping naming a mounted disk, --no-prompt: exit 5, nothing sent."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    cp: ControlPlaneHandle = drs_controlplane_factory(seed=SEED)
    images = [tmp_path / "disk.img", tmp_path / "spare.img"]
    for image in images:
        with open(image, "wb") as f:
            f.truncate(10 * 2**30)  # sparse; fits OTHER_RI's 10 GiB volume
    _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=1", str(images[0]))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with contextlib.ExitStack() as undo:
        device, spare = (_run("losetup", "--find", "--show", str(image)) for image in images)
        for loop in (device, spare):
            undo.callback(subprocess.run, ["losetup", "-d", loop], check=False)
        _run("mount", device, str(mnt))
        undo.callback(subprocess.run, ["umount", str(mnt)], check=False)
        env = client_env(
            cp,
            root="/",
            RECOVERY_INSTANCE_ID=OTHER_RI,
            DEVICE_MAPPING=f"/dev/nvme0n1={device}",
            FAILBACK_INCLUDE_LOOP="1",
        )
        run = run_in_process(monkeypatch, capsys, tmp_path, env, "--no-prompt")
    assert run.status == 5, run.all
    assert f"is {device}, which is in use: {os.path.basename(device)} is mounted at {mnt}" in run.out
    assert f"umount {mnt}" in run.out
    assert "deviceMapping" not in cp.internal(OTHER_RI) or not cp.internal(OTHER_RI)["deviceMapping"]


@pytest.mark.root
def test_a_disk_mounted_after_the_mapping_is_refused_at_the_last_look(busy_loops: dict[str, str]) -> None:
    from failback_client.last_look import NotConfirmed, confirm_overwrite
    from failback_client.mapping import MappedVolume
    from failback_client.settings import Settings

    # the disk as it was when the mapping was made (free); it is mounted now
    stale = LocalDisk(name=os.path.basename(busy_loops["mounted"]), size_bytes=40 * MiB)
    settings = Settings(no_prompt=True, device_mapping=f"/dev/xvda={stale.path}", include_loop=True)
    console, out = _console()
    with pytest.raises(NotConfirmed) as e:
        confirm_overwrite(settings, console, [MappedVolume(REC[0], stale)], "i-0")
    assert f"is {stale.path}, which is in use: {stale.name} is mounted at" in str(e.value)
    assert "came into use after the mapping: nothing was written" in str(e.value)
    free = LocalDisk(name=os.path.basename(busy_loops["free"]), size_bytes=64 * MiB)
    settings.device_mapping = f"/dev/xvda={free.path}"
    confirm_overwrite(settings, console, [MappedVolume(REC[0], free)], "i-0")  # still free: goes on
    assert "taken as consent" in out.getvalue()


# ---- recorded trees: holders and a mounted partition -------------------------------------------------------


def _holder(root: Path, member: str, holder: str, files: dict[str, str]) -> None:
    disk = member.rstrip("0123456789") if not member.startswith("nvme") else member.split("p")[0]
    base = root / "sys/block" / disk / (member if member != disk else "")
    (base / "holders").mkdir(parents=True, exist_ok=True)
    (base / "holders" / holder).symlink_to(f"../../../{holder}")
    for rel, text in files.items():
        path = root / "sys/block" / holder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


@pytest.fixture
def busy_tree(tmp_path: Path) -> str:
    """The recorded BIOS tree with sda1 mounted at / (mountinfo), sdb an LVM PV with an active LV."""
    root = tmp_path / "bios"
    shutil.copytree(BIOS_ROOT, root, symlinks=True)
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/mountinfo").write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "30 22 0:5 / /run/live/medium ro - iso9660 /dev/sdc1 ro\n"
        "31 22 8:33 / /mnt/with\\040space rw - vfat /dev/sdc1 rw\n"
    )
    (root / "sys/block/sda/sda1/dev").write_text("8:1\n")
    _holder(root, "sdb", "dm-0", {"dm/name": "vg0-root", "dm/uuid": "LVM-abcdef"})
    return str(root)


def test_mounted_partition_and_lvm_holder_on_a_recorded_tree(busy_tree: str) -> None:
    disks = {d.name: d for d in discover(busy_tree)}
    assert [(u.what, u.free) for u in disks["sda"].in_use] == [("sda1 is mounted at /", "unmount it: umount /")]
    assert [(u.what, u.free) for u in disks["sdb"].in_use] == [
        ("sdb holds the active LVM logical volume vg0-root (/dev/dm-0)", "deactivate it: vgchange -an vg0")
    ]
    assert disks["sdc"].boot_medium and "boot medium" in disks["sdc"].in_use[0].what
    assert free_targets(list(disks.values())) == []
    for path in ("device-mapping", "suggestion"):
        text = refusal(path, "/dev/sda", "", list(disks.values()))
        assert "/dev/sda, which is in use: sda1 is mounted at /; free it first (unmount it: umount /)" in text, text
        text = refusal(path, "/dev/sdb", "", list(disks.values()))
        assert "vg0-root" in text and "vgchange -an vg0" in text, text


def test_md_and_dm_crypt_holders_on_a_recorded_tree(tmp_path: Path) -> None:
    root = tmp_path / "uefi"
    shutil.copytree(UEFI_ROOT, root, symlinks=True)
    _holder(root, "nvme0n1", "md127", {"md/level": "raid1"})
    _holder(root, "nvme1n1", "dm-1", {"dm/name": "luks-0a1b", "dm/uuid": "CRYPT-LUKS2-0a1b-luks-0a1b"})
    disks = {d.name: d for d in discover(str(root))}
    assert [(u.what, u.free) for u in disks["nvme0n1"].in_use] == [
        ("nvme0n1 is a member of the active MD raid1 array /dev/md127", "stop it: mdadm --stop /dev/md127")
    ]
    assert [(u.what, u.free) for u in disks["nvme1n1"].in_use] == [
        ("nvme1n1 is open as the dm-crypt mapping luks-0a1b (/dev/dm-1)", "close it: cryptsetup close luks-0a1b")
    ]
    # the preflight table no longer calls them ok
    from failback_client.preflight import gather

    rows = {r[0]: r for r in gather(str(root)).rows()}
    assert "IN USE" in rows["Local disks"][2] and "NO FREE DISK" in rows["Local disks"][2]


def test_unused_recorded_disks_stay_free() -> None:
    assert [d.name for d in free_targets(discover(BIOS_ROOT))] == ["sda", "sdb"]
    assert [d.name for d in free_targets(discover(UEFI_ROOT))] == ["nvme0n1", "nvme1n1"]
