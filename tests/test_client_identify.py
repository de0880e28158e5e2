"""Guide step 8: this machine's identity (physical NIC MACs, DMI UUID as a VMware UUID) → recovery instance."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from failback_client.api import DrsApi
from failback_client.identify import by_hardware, local_identity
from failback_client.settings import Settings

from tests.controlplane_fixture import ControlPlaneHandle, drs_controlplane_factory  # noqa: F401
from tests.test_client_helpers import BIOS_ROOT, ORIGINAL_RI, SEED, UEFI_ROOT


def test_physical_nics_only_and_uuid_byte_orders() -> None:
    ident = local_identity(BIOS_ROOT)
    assert ident.macs == ["52:54:00:12:34:56", "52:54:00:ab:cd:ef"]  # not lo, not docker0 (no device link)
    assert ident.hostname == "failback-livecd"
    assert ident.vmware_uuids() == ["4c4c4544-0042-3510-8052-b4c04f333532", "44454c4c-4200-1035-8052-b4c04f333532"]
    assert ident.hardware_ids() == [*ident.macs, *ident.vmware_uuids()]


def api_for(cp: ControlPlaneHandle) -> DrsApi:
    settings = Settings(access_key_id=cp.access_key, secret_access_key=cp.secret_key, region=cp.region, endpoint=cp.url)
    return DrsApi(settings)


def test_vmware_uuid_in_the_other_byte_order_finds_the_source_server(
    drs_controlplane_factory,  # noqa: F811
    tmp_path: Path,
) -> None:
    cp = drs_controlplane_factory(seed=SEED)
    root = tmp_path / "root"
    shutil.copytree(UEFI_ROOT, root, symlinks=True)
    stored = uuid.UUID(SEED["source_servers"][0]["vmware_uuid"])
    # SMBIOS shows the first three fields byte-swapped relative to what VMware reports
    (root / "sys/class/dmi/id/product_uuid").write_text(str(uuid.UUID(bytes_le=stored.bytes)).upper() + "\n")
    hit = by_hardware(api_for(cp), local_identity(str(root)))
    assert hit is not None
    instance, reason = hit
    assert instance["recoveryInstanceID"] == ORIGINAL_RI
    assert reason == (
        f"this machine's VMware UUID {stored} belongs to source server s-aaaaaaaaaaaaaaaaa (orig01), "
        f"whose recovery instance is {ORIGINAL_RI}"
    )


def test_unknown_machine_is_not_matched(drs_controlplane_factory) -> None:  # noqa: F811
    cp = drs_controlplane_factory(seed=SEED)
    assert by_hardware(api_for(cp), local_identity(UEFI_ROOT)) is None
