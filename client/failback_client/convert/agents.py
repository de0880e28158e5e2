"""Cloud-only agents (cloud-init, the SSM agent...) fail or wait for an instance metadata service off the
cloud: their units are masked (a link to /dev/null in /etc/systemd/system, undone by `systemctl unmask`)."""

from __future__ import annotations

from failback_client.convert.files import Transaction

UNIT_DIRS = ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")
CLOUD_INIT_DISABLED = "/etc/cloud/cloud-init.disabled"


def installed_units(tx: Transaction, names: tuple[str, ...]) -> list[str]:
    found = []
    for name in names:
        for d in UNIT_DIRS:
            path = tx.host(f"{d}/{name}")
            if (path.exists() or path.is_symlink()) and not (
                path.is_symlink() and str(path.readlink()) == "/dev/null" and d != "/etc/systemd/system"
            ):
                found.append(name)
                break
    return found


def disable_agents(tx: Transaction, names: tuple[str, ...]) -> list[str]:
    """Mask each installed unit of `names`; returns the units masked (or already masked)."""
    units = installed_units(tx, names)
    for unit in units:
        tx.symlink(
            f"/etc/systemd/system/{unit}",
            "/dev/null",
            "masked",
            f"cloud-only agent {unit} masked (undo: systemctl unmask {unit})",
        )
    if tx.host("/etc/cloud").is_dir():
        # cloud-init's own switch, in case one of its units is not in the list.
        tx.write(
            CLOUD_INIT_DISABLED,
            "Written by failback conversion: cloud-init is not used on this machine.\n",
            "cloud-init disabled",
        )
    return units
