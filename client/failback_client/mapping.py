"""Volume mapping: parse `--device-mapping` text, check it against the recovery instance and the local disks.

Public API:
    parse_device_mapping(text) -> dict[str, str]     recovery device -> local device name or "EXCLUDE"
    validate_mapping(mapping, recovery_disks, local_disks, value_format) -> list[MappedVolume]
Every refusal is a MappingError (a ValueError) whose message names the offending token.

Accepted texts (user guide, "Program Arguments"):
  * CSV on one line: `rec1=local1,rec2:local2,rec3=EXCLUDE`. An entry's separator is its first `=`; an
    entry without `=` is split at its first `:`. So values may contain `:` (by-path names such as
    `pci-0000:00:10.0-scsi-0:0:0:0`) with either separator; a recovery device name containing `:` must
    use `=`. Spaces around names are ignored; one trailing comma is allowed.
  * a JSON object `{"rec1": "local1", ...}`;
  * the DRS API's JSON list `[{"recoveryInstanceDeviceName": ..., "failbackClientDeviceName": ...}, ...]`.
`EXCLUDE` (any case) leaves a recovery volume out. The whole text may be wrapped in one pair of quotes.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from failback_client.devices import LocalDisk, free_targets, human_size
from failback_client.disk_use import describe

EXCLUDE = "EXCLUDE"
GIB = 2**30
VALUE_FORMATS = ("dev-name", "by-path", "by-id", "by-uuid", "all-strict")
API_KEYS = ("recoveryInstanceDeviceName", "failbackClientDeviceName")


class MappingError(ValueError):
    """A device mapping was refused; `reason` says why and `token` is the offending part (if any)."""

    def __init__(self, reason: str, token: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.token = token


class MappingSyntaxError(MappingError):
    """The text is not one of the three accepted formats."""


class DuplicateDeviceError(MappingError):
    """A recovery device is listed twice, or a local disk receives two volumes."""


class UnknownDeviceError(MappingError):
    """A name is neither a recovery instance volume nor a local disk (in the chosen value format)."""


class AmbiguousDeviceError(MappingError):
    """With all-strict, a name means different disks in different forms."""


class MissingDeviceError(MappingError):
    """A recovery volume has neither a local disk nor EXCLUDE."""


class VolumeTooSmallError(MappingError):
    """The local disk is smaller than the recovery volume (beyond the fractional-GiB allowance)."""


class DiskInUseError(MappingError):
    """The local disk is in use (mounted, swap, a holder such as LVM/MD/dm-crypt): never a target."""


class BootMediumError(DiskInUseError):
    """The boot medium of the failback client (or its seed volume) is never a target."""


@dataclass(frozen=True)
class RecoveryDisk:
    name: str  # internalDeviceName, e.g. /dev/xvdb
    size_bytes: int


@dataclass(frozen=True)
class MappedVolume:
    recovery: RecoveryDisk
    local: LocalDisk | None  # None = EXCLUDE

    @property
    def target(self) -> str:
        return self.local.path if self.local else EXCLUDE


# ---- parsing --------------------------------------------------------------------------------------


def _clean(token: object, what: str, where: str) -> str:
    if not isinstance(token, str):
        raise MappingSyntaxError(f"{what} in {where} must be a string, not {json.dumps(token)}", str(token))
    value = token.strip()
    if not value:
        raise MappingSyntaxError(f"{what} in {where} is empty", token)
    bad = next((ch for ch in value if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")), None)
    if bad is not None:
        raise MappingSyntaxError(f"{what} {value!r} in {where} contains the control character {bad!r}", value)
    if value.upper() == EXCLUDE:
        return EXCLUDE
    return value


def _add(result: dict[str, str], key: object, value: object, where: str) -> None:
    rec = _clean(key, "the recovery device name", where)
    if rec == EXCLUDE:
        raise MappingSyntaxError(f"EXCLUDE in {where} must be the local device, not the recovery device", rec)
    local = _clean(value, f"the local device for {rec}", where)
    if rec in result:
        raise DuplicateDeviceError(f"recovery device {rec!r} is mapped twice (again in {where})", rec)
    result[rec] = local


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateDeviceError(f"{key!r} appears twice in one JSON object", key)
        seen[key] = value
    return seen


def _parse_json(text: str) -> dict[str, str]:
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise MappingSyntaxError(
            f"the device mapping is not valid JSON: {e.msg} at character {e.pos + 1}", text[e.pos : e.pos + 20]
        ) from None
    except RecursionError:
        raise MappingSyntaxError("the device mapping JSON is nested too deeply", text[:20]) from None
    result: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            _add(result, key, value, f"JSON key {key!r}")
    elif isinstance(data, list):
        for i, item in enumerate(data, 1):
            where = f"JSON list item {i}"
            if not isinstance(item, dict):
                raise MappingSyntaxError(f"{where} must be an object with {' and '.join(API_KEYS)}", str(item))
            unknown = sorted(set(item) - set(API_KEYS))
            if unknown:
                raise MappingSyntaxError(
                    f"{where} has unknown key {unknown[0]!r}; expected {' and '.join(API_KEYS)}", unknown[0]
                )
            missing = [k for k in API_KEYS if k not in item]
            if missing:
                raise MappingSyntaxError(f"{where} lacks {missing[0]!r}", missing[0])
            _add(result, item[API_KEYS[0]], item[API_KEYS[1]], where)
    else:
        raise MappingSyntaxError("a JSON device mapping must be an object or a list of objects", text[:20])
    if not result:
        raise MappingSyntaxError("the device mapping is empty", text)
    return result


def _parse_csv(text: str) -> dict[str, str]:
    entries = text.split(",")
    if len(entries) > 1 and not entries[-1].strip():
        entries.pop()  # one trailing comma is tolerated
    result: dict[str, str] = {}
    for i, raw in enumerate(entries, 1):
        entry = raw.strip()
        where = f"entry {i} ({entry!r})" if entry else f"entry {i}"
        if not entry:
            raise MappingSyntaxError(f"{where} is empty: entries are separated by single commas", raw)
        sep = "=" if "=" in entry else ":" if ":" in entry else None
        if sep is None:
            raise MappingSyntaxError(
                f"{where} has no '=' or ':' between the recovery device and the local device", entry
            )
        key, value = entry.split(sep, 1)
        _add(result, key, value, where)
    return result


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].strip()
    return text


def parse_device_mapping(text: str) -> dict[str, str]:
    """Parse one device mapping in any of the three formats into {recovery device: local device or EXCLUDE}."""
    if not isinstance(text, str):
        raise MappingSyntaxError("the device mapping must be text")
    body = _unquote(text)
    if not body:
        raise MappingSyntaxError("the device mapping is empty", text)
    if body[0] in "{[":
        return _parse_json(body)
    return _parse_csv(body)


# ---- checking -------------------------------------------------------------------------------------


def ceil_gib(size: int) -> int:
    return math.ceil(size / GIB) * GIB


def fits(recovery_bytes: int, local_bytes: int) -> bool:
    """A local disk can take a recovery volume if it is at least as large, or if it is smaller by less than
    1 GiB than the recovery size rounded up to whole GiB (the guide's case: a 9.75 GiB original volume
    came back as a 10 GiB recovery volume)."""
    return local_bytes >= recovery_bytes or ceil_gib(recovery_bytes) - local_bytes < GIB


def fit_problem(recovery: Sequence[RecoveryDisk], local: Sequence[LocalDisk]) -> str | None:
    """None when every recovery volume can go to its own local disk, else the first reason it cannot.

    Pairing largest with largest is optimal here because `fits` is monotone in both sizes."""
    targets = free_targets(list(local))
    if len(recovery) > len(targets):
        busy = [f"{d.path}: {describe(d.in_use)}" for d in local if d.in_use and not d.boot_medium]
        more = f" (in use: {'; '.join(busy)})" if busy else ""
        free = " free" if busy else ""
        return f"it has {len(recovery)} volumes but this machine has only {len(targets)}{free} disk(s){more}"
    rec_sorted = sorted(recovery, key=lambda r: r.size_bytes, reverse=True)
    loc_sorted = sorted(targets, key=lambda d: d.size_bytes, reverse=True)
    for r, d in zip(rec_sorted, loc_sorted, strict=False):
        if not fits(r.size_bytes, d.size_bytes):
            return (
                f"volume {r.name} ({human_size(r.size_bytes)}) is too large for disk {d.path} "
                f"({human_size(d.size_bytes)})"
            )
    return None


def _strip_kind_prefix(token: str, kind: str) -> str:
    prefix = f"/dev/disk/{kind}/"
    return token[len(prefix) :] if token.startswith(prefix) else token


def matches(token: str, disks: Iterable[LocalDisk], kind: str) -> list[LocalDisk]:
    """The disks called `token` in one value format."""
    if kind == "dev-name":
        path = token if token.startswith("/dev/") else f"/dev/{token}"
        return [d for d in disks if d.path == path]
    name = _strip_kind_prefix(token, kind)
    return [d for d in disks if name in d.names(kind)]


def resolve_local(token: str, local: Sequence[LocalDisk], value_format: str, *, for_device: str) -> LocalDisk | None:
    """The local disk `token` names in `value_format` (None for EXCLUDE); the boot medium is refused."""
    if value_format not in VALUE_FORMATS:
        raise MappingError(
            f"--dm-value-format must be one of {', '.join(VALUE_FORMATS)}, not {value_format!r}", value_format
        )
    if token.upper() == EXCLUDE:
        return None
    kinds = VALUE_FORMATS[:-1] if value_format == "all-strict" else (value_format,)
    found: dict[str, LocalDisk] = {}
    for kind in kinds:
        for disk in matches(token, local, kind):
            found[disk.name] = disk
    if len(found) > 1:
        raise AmbiguousDeviceError(
            f"local device {token!r} (for {for_device}) is ambiguous: it names {', '.join(sorted(found))}", token
        )
    if not found:
        other = [k for k in VALUE_FORMATS[:-1] if k not in kinds and matches(token, local, k)]
        hint = f"; it is a {other[0]} name: use --dm-value-format {other[0]} or all-strict" if other else ""
        known = ", ".join(d.names(kinds[0])[0] if d.names(kinds[0]) else d.path for d in local if not d.boot_medium)
        raise UnknownDeviceError(
            f"local device {token!r} (for {for_device}) is not a disk of this machine in --dm-value-format "
            f"{value_format}{hint}; local disks: {known or 'none'}",
            token,
        )
    disk = next(iter(found.values()))
    refuse_in_use(disk, token, for_device)
    return disk


def refuse_in_use(disk: LocalDisk, token: str, for_device: str) -> None:
    """Raise when `disk` must not be written now: the boot medium or seed volume, mounted, swap, a holder."""
    if disk.boot_medium:
        use = disk.in_use[0] if disk.in_use else None
        what = use.what.removeprefix("it is ") if use else "the failback client's boot medium"
        free = f" (or {use.free})" if use else ""
        raise BootMediumError(
            f"local device {token!r} (for {for_device}) is {disk.path}, {what}: never a target; "
            f"choose another disk{free}",
            token,
        )
    if disk.in_use:
        raise DiskInUseError(
            f"local device {token!r} (for {for_device}) is {disk.path}, which is in use: {describe(disk.in_use)}", token
        )


def resolve_recovery(key: str, recovery: Sequence[RecoveryDisk]) -> RecoveryDisk:
    for r in recovery:
        if key in (r.name, f"/dev/{r.name}") or (not key.startswith("/dev/") and r.name == f"/dev/{key}"):
            return r
    raise UnknownDeviceError(
        f"recovery device {key!r} is not a volume of the recovery instance; its volumes are "
        f"{', '.join(r.name for r in recovery)}",
        key,
    )


def check_size(r: RecoveryDisk, disk: LocalDisk, token: str) -> None:
    if not fits(r.size_bytes, disk.size_bytes):
        raise VolumeTooSmallError(
            f"local device {token!r} = {disk.path} ({human_size(disk.size_bytes)}) is smaller than recovery "
            f"volume {r.name} ({human_size(r.size_bytes)})",
            token,
        )


def validate_mapping(
    mapping: dict[str, str],
    recovery: Sequence[RecoveryDisk],
    local: Sequence[LocalDisk],
    value_format: str = "dev-name",
) -> list[MappedVolume]:
    """Check a parsed mapping; returns one MappedVolume per recovery volume, in the recovery instance's order."""
    chosen: dict[str, tuple[str, LocalDisk | None]] = {}
    for key, token in mapping.items():
        r = resolve_recovery(key, recovery)
        if r.name in chosen:
            raise DuplicateDeviceError(f"recovery device {r.name} is mapped twice ({key!r})", key)
        chosen[r.name] = (token, resolve_local(token, local, value_format, for_device=r.name))
    missing = [r.name for r in recovery if r.name not in chosen]
    if missing:
        raise MissingDeviceError(
            f"recovery device {missing[0]} has no local device: add {missing[0]}=<local device> "
            f"or {missing[0]}=EXCLUDE",
            missing[0],
        )
    used: dict[str, str] = {}
    result: list[MappedVolume] = []
    for r in recovery:
        token, disk = chosen[r.name]
        if disk is not None:
            if disk.name in used:
                raise DuplicateDeviceError(
                    f"local device {disk.path} is chosen for both {used[disk.name]} and {r.name}", token
                )
            used[disk.name] = r.name
            check_size(r, disk, token)
        result.append(MappedVolume(r, disk))
    if all(v.local is None for v in result):
        raise MappingError("every recovery volume is EXCLUDE: nothing would be replicated", EXCLUDE)
    return result


def to_api(volumes: Iterable[MappedVolume]) -> list[dict[str, str]]:
    return [{API_KEYS[0]: v.recovery.name, API_KEYS[1]: v.target} for v in volumes]


def from_api(items: Iterable[dict[str, str]]) -> dict[str, str]:
    return {item[API_KEYS[0]]: item[API_KEYS[1]] for item in items}
