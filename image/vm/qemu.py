"""Booting the ISO (or a bare kernel) under QEMU and watching its serial console.

Firmware is chosen by feature from QEMU's firmware descriptors (docs/interop/firmware.json in
QEMU; Debian's ovmf package installs them in /usr/share/qemu/firmware): a Secure Boot way needs
a descriptor with `secure-boot` + `enrolled-keys` (Microsoft keys), a plain UEFI way one without
`secure-boot`. Each UEFI boot gets its own copy of the descriptor's NVRAM template, since the
firmware writes its variables back.

QEMU runs under TCG (no KVM here), headless, its serial port written to a file. A watcher thread
reads that file; once the awaited line appears it records the time and asks QEMU to quit over
QMP, so QEMU itself runs through image.core.run.run() like every other command of the build.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import resource
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

from image.core.errors import ImageError
from image.core.run import CommandTimeout, run
from image.vm.initramfs import BARE_MARKER, write_marker_initramfs

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
# QEMU's search order: a file in /etc overrides the one with the same name in /usr/share.
FIRMWARE_DIRS: tuple[Path, ...] = (Path("/etc/qemu/firmware"), Path("/usr/share/qemu/firmware"))
# Machine type -> the prefix of its versioned names, which descriptors match with globs (pc-q35-*).
_MACHINE_PREFIX = {"q35": "pc-q35-", "pc": "pc-i440fx-"}

MEMORY_MIB = 1024
MACHINE = "q35"

# Lines that mean the boot is over and failed: stop waiting at once.
FAILURE_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"Kernel panic - not syncing.*"),
    re.compile(r"^\(initramfs\) ", re.M),
    re.compile(r"No bootable device.*"),
    re.compile(r".*Access Denied.*"),
    re.compile(r".*Security Violation.*"),
    re.compile(r"BdsDxe: No bootable option or device was found.*"),
    re.compile(r"^Shell> ", re.M),  # OVMF fell back to its UEFI shell
)
_ANSI = re.compile(r"\x1b(\[[0-9;?=<>]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>78cDEHM])")


class QemuError(ImageError, RuntimeError):
    """QEMU cannot be set up for a boot (missing firmware, bad image...)."""


# --- firmware -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Firmware:
    """A UEFI flash firmware described by one of QEMU's JSON descriptors."""

    descriptor: Path
    description: str
    code: Path
    vars_template: Path
    features: frozenset[str]
    machines: tuple[str, ...]

    @property
    def secure_boot_enforced(self) -> bool:
        # `secure-boot` alone ships an empty varstore: Secure Boot is then not enforced.
        return {"secure-boot", "enrolled-keys"} <= self.features

    @property
    def requires_smm(self) -> bool:
        return "requires-smm" in self.features

    def supports_machine(self, machine: str) -> bool:
        prefix = _MACHINE_PREFIX.get(machine, machine)
        return any(fnmatch.fnmatch(prefix, glob) or fnmatch.fnmatch(machine, glob) for glob in self.machines)


def load_firmware_descriptors(dirs: Sequence[Path] = FIRMWARE_DIRS, arch: str = "x86_64") -> list[Firmware]:
    """The UEFI flash firmwares for `arch` described in `dirs`, in QEMU's priority order (file name)."""
    by_name: dict[str, Path] = {}
    for d in dirs:
        if d.is_dir():
            for f in d.glob("*.json"):
                by_name.setdefault(f.name, f)
    found = []
    for name in sorted(by_name):
        path = by_name[name]
        try:
            desc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable firmware descriptor %s: %s", path, exc)
            continue
        mapping = desc.get("mapping", {})
        if "uefi" not in desc.get("interface-types", []) or mapping.get("device") != "flash":
            continue
        machines = tuple(m for t in desc.get("targets", []) if t.get("architecture") == arch for m in t["machines"])
        executable, template = mapping.get("executable", {}), mapping.get("nvram-template", {})
        if not machines or executable.get("format", "raw") != "raw" or "filename" not in template:
            continue
        found.append(
            Firmware(
                descriptor=path,
                description=desc.get("description", ""),
                code=Path(executable["filename"]),
                vars_template=Path(template["filename"]),
                features=frozenset(desc.get("features", [])),
                machines=machines,
            )
        )
    return found


def select_uefi_firmware(descriptors: Iterable[Firmware], *, secure_boot: bool, machine: str = MACHINE) -> Firmware:
    """The first descriptor (by priority) for `machine` with Secure Boot enforced (Microsoft keys
    enrolled) when `secure_boot`, else the first without Secure Boot."""
    descriptors = list(descriptors)
    for fw in descriptors:
        if not fw.supports_machine(machine) or not fw.code.is_file() or not fw.vars_template.is_file():
            continue
        if secure_boot and fw.secure_boot_enforced:
            return fw
        if not secure_boot and "secure-boot" not in fw.features:
            return fw
    want = "secure-boot + enrolled-keys" if secure_boot else "no secure-boot"
    seen = ", ".join(f"{fw.descriptor.name} [{' '.join(sorted(fw.features))}]" for fw in descriptors) or "none"
    raise QemuError(
        f"no UEFI firmware descriptor for machine {machine} with {want} (descriptors: {seen}); "
        "install the ovmf package (./install-deps.sh)"
    )


# --- boot ways and QEMU command lines --------------------------------------------------------------------


@dataclass(frozen=True)
class BootWay:
    """One way of booting the ISO: firmware, Secure Boot, and CD or hard disk (= USB stick)."""

    name: str
    firmware: Literal["bios", "uefi"]
    secure_boot: bool
    medium: Literal["cd", "disk"]

    @property
    def boot_mode(self) -> str:
        """What the client must report as `boot mode:`."""
        return "UEFI" if self.firmware == "uefi" else "BIOS"

    @property
    def secure_boot_state(self) -> str:
        """What the client must report as `secure boot:`."""
        return "on" if self.secure_boot else "off"


BOOT_WAYS: tuple[BootWay, ...] = (
    BootWay("seabios-cd", "bios", False, "cd"),
    BootWay("seabios-disk", "bios", False, "disk"),
    BootWay("ovmf-cd", "uefi", False, "cd"),
    BootWay("ovmf-disk", "uefi", False, "disk"),
    BootWay("ovmf-secureboot-cd", "uefi", True, "cd"),
    BootWay("ovmf-secureboot-disk", "uefi", True, "disk"),
)


def boot_way(name: str) -> BootWay:
    for way in BOOT_WAYS:
        if way.name == name:
            return way
    raise QemuError(f"unknown boot way {name!r}; known: {', '.join(w.name for w in BOOT_WAYS)}")


def _base_argv(*, serial_log: Path, qmp_socket: Path, memory_mib: int, smm: bool, cpus: int = 1) -> list[str]:
    return [
        QEMU,
        "-accel", "tcg",
        "-machine", f"{MACHINE},smm={'on' if smm else 'off'}",
        "-m", str(memory_mib),
        "-smp", str(cpus),
        # -nodefaults + explicit devices: -nographic would put QEMU's monitor on our stdin/stdout.
        "-nodefaults",
        "-display", "none",
        "-vga", "std",
        "-serial", f"file:{serial_log}",
        "-monitor", "none",
        "-qmp", f"unix:{qmp_socket},server=on,wait=off",
        "-rtc", "base=utc",
        "-nic", "user,model=virtio-net-pci",
        "-device", "virtio-rng-pci",
        "-no-reboot",
    ]  # fmt: skip


def _firmware_argv(firmware: Firmware | None, vars_file: Path | None) -> list[str]:
    if firmware is None:
        return []  # SeaBIOS, QEMU's default
    if vars_file is None:
        raise QemuError(f"{firmware.descriptor.name}: a UEFI boot needs its own copy of {firmware.vars_template}")
    argv = [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={firmware.code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}",
    ]  # fmt: skip
    if firmware.requires_smm:
        # Only SMM code may then write the flash: what keeps Secure Boot variables tamper-proof.
        argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return argv


def copy_vars(firmware: Firmware, dest: Path) -> Path:
    """A fresh, writable copy of the firmware's NVRAM template for one boot."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(firmware.vars_template, dest)
    dest.chmod(0o644)
    return dest


def iso_argv(
    way: BootWay,
    *,
    image: Path,
    serial_log: Path,
    qmp_socket: Path,
    firmware: Firmware | None = None,
    vars_file: Path | None = None,
    memory_mib: int = MEMORY_MIB,
    cpus: int = 1,
) -> list[str]:
    """The QEMU command that boots `image` (the ISO, or its El Torito-less copy for disk ways), on
    `cpus` vCPUs (one TCG thread each: more than the host's cores only slows every one down)."""
    if (way.firmware == "uefi") != (firmware is not None) or (firmware is None) != (vars_file is None):
        raise QemuError(f"{way.name}: UEFI ways need firmware and a vars file, BIOS ways neither")
    if firmware is not None and way.secure_boot != firmware.secure_boot_enforced:
        raise QemuError(f"{way.name}: firmware {firmware.descriptor.name} does not match secure_boot={way.secure_boot}")
    smm = firmware is not None and firmware.requires_smm
    argv = _base_argv(serial_log=serial_log, qmp_socket=qmp_socket, memory_mib=memory_mib, smm=smm, cpus=cpus)
    argv += _firmware_argv(firmware, vars_file)
    if way.medium == "cd":
        argv += [
            "-drive", f"if=none,id=boot,file={image},format=raw,media=cdrom,readonly=on",
            "-device", "ide-cd,drive=boot,bootindex=0",
        ]  # fmt: skip
    else:
        # snapshot=on: the guest may write to its "USB stick"; those writes go to a throw-away overlay.
        argv += [
            "-drive", f"if=none,id=boot,file={image},format=raw,media=disk,snapshot=on",
            "-device", "ide-hd,drive=boot,bootindex=0",
        ]  # fmt: skip
    return argv


def kernel_argv(
    *,
    kernel: Path,
    initrd: Path,
    append: str,
    serial_log: Path,
    qmp_socket: Path,
    memory_mib: int = MEMORY_MIB,
    firmware: Firmware | None = None,
    vars_file: Path | None = None,
    cpus: int = 1,
) -> list[str]:
    """A direct kernel boot on the same machine as the ISO ways (SeaBIOS unless `firmware`): the
    benchmark's baseline."""
    smm = firmware is not None and firmware.requires_smm
    argv = _base_argv(serial_log=serial_log, qmp_socket=qmp_socket, memory_mib=memory_mib, smm=smm, cpus=cpus)
    argv += _firmware_argv(firmware, vars_file)
    return [*argv, "-kernel", str(kernel), "-initrd", str(initrd), "-append", append]


# --- running a boot and watching the serial console -----------------------------------------------------------


def clean_console(data: bytes) -> str:
    """Serial bytes as text without terminal escape sequences and carriage returns."""
    return _ANSI.sub("", data.decode("utf-8", errors="replace")).replace("\r", "")


def qmp_quit(qmp_socket: Path, timeout: float = 5.0) -> bool:
    """Ask QEMU to quit through its QMP socket. False when QEMU is already gone."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(os.fspath(qmp_socket))
            f = s.makefile("rwb")
            f.readline()  # greeting
            for cmd in ({"execute": "qmp_capabilities"}, {"execute": "quit"}):
                f.write(json.dumps(cmd).encode() + b"\n")
                f.flush()
                f.readline()
        return True
    except OSError:
        return False


@dataclass
class BootResult:
    """What a watched boot did."""

    outcome: Literal["matched", "failed", "exited", "timeout"]
    seconds: float  # from QEMU's start to the match (or to the end)
    match: str | None  # the matched line, or the failure line
    serial_log: Path
    qemu_output: str = ""
    groups: tuple[str | None, ...] = field(default_factory=tuple)
    # CPU seconds the host spent on this QEMU (user + system, to its exit ~0.5 s after the match).
    # Unlike `seconds` it hardly moves with the machine's load (it would miss time a guest sleeps, but
    # under TCG firmware and boot loaders busy-wait). Only meaningful when no other child ran alongside.
    cpu_seconds: float | None = None

    def tail(self, lines: int = 30) -> str:
        try:
            text = clean_console(self.serial_log.read_bytes())
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def watch_boot(
    argv: Sequence[str],
    *,
    serial_log: Path,
    qmp_socket: Path,
    pattern: re.Pattern[str],
    timeout: float,
    failures: Sequence[re.Pattern[str]] = FAILURE_PATTERNS,
    poll: float = 0.1,
) -> BootResult:
    """Run QEMU (`argv`) until `pattern` shows on the serial console, a failure pattern shows, QEMU
    exits, or `timeout` seconds pass. The serial log stays in `serial_log`."""
    serial_log.parent.mkdir(parents=True, exist_ok=True)
    serial_log.write_bytes(b"")
    with contextlib.suppress(FileNotFoundError):
        qmp_socket.unlink()
    done = threading.Event()
    seen: dict[str, object] = {}
    start = time.monotonic()

    def watcher() -> None:
        while not done.wait(poll):
            try:
                text = clean_console(serial_log.read_bytes())
            except OSError:
                continue
            m = pattern.search(text)
            if m:
                seen.update(outcome="matched", t=time.monotonic() - start, match=m)
            else:
                for bad in failures:
                    fm = bad.search(text)
                    if fm:
                        seen.update(outcome="failed", t=time.monotonic() - start, match=fm)
                        break
            if seen:
                # Let QEMU flush the rest of the line to the log before it goes.
                time.sleep(0.5)
                qmp_quit(qmp_socket)
                return

    thread = threading.Thread(target=watcher, name=f"watch-{serial_log.name}", daemon=True)
    thread.start()
    qemu_output = ""
    timed_out = False
    cpu: float | None = None
    try:
        cpu_before = _children_cpu()
        proc = run(argv, capture=True, check=False, timeout=timeout)
        cpu = _children_cpu() - cpu_before
        qemu_output = (proc.stdout + proc.stderr).strip()
        exit_status = proc.returncode
    except CommandTimeout as exc:
        timed_out, exit_status = True, -1
        qemu_output = exc.output
    finally:
        end = time.monotonic() - start
        done.set()
        thread.join()
    # QEMU may have exited (power-off) before the watcher's last look: look once more.
    if not seen:
        text = clean_console(serial_log.read_bytes())
        m = pattern.search(text)
        if m:
            seen.update(outcome="matched", t=end, match=m)
    if seen:
        found = seen["match"]
        assert isinstance(found, re.Match)
        return BootResult(
            outcome=cast('Literal["matched", "failed"]', seen["outcome"]),  # set beside the match
            seconds=float(cast(float, seen["t"])),
            match=_whole_line(found),
            serial_log=serial_log,
            qemu_output=qemu_output,
            groups=found.groups(),
            cpu_seconds=cpu,
        )
    if timed_out:
        return BootResult("timeout", end, None, serial_log, qemu_output)
    return BootResult("exited", end, f"QEMU exited with status {exit_status}", serial_log, qemu_output, cpu_seconds=cpu)


def _children_cpu() -> float:
    """User + system CPU seconds of this process's waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _whole_line(m: re.Match[str]) -> str:
    """The match up to the end of its console line (the summary line goes on past what the regex
    needs). Not from the line's start: boot menus draw with cursor moves, not newlines."""
    end = m.string.find("\n", m.end())
    return m.string[m.start() : end if end != -1 else len(m.string)].strip()


def short_socket_path(name: str) -> Path:
    """A QMP socket path short enough for AF_UNIX (108 bytes), whatever the work directory."""
    return Path(tempfile.mkdtemp(prefix="fb-qmp-")) / f"{name}.sock"


# --- the baseline: a bare kernel with a tiny initramfs (image/vm/initramfs.py) ---------------------------


def boot_bare_kernel(
    kernel: Path,
    workdir: Path,
    *,
    timeout: float = 120,
    append: str = "console=tty0 console=ttyS0,115200n8",
    cpus: int = 1,
    firmware: Firmware | None = None,
) -> BootResult:
    """Boot `kernel` with the marker initramfs on the BIOS machine (or, with `firmware`, the same
    machine with that UEFI firmware loading the kernel directly); seconds until the marker."""
    initrd = write_marker_initramfs(workdir / "marker-initramfs.cpio.gz")
    serial_log = workdir / "bare-kernel.serial.log"
    vars_file = copy_vars(firmware, workdir / "bare-kernel.vars.fd") if firmware is not None else None
    qmp = short_socket_path("bare")
    try:
        argv = kernel_argv(
            kernel=kernel,
            initrd=initrd,
            append=f"{append} panic=-1",
            serial_log=serial_log,
            qmp_socket=qmp,
            cpus=cpus,
            firmware=firmware,
            vars_file=vars_file,
        )
        return watch_boot(
            argv, serial_log=serial_log, qmp_socket=qmp, pattern=re.compile(re.escape(BARE_MARKER)), timeout=timeout
        )
    finally:
        shutil.rmtree(qmp.parent, ignore_errors=True)
