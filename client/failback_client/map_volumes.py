"""Guide steps 10-11: choose the volume mapping from --device-mapping, DRS's suggestion (original server)
or per-volume prompts (a local disk, EXCLUDE, or ALL="<whole mapping>")."""

from __future__ import annotations

import logging

from failback_client.api import DrsApi
from failback_client.console import Console
from failback_client.devices import LocalDisk, human_size
from failback_client.errors import EXIT_MAPPING, ClientError
from failback_client.mapping import (
    API_KEYS,
    EXCLUDE,
    MappedVolume,
    MappingError,
    RecoveryDisk,
    check_size,
    from_api,
    parse_device_mapping,
    resolve_local,
    validate_mapping,
)
from failback_client.settings import missing_error

log = logging.getLogger(__name__)


class MappingFailed(ClientError):
    exit_status = EXIT_MAPPING


def show_local_disks(console: Console, local: list[LocalDisk]) -> None:
    rows = [
        (
            d.path,
            human_size(d.size_bytes),
            ", ".join(d.by_path) or "-",
            ", ".join(d.by_id) or "-",
            d.model or "-",
            "IN USE: " + "; ".join(u.what for u in d.in_use) if d.in_use else "free",
        )
        for d in local
        if not d.boot_medium
    ]
    console.table(("Local disk", "Size", "by-path", "by-id", "Model", "State"), rows, title="Local disks")


def show_mapping(console: Console, volumes: list[MappedVolume]) -> None:
    rows = [
        (
            v.recovery.name,
            human_size(v.recovery.size_bytes),
            v.target,
            human_size(v.local.size_bytes) if v.local else "-",
        )
        for v in volumes
    ]
    console.table(("Recovery volume", "Size", "Local disk", "Local size"), rows, title="Volume mapping")


def from_text(text: str, recovery: list[RecoveryDisk], local: list[LocalDisk], value_format: str) -> list[MappedVolume]:
    return validate_mapping(parse_device_mapping(text), recovery, local, value_format)


def choose_mapping(
    api: DrsApi,
    console: Console,
    *,
    client_id: str,
    recovery_instance_id: str,
    recovery: list[RecoveryDisk],
    local: list[LocalDisk],
    local_api: list[dict],
    original_server: bool,
    device_mapping: str | None,
    value_format: str,
    no_prompt: bool,
) -> list[MappedVolume]:
    if device_mapping:
        try:
            volumes = from_text(device_mapping, recovery, local, value_format)
            console.ok("Using the volume mapping given with --device-mapping / DEVICE_MAPPING")
            return volumes
        except MappingError as e:
            if no_prompt:
                raise MappingFailed(f"--device-mapping refused: {e}") from None
            console.error(f"--device-mapping refused: {e}. Enter the mapping below instead.")
    why = "this machine is not the original source server, so DRS suggests no mapping"
    if not device_mapping and original_server:
        suggestion = api.suggested_mapping(client_id, recovery_instance_id, local_api)
        items = suggestion.get("deviceMapping", [])
        try:
            volumes = validate_mapping(from_api(items), recovery, local, "dev-name")
            console.ok(
                "Volumes mapped automatically (this is the original source server; DRS's suggestion "
                "checked against the local disks)"
            )
            return volumes
        except MappingError as e:
            why = f"DRS's suggestion {_shown(items)} does not fit this machine: {e}"
            console.warn(f"The automatic volume mapping does not fit this machine: {e}")
    if no_prompt:
        raise missing_error("device_mapping", f"the volume mapping could not be made automatically ({why}); it")
    return prompt_mapping(console, recovery, local, value_format)


def prompt_mapping(
    console: Console, recovery: list[RecoveryDisk], local: list[LocalDisk], value_format: str
) -> list[MappedVolume]:
    """Ask per recovery volume; a whole mapping as ALL="…" (CSV or JSON) answers everything at once."""
    show_local_disks(console, local)
    console.info(
        f"For each recovery volume enter a local disk ({value_format} names, e.g. "
        f"{_example(local, value_format)}), EXCLUDE to leave it out, or "
        'ALL="<whole mapping as CSV or JSON>".'
    )
    while True:
        chosen: dict[str, str] = {}
        used: dict[str, str] = {}
        whole: list[MappedVolume] | None = None
        for r in recovery:
            while True:
                answer = console.ask(f"Local disk for {r.name} ({human_size(r.size_bytes)}): ").strip()
                if answer.upper().startswith("ALL="):
                    try:
                        whole = from_text(answer[4:], recovery, local, value_format)
                        break
                    except MappingError as e:
                        console.error(f"{e}. Please try again.")
                        continue
                try:
                    disk = resolve_local(answer, local, value_format, for_device=r.name) if answer else None
                    if not answer:
                        raise MappingError('please enter a local disk, EXCLUDE or ALL="…"')
                    if disk is not None:
                        if disk.name in used:
                            raise MappingError(f"{disk.path} is already chosen for {used[disk.name]}")
                        check_size(r, disk, answer)
                        used[disk.name] = r.name
                    chosen[r.name] = disk.path if disk else EXCLUDE
                    break
                except MappingError as e:
                    console.error(f"{e}. Please try again.")
            if whole is not None:
                return whole
        try:
            return validate_mapping(chosen, recovery, local, "dev-name")
        except MappingError as e:
            console.error(f"{e}. Let's start the mapping again.")


def _shown(items: list[dict]) -> str:
    pairs = [f"{i.get(API_KEYS[0], '?')}={i.get(API_KEYS[1], '?')}" for i in items]
    return f"({', '.join(pairs)})" if pairs else "(empty)"


def _example(local: list[LocalDisk], value_format: str) -> str:
    kind = "dev-name" if value_format == "all-strict" else value_format
    for d in local:
        if not d.boot_medium and d.names(kind):
            return d.names(kind)[0]
    return "/dev/sdb"
