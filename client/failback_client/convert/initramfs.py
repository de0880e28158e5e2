"""Making the target's initramfs carry the drivers this machine needs, with the distribution's own tool."""

from __future__ import annotations

import logging
from pathlib import Path

from failback_client.convert.files import Transaction
from failback_client.convert.model import ConversionError
from failback_client.convert.runner import CommandFailed, chroot

log = logging.getLogger(__name__)

STEP = "initramfs"
BEGIN = "# --- added by failback conversion: drivers this machine needs ---"
END = "# --- end of failback conversion ---"
MODULES_FILE = "/etc/initramfs-tools/modules"
DRACUT_CONF = "/etc/dracut.conf.d/90-failback-drivers.conf"


def with_block(text: str, modules: list[str]) -> str:
    """`text` of /etc/initramfs-tools/modules with our block holding `modules` (replaced when present);
    modules already listed outside the block are not repeated."""
    lines = text.splitlines()
    if BEGIN in lines:
        start = lines.index(BEGIN)
        end = lines.index(END, start) if END in lines[start:] else len(lines) - 1
        lines = lines[:start] + lines[end + 1 :]
    listed = {line.split()[0] for line in lines if line.strip() and not line.lstrip().startswith("#")}
    wanted = [m for m in modules if m not in listed]
    while lines and not lines[-1].strip():
        lines.pop()
    if wanted:
        lines += ["", BEGIN, *wanted, END]
    return "\n".join(lines) + "\n"


def dracut_conf(modules: list[str]) -> str:
    return f'# Written by failback conversion: drivers this machine needs.\nadd_drivers+=" {" ".join(modules)} "\n'


def _initrd_images(root: Path, tool: str) -> list[str]:
    pattern = "initrd.img-*" if tool == "initramfs-tools" else "initramfs-*.img"
    return sorted(
        f"/boot/{p.name}"
        for p in (root / "boot").glob(pattern)
        if not p.name.endswith((".failback-bak", ".dpkg-bak", ".old-dkms")) and p.is_file()
    )


def regenerate(tx: Transaction, tool: str, modules: list[str]) -> None:
    root = tx.root
    images = _initrd_images(root, tool)
    if not images:
        raise ConversionError(STEP, "no initramfs found in /boot of the target (is /boot mounted?)")
    if tool == "initramfs-tools":
        tx.write(
            MODULES_FILE, with_block(tx.read(MODULES_FILE) or "", modules), f"initramfs drivers: {' '.join(modules)}"
        )
        cmd = ["update-initramfs", "-u", "-k", "all"]
    elif tool == "dracut":
        tx.write(DRACUT_CONF, dracut_conf(modules), f"initramfs drivers: {' '.join(modules)}")
        cmd = ["dracut", "-f", "--regenerate-all"]
    else:
        raise ConversionError(
            STEP,
            f"the target's initramfs tool ({tool or 'none found'}) is not supported: "
            "regenerate its initramfs with the drivers listed in the report by hand",
        )
    backups = {img: tx.backup_binary(img) for img in images}
    try:
        chroot(root, *cmd)
    except CommandFailed as exc:
        raise ConversionError(STEP, str(exc)) from None
    for img in images:
        tx.record(img, "regenerated", f"{tool}: {' '.join(cmd)}", backups[img])
