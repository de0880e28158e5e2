"""The whole failback in QEMU (image/vm/e2e.py, `inv e2e`): the ISO boots (TCG, 1 GiB) with an empty disk and a
seed volume, the client runs unattended against the control plane, S3 and the agent on the host, the test
presses Failback, the guest completes and reboots, and its disk equals the source volume.

The ISO: FAILBACK_E2E_ISO if set, else build/e2e's (`inv build -b build/e2e`) if built, else the session's
default build (CI).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from image.vm.e2e import E2EOptions, credential_lines, default_iso, run_e2e


@pytest.mark.e2e
@pytest.mark.root
def test_failback_in_qemu(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    iso = Path(os.environ["FAILBACK_E2E_ISO"]) if os.environ.get("FAILBACK_E2E_ISO") else default_iso()
    if not iso.is_file():
        iso = request.getfixturevalue("built_iso")
    # The admin's credentials expire 60 s after pairing; the client's own live 30 s (refreshed by it).
    res = run_e2e(E2EOptions(iso=iso, work=tmp_path, installation_ttl=60, client_credentials_ttl=30))
    print(f"\ne2e: ready after {res.seconds_to_ready:.0f} s, total {res.seconds_total:.0f} s, QEMU {res.boot_outcome}")
    print("\n".join(credential_lines(res)))
    print(f"source sha512: {res.source_sha512}\ntarget sha512: {res.target_sha512}")
    detail = "\n".join(res.notes)
    assert res.job_status == "COMPLETED", detail
    assert res.failback_state == "FAILBACK_COMPLETED", detail
    assert res.target_sha512 == res.source_sha512, detail
    assert res.credential_counts["access denied"] == 0, res.credential_counts
    assert res.credential_counts["credential refreshes"] >= 2, res.credential_counts
    # the failback went on past the installation credentials' expiry, never using them again
    assert res.installation_expired_before_completion_s is not None, detail
    assert res.installation_expired_before_completion_s > 0, res.installation_expired_before_completion_s
    assert res.credential_counts["expired token"] == 0, res.credential_counts
    # REBOOT=1 in the seed: after reporting completion the guest ejects its medium and restarts
    assert res.boot_outcome == "matched", detail
    # the OS volume, converted by the guest after the final sync, boots on this machine (virtio-blk, not NVMe)
    # and gets an address by DHCP (the unconverted image does not: tests/test_convert_linux.py)
    print(
        f"converted OS volume: {res.converted_boot} after {res.converted_boot_seconds:.0f} s: {res.converted_boot_line}"
    )
    assert res.converted and res.converted_boot == "matched", detail


@pytest.mark.e2e
@pytest.mark.root
def test_windows_failback_in_qemu(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A Windows-like volume (NTFS, SYSTEM hive) fails back; the LiveCD converts it; the host reads the hive
    afterwards with reglookup (not the hivex the guest used)."""
    iso = Path(os.environ["FAILBACK_E2E_ISO"]) if os.environ.get("FAILBACK_E2E_ISO") else default_iso()
    if not iso.is_file():
        iso = request.getfixturevalue("built_iso")
    res = run_e2e(E2EOptions(iso=iso, work=tmp_path, windows=True))
    detail = "\n".join(res.notes)
    print(f"\ne2e (Windows): ready after {res.seconds_to_ready:.0f} s, total {res.seconds_total:.0f} s")
    assert res.job_status == "COMPLETED" and res.failback_state == "FAILBACK_COMPLETED", detail
    assert res.target_sha512 == res.source_sha512, detail
    # The guest's machine: ICH9 AHCI and virtio-blk controllers -> storahci and viostor start at boot.
    services = "/ControlSet001/Services"
    for svc in ("storahci", "viostor"):
        assert res.windows_hive[f"{services}/{svc}/Start"] == ("DWORD", "0x00000000"), (svc, detail)
    assert not any(k.startswith(f"{services}/storahci/StartOverride") for k in res.windows_hive)
    for svc in ("ena", "AmazonSSMAgent", "EC2Launch"):
        assert res.windows_hive[f"{services}/{svc}/Start"] == ("DWORD", "0x00000004"), svc
    # The report as DRS received it (SendClientLogsForDrs at completion): the client runs on whichever console
    # (serial or tty1) claims it first, so the serial log may hold only "running on tty1".
    sent = "\n".join(res.client_log)
    assert "Changes made on the target" in sent and "storahci: Start 3 (demand) -> 0 (boot)" in sent, sent[-3000:]
