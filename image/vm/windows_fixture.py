"""Windows-like disks for the conversion tests: real NTFS (mkntfs, filled through ntfs-3g), a real FAT ESP
(mkfs.vfat, filled with mtools: the host kernel has no vfat), and SYSTEM hives made by hivex
(`hivexregedit --merge`) from .reg text shaped like a real SYSTEM hive. Results are read back with
reglookup, a parser that shares no code with hivex (what the conversion uses).

Layouts (as Windows setup makes them):
  bios: MBR, partition 1 "System Reserved" (active, Boot/BCD), partition 2 C: (Windows)
  uefi: GPT, ESP (FAT, EFI/Microsoft/Boot/bootmgfw.efi + BCD), MSR, C: (Windows)
Needs root (loop devices, FUSE).
"""

from __future__ import annotations

import contextlib
import json
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from image.core.run import run
from image.vm.convert_fixture import loop_device

MIB = 1024 * 1024
SYSTEM_CLASS = "{4d36e97d-e325-11ce-bfc1-08002be10318}"
# Every inbox (and virtio/VMware) storage service the conversion knows, as a Windows hive has them.
STORAGE_SERVICES = (
    "storahci",
    "msahci",
    "iaStorAVC",
    "iaStorV",
    "stornvme",
    "intelide",
    "pciide",
    "atapi",
    "LSI_SAS",
    "LSI_SCSI",
    "LSI_SAS2i",
    "LSI_SAS3i",
    "megasas",
    "megasas2i",
    "megasas35i",
    "pvscsi",
    "storvsc",
    "vmbus",
    "viostor",
    "vioscsi",
)
CLOUD_DRIVERS = ("ena", "xenvbd", "xenbus", "xenfilt")
CLOUD_AGENTS = ("AmazonSSMAgent", "EC2Launch")
DRIVER_PATH = "System32\\drivers\\{0}.sys"
AGENT_PATH = '"C:\\Program Files\\Amazon\\{0}\\{0}.exe"'


def minimal_hive(name: str = "SYSTEM") -> bytes:
    """An empty hive (base block + one hbin holding the root key and its security cell): hivex cannot make
    one from nothing, and hivexregedit --merge needs a hive to merge into."""

    def sid(auth: int, *subs: int) -> bytes:
        return struct.pack("<BB", 1, len(subs)) + auth.to_bytes(6, "big") + b"".join(struct.pack("<I", s) for s in subs)

    owner, group, everyone = sid(5, 32, 544), sid(5, 18), sid(1, 0)
    ace = struct.pack("<BBHI", 0, 3, 8 + len(everyone), 0xF003F) + everyone
    acl = struct.pack("<BBHHH", 2, 0, 8 + len(ace), 1, 0) + ace
    sd = struct.pack("<BBHIIII", 1, 0, 0x8004, 20 + len(acl), 20 + len(acl) + len(owner), 0, 20) + acl + owner + group
    root_name = b"ROOT"
    nk_len = 4 + 76 + len(root_name)
    nk_len += (-nk_len) % 8
    nk_off = 0x20
    sk_off = nk_off + nk_len
    nk = (
        struct.pack("<i", -nk_len)
        + b"nk"
        + struct.pack("<H", 0x2C)
        + b"\0" * 8
        + struct.pack(
            "<IIIIIIIIIIIIIIIHH",
            0,
            0xFFFFFFFF,
            0,
            0,
            0xFFFFFFFF,
            0xFFFFFFFF,
            0,
            0xFFFFFFFF,
            sk_off,
            0xFFFFFFFF,
            0,
            0,
            0,
            0,
            0,
            len(root_name),
            0,
        )
        + root_name
    )
    sk_len = 4 + 20 + len(sd)
    sk_len += (-sk_len) % 8
    sk = struct.pack("<i", -sk_len) + b"sk" + struct.pack("<HIIII", 0, sk_off, sk_off, 1, len(sd)) + sd
    cells = nk.ljust(nk_len, b"\0") + sk.ljust(sk_len, b"\0")
    free = 4096 - 0x20 - len(cells)
    cells += struct.pack("<i", free) + b"\0" * (free - 4)
    hbin = b"hbin" + struct.pack("<II", 0, 4096) + b"\0" * 20 + cells
    base = bytearray(4096)
    base[0:4] = b"regf"
    struct.pack_into("<IIIIIIIII", base, 4, 1, 1, 0, 0, 1, 3, 0, 1, nk_off)
    struct.pack_into("<II", base, 40, 4096, 1)
    fname = name.encode("utf-16-le")[:64]
    base[48 : 48 + len(fname)] = fname
    set_checksum(base)
    return bytes(base) + hbin


def set_checksum(base: bytearray) -> None:
    csum = 0
    for (word,) in struct.iter_unpack("<I", bytes(base[:508])):
        csum ^= word
    struct.pack_into("<I", base, 508, {0: 1, 0xFFFFFFFF: 0xFFFFFFFE}.get(csum, csum))


def _expand_sz(text: str) -> str:
    return "hex(2):" + ",".join(f"{b:02x}" for b in (text + "\0").encode("utf-16-le"))


def _multi_sz(items: Iterable[str]) -> str:
    return "hex(7):" + ",".join(f"{b:02x}" for b in ("".join(i + "\0" for i in items) + "\0").encode("utf-16-le"))


def system_reg(
    storage: Iterable[str] = STORAGE_SERVICES,
    *,
    current: int = 1,
    overrides: Iterable[str] = ("storahci", "stornvme"),
    cloud: bool = True,
) -> str:
    """.reg text of a SYSTEM hive: Select, ControlSet00N\\Services\\<driver> (Type, Start, ErrorControl, Group,
    ImagePath, StartOverride), the cloud drivers and agents, and the System class's UpperFilters."""
    cs = f"HKEY_LOCAL_MACHINE\\SYSTEM\\ControlSet{current:03d}"
    out = [
        "Windows Registry Editor Version 5.00",
        "",
        "[HKEY_LOCAL_MACHINE\\SYSTEM\\Select]",
        f'"Current"=dword:{current:08x}',
        f'"Default"=dword:{current:08x}',
        '"Failed"=dword:00000000',
        f'"LastKnownGood"=dword:{current:08x}',
        "",
        f"[{cs}]",
        "",
        f"[{cs}\\Control]",
        "",
        f"[{cs}\\Control\\Class]",
        "",
        f"[{cs}\\Control\\Class\\{SYSTEM_CLASS}]",
        '"Class"="System"',
        f'"UpperFilters"={_multi_sz(["xenfilt"] if cloud else [])}',
        "",
        f"[{cs}\\Services]",
        "",
    ]
    for svc in storage:
        out += [
            f"[{cs}\\Services\\{svc}]",
            '"Type"=dword:00000001',
            '"Start"=dword:00000003',
            '"ErrorControl"=dword:00000001',
            '"Group"="SCSI miniport"',
            f'"ImagePath"={_expand_sz(DRIVER_PATH.format(svc))}',
            "",
        ]
        if svc in overrides:
            out += [f"[{cs}\\Services\\{svc}\\StartOverride]", '"0"=dword:00000003', ""]
    if cloud:
        for svc in CLOUD_DRIVERS:
            start = 0 if svc in ("xenvbd", "xenbus", "xenfilt") else 3
            out += [
                f"[{cs}\\Services\\{svc}]",
                '"Type"=dword:00000001',
                f'"Start"=dword:{start:08x}',
                f'"ImagePath"={_expand_sz(DRIVER_PATH.format(svc))}',
                "",
            ]
        for svc in CLOUD_AGENTS:
            out += [
                f"[{cs}\\Services\\{svc}]",
                '"Type"=dword:00000010',
                '"Start"=dword:00000002',
                f'"ImagePath"={_expand_sz(AGENT_PATH.format(svc))}',
                "",
            ]
    return "\r\n".join(out) + "\r\n"


def build_hive(dest: Path, reg_text: str) -> Path:
    dest.write_bytes(minimal_hive())
    with tempfile.NamedTemporaryFile("w", suffix=".reg", encoding="utf-8") as reg:
        reg.write(reg_text)
        reg.flush()
        run(["hivexregedit", "--merge", "--prefix", "HKEY_LOCAL_MACHINE\\SYSTEM", str(dest), reg.name])
    return dest


def make_dirty(hive: bytes) -> bytes:
    """The hive as Windows leaves it mid-write: primary sequence number raised, secondary not (checksum right)."""
    base = bytearray(hive[:4096])
    primary, _secondary = struct.unpack_from("<II", base, 4)
    struct.pack_into("<I", base, 4, primary + 1)
    set_checksum(base)
    return bytes(base) + hive[4096:]


def reglookup(hive: Path) -> dict[str, tuple[str, str]]:
    """Every key and value as reglookup prints it: {"/ControlSet001/Services/x/Start": ("DWORD", "0x00000000")}."""
    out = subprocess.run(["reglookup", "-H", str(hive)], check=True, capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split(",")
        if len(parts) >= 3:
            found[parts[0]] = (parts[1], parts[2])
    return found


@contextlib.contextmanager
def _ntfs_mounted(node: str, where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    run(["ntfs-3g", node, str(where)])
    try:
        yield where
    finally:
        run(["umount", str(where)])


def windows_files(
    root: Path, hive: bytes, *, drivers: Iterable[str], logs: bool = False, hiberfil: bool = False
) -> None:
    """C: as Windows has it: Windows/System32/config/SYSTEM (+ logs), drivers/*.sys, optionally hiberfil.sys."""
    config = root / "Windows" / "System32" / "config"
    config.mkdir(parents=True)
    (config / "SYSTEM").write_bytes(hive)
    for log in ("SYSTEM.LOG1", "SYSTEM.LOG2"):
        (config / log).write_bytes(b"DIRT" + b"\0" * 508 if logs else b"")
    drv = root / "Windows" / "System32" / "drivers"
    drv.mkdir()
    for name in drivers:
        (drv / f"{name}.sys").write_bytes(b"MZ stand-in driver " + name.encode())
    (root / "Windows" / "System32" / "ntoskrnl.exe").write_bytes(b"MZ stand-in kernel")
    if hiberfil:
        (root / "hiberfil.sys").write_bytes(b"HIBR" + b"\0" * 4092)


def make_windows_disk(
    img: Path,
    layout: str,
    hive: bytes,
    *,
    drivers: Iterable[str] = STORAGE_SERVICES + CLOUD_DRIVERS,
    logs: bool = False,
    hiberfil: bool = False,
    size_mib: int = 160,
) -> Path:
    """A Windows disk image in the given layout ("bios" or "uefi") with `hive` as its SYSTEM hive."""
    with img.open("wb") as f:
        f.truncate(size_mib * MIB)
    if layout == "bios":
        table = "label: dos\nsize=40M, type=7, bootable\ntype=7\n"
    elif layout == "uefi":
        table = (
            'label: gpt\nsize=40M, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI system partition"\n'
            'size=16M, type=E3C9E316-0B5C-4DB8-817D-F92DF00215AE, name="Microsoft reserved partition"\n'
            'type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name="Basic data partition"\n'
        )
    else:
        raise ValueError(f"unknown layout {layout!r}")
    subprocess.run(["sfdisk", "-q", str(img)], check=True, text=True, capture_output=True, input=table)
    mnt = img.parent / f"{img.stem}-mnt"
    starts = [
        p["start"]
        for p in json.loads(
            subprocess.run(["sfdisk", "--json", str(img)], check=True, capture_output=True, text=True).stdout
        )["partitiontable"]["partitions"]
    ]

    def mkntfs(node: str, number: int, label: str) -> None:
        # The geometry Windows' boot code wants (a loop device reports none; mkntfs warns without it).
        run(["mkntfs", "-Q", "-F", "-p", str(starts[number - 1]), "-H", "255", "-S", "63", "-L", label, node])

    with loop_device(img) as dev:
        windows = f"{dev}p2" if layout == "bios" else f"{dev}p3"
        if layout == "bios":
            mkntfs(f"{dev}p1", 1, "System Reserved")
            with _ntfs_mounted(f"{dev}p1", mnt):
                (mnt / "Boot").mkdir()
                (mnt / "Boot" / "BCD").write_bytes(minimal_hive("BCD"))
                (mnt / "bootmgr").write_bytes(b"stand-in bootmgr")
        else:
            run(["mkfs.vfat", "-F", "32", "-n", "SYSTEM", f"{dev}p1"])
            esp = ["-i", f"{dev}p1"]
            env = {"MTOOLS_SKIP_CHECK": "1"}
            for d in ("::/EFI", "::/EFI/Microsoft", "::/EFI/Microsoft/Boot"):
                run(["mmd", *esp, d], env=env)
            with tempfile.TemporaryDirectory() as tmp:
                for name, data in (("bootmgfw.efi", b"MZ stand-in bootmgfw.efi"), ("BCD", minimal_hive("BCD"))):
                    (Path(tmp) / name).write_bytes(data)
                    run(["mcopy", *esp, str(Path(tmp) / name), f"::/EFI/Microsoft/Boot/{name}"], env=env)
        mkntfs(windows, 2 if layout == "bios" else 3, "Windows")
        with _ntfs_mounted(windows, mnt):
            windows_files(mnt, hive, drivers=drivers, logs=logs, hiberfil=hiberfil)
    mnt.rmdir()
    return img


@contextlib.contextmanager
def mounted_windows(img: Path, layout: str) -> Iterator[Path]:
    """The image's C: mounted read-only (to read the hive after a conversion)."""
    with loop_device(img) as dev:
        node = f"{dev}p2" if layout == "bios" else f"{dev}p3"
        where = img.parent / f"{img.stem}-check"
        where.mkdir(exist_ok=True)
        run(["ntfs-3g", "-o", "ro", node, str(where)])
        try:
            yield where
        finally:
            run(["umount", str(where)])
            where.rmdir()


def esp_files(img: Path) -> list[str]:
    """Every file path on the UEFI layout's ESP (partition 1), via mtools."""
    start = (
        int(
            subprocess.run(["sfdisk", "--json", str(img)], check=True, capture_output=True, text=True)
            .stdout.split('"start":', 1)[1]
            .split(",", 1)[0]
        )
        * 512
    )
    out = subprocess.run(
        ["mdir", "-/", "-b", "-i", f"{img}@@{start}", "::/"],
        capture_output=True,
        text=True,
        env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"},
    ).stdout
    return sorted(line.strip().removeprefix("::") for line in out.splitlines() if line.strip())


def e2e_windows_volume(dest: Path) -> Path:
    """The e2e's Windows-like recovery volume (BIOS layout: the e2e boots the client with SeaBIOS)."""
    with tempfile.TemporaryDirectory() as tmp:
        hive = build_hive(Path(tmp) / "SYSTEM", system_reg()).read_bytes()
    dest.unlink(missing_ok=True)
    return make_windows_disk(dest, "bios", hive)


def converted_hive(img: Path, layout: str) -> dict[str, tuple[str, str]]:
    """reglookup of the SYSTEM hive on `img` (after the guest converted it)."""
    with mounted_windows(img, layout) as c:
        return reglookup(c / "Windows" / "System32" / "config" / "SYSTEM")
