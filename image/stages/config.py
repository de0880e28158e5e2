"""The image definition (`image/image.yaml`) loaded into typed, validated dataclasses.

Every validation error names the file and the key path (`boot.entries[2].label: ...`) so a
user who edits the YAML knows exactly what to fix. Unknown keys are errors too: a typo must
not silently fall back to a default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from image.core.errors import ImageError
from image.core.run import CommandError, run

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "image.yaml"


class ConfigError(ImageError, ValueError):
    """The image definition is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class DebianConfig:
    suite: str
    mirror: str
    security_mirror: str
    components: tuple[str, ...]
    architecture: str


@dataclass(frozen=True)
class BootEntry:
    id: str
    label: str
    cmdline: str = ""
    local_disk: bool = False


@dataclass(frozen=True)
class BootConfig:
    timeout: int
    default: str
    entries: tuple[BootEntry, ...]


@dataclass(frozen=True)
class IsoConfig:
    volume_label: str
    artifact: str


@dataclass(frozen=True)
class SquashfsConfig:
    compression: str
    level: int | None


@dataclass(frozen=True)
class InitramfsConfig:
    """How initramfs-tools builds the initrd (written into the rootfs before the kernel is installed).

    The initrd only has to find the live medium and mount its squashfs layers: every byte of it is
    read by the boot loader and unpacked by the kernel before anything else runs."""

    policy: str  # initramfs-tools MODULES=: most (Debian's default), dep, list, netboot
    modules: tuple[str, ...]  # kernel modules added (with their dependencies) whatever the policy
    drop: tuple[str, ...]  # globs relative to the initramfs root, removed after every hook ran
    compression: str  # initramfs-tools COMPRESS=
    level: int | None  # COMPRESSLEVEL= (None: initramfs-tools' default)
    # Leave a sleeping shell behind at init-bottom so the initrd's busybox, libc and ld.so pages are
    # not freed when the live root takes over (see initramfs-keep-code.j2 for why that matters).
    keep_code: bool = False


# Debian's own initramfs-tools settings: what an image definition without `initramfs` gets.
DEFAULT_INITRAMFS = InitramfsConfig(policy="most", modules=(), drop=(), compression="zstd", level=None)
INITRAMFS_POLICIES = ("most", "dep", "list", "netboot")
# Compressors of initramfs-tools the Debian kernel unpacks: level range, and the package whose
# program compresses (gzip is essential; the others must be in the package list).
INITRAMFS_COMPRESSORS: dict[str, tuple[tuple[int, int], str | None]] = {
    "zstd": ((1, 19), "zstd"),
    "lz4": ((1, 12), "lz4"),
    "xz": ((0, 9), "xz-utils"),
    "gzip": ((1, 9), None),
}


@dataclass(frozen=True)
class NetworkConfig:
    dhcp_timeout: int


@dataclass(frozen=True)
class ClientConfig:
    venv: str


@dataclass(frozen=True)
class ImageConfig:
    debian: DebianConfig
    packages: tuple[str, ...]
    exclude_paths: tuple[str, ...]
    include_paths: tuple[str, ...]
    kernel_cmdline: str
    boot: BootConfig
    iso: IsoConfig
    source_date_epoch: int | str
    squashfs: SquashfsConfig
    network: NetworkConfig
    client: ClientConfig
    hostname: str
    path: Path  # the file it was loaded from (for messages and relative look-ups)
    initramfs: InitramfsConfig = DEFAULT_INITRAMFS
    mask_units: tuple[str, ...] = ()  # systemd units masked in the base (never started)
    mask_generators: tuple[str, ...] = ()  # systemd generators masked in the base (never run)

    def template_vars(self) -> dict[str, Any]:
        """The whole definition as plain nested values, for the overlay's Jinja2 templates."""
        return {
            "debian": _plain(self.debian),
            "packages": list(self.packages),
            "exclude_paths": list(self.exclude_paths),
            "include_paths": list(self.include_paths),
            "kernel_cmdline": self.kernel_cmdline,
            "boot": _plain(self.boot),
            "iso": _plain(self.iso),
            "source_date_epoch": self.source_date_epoch,
            "squashfs": _plain(self.squashfs),
            "network": _plain(self.network),
            "client": _plain(self.client),
            "hostname": self.hostname,
            "initramfs": _plain(self.initramfs),
            "mask_units": list(self.mask_units),
            "mask_generators": list(self.mask_generators),
        }


def _plain(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {name: _plain(getattr(obj, name)) for name in obj.__dataclass_fields__}
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    return obj


# --- validation helpers -------------------------------------------------------------------

_PKG_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_HOSTNAME_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# ISO 9660 volume identifiers: "d-characters" (A-Z, 0-9, _), at most 32.
_VOLUME_RE = re.compile(r"^[A-Z0-9_]{1,32}$")
_SUITE_RE = re.compile(r"^[a-z][a-z0-9-]*$")
_ARTIFACT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.iso$")


class _Validator:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, message: str) -> ConfigError:
        where = f"{self.path}: {key}: " if key else f"{self.path}: "
        return ConfigError(where + message)

    def mapping(self, value: Any, key: str, required: set[str], optional: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key or "(top level)", f"must be a mapping, got {_kind(value)}")
        prefix = f"{key}." if key else ""
        unknown = sorted(str(k) for k in value if k not in required | optional)
        if unknown:
            allowed = ", ".join(sorted(required | optional))
            raise self.fail(prefix + unknown[0], f"unknown key (allowed here: {allowed})")
        missing = sorted(required - set(value))
        if missing:
            raise self.fail(prefix + missing[0], "is required but missing")
        return value

    def string(
        self, value: Any, key: str, *, pattern: re.Pattern[str] | None = None, hint: str = "", empty_ok: bool = False
    ) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, got {_kind(value)}")
        if not empty_ok and not value.strip():
            raise self.fail(key, "must be a non-empty string")
        if pattern is not None and value and not pattern.match(value):
            raise self.fail(key, f"invalid value {value!r}" + (f" ({hint})" if hint else ""))
        return value

    def integer(self, value: Any, key: str, *, minimum: int, maximum: int) -> int:
        # bool is an int subclass in Python; `timeout: true` is a mistake, not 1.
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(key, f"must be an integer, got {_kind(value)}")
        if not minimum <= value <= maximum:
            raise self.fail(key, f"must be between {minimum} and {maximum}, got {value}")
        return value

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {_kind(value)}")
        return value

    def string_list(
        self, value: Any, key: str, *, pattern: re.Pattern[str] | None = None, hint: str = "", non_empty: bool = True
    ) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list, got {_kind(value)}")
        if non_empty and not value:
            raise self.fail(key, "must not be empty")
        items = tuple(self.string(v, f"{key}[{i}]", pattern=pattern, hint=hint) for i, v in enumerate(value))
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item in seen:
                raise self.fail(f"{key}[{i}]", f"duplicate entry {item!r}")
            seen.add(item)
        return items


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _url(v: _Validator, value: Any, key: str, *, empty_ok: bool = False) -> str:
    url = v.string(value, key, empty_ok=empty_ok)
    if url and not re.match(r"^(https?|file)://[^\s]+$", url):
        raise v.fail(key, f"must be an http://, https:// or file:// URL, got {url!r}")
    return url.rstrip("/")


def _glob_path(v: _Validator, items: tuple[str, ...], key: str) -> tuple[str, ...]:
    for i, item in enumerate(items):
        if not item.startswith("/"):
            raise v.fail(f"{key}[{i}]", f"must be an absolute path glob starting with '/', got {item!r}")
    return items


def _parse(data: Any, v: _Validator) -> ImageConfig:
    top = v.mapping(
        data,
        "",
        {
            "debian",
            "packages",
            "kernel_cmdline",
            "boot",
            "iso",
            "source_date_epoch",
            "squashfs",
            "network",
            "client",
            "hostname",
        },
        {"exclude_paths", "include_paths", "initramfs", "mask_units", "mask_generators"},
    )

    d = v.mapping(top["debian"], "debian", {"suite", "mirror", "components", "architecture"}, {"security_mirror"})
    debian = DebianConfig(
        suite=v.string(d["suite"], "debian.suite", pattern=_SUITE_RE, hint="a Debian suite such as bookworm"),
        mirror=_url(v, d["mirror"], "debian.mirror"),
        security_mirror=_url(v, d.get("security_mirror", ""), "debian.security_mirror", empty_ok=True),
        components=v.string_list(
            d["components"],
            "debian.components",
            pattern=re.compile(r"^[a-z][a-z0-9-]*$"),
            hint="e.g. main, non-free-firmware",
        ),
        architecture=v.string(
            d["architecture"], "debian.architecture", pattern=re.compile(r"^amd64$"), hint="only amd64 is supported"
        ),
    )

    packages = v.string_list(top["packages"], "packages", pattern=_PKG_RE, hint="a Debian package name")
    for needed in ("python3", "python3-venv"):
        if needed not in packages:
            raise v.fail("packages", f"must include {needed!r} (the live system needs it)")
    if not any(p.startswith("linux-image-") for p in packages):
        raise v.fail("packages", "must include a kernel package (linux-image-...)")
    for i, p in enumerate(packages):
        if p.startswith(("shim", "grub")):
            raise v.fail(f"packages[{i}]", f"{p!r} does not belong in the rootfs (the ISO stage fetches boot loaders)")

    exclude = _glob_path(
        v, v.string_list(top.get("exclude_paths", []), "exclude_paths", non_empty=False), "exclude_paths"
    )
    include = _glob_path(
        v, v.string_list(top.get("include_paths", []), "include_paths", non_empty=False), "include_paths"
    )

    kernel_cmdline = v.string(top["kernel_cmdline"], "kernel_cmdline")
    # initramfs-tools runs /scripts/<boot=>: the LiveCD's own script (image/stages/templates/initramfs-boot.j2),
    # or live-boot's, which does the same job in ~3 s more under emulation.
    boot = [a.removeprefix("boot=") for a in kernel_cmdline.split() if a.startswith("boot=")]
    if boot not in (["failback"], ["live"]):
        raise v.fail(
            "kernel_cmdline",
            f"must contain one boot=failback (the LiveCD's initramfs script) or boot=live "
            f"(live-boot), got {' '.join('boot=' + b for b in boot) or 'none'}",
        )
    if boot == ["live"] and "live-boot" not in packages:
        raise v.fail("packages", "must include 'live-boot' for boot=live in kernel_cmdline")
    if boot == ["failback"] and "busybox" not in packages:
        raise v.fail(
            "packages",
            "must include 'busybox' for boot=failback in kernel_cmdline "
            "(its initramfs script uses busybox's mount -o loop)",
        )

    b = v.mapping(top["boot"], "boot", {"timeout", "default", "entries"}, set())
    raw_entries = b["entries"]
    if not isinstance(raw_entries, list) or not raw_entries:
        raise v.fail("boot.entries", f"must be a non-empty list, got {_kind(raw_entries)}")
    entries: list[BootEntry] = []
    for i, raw in enumerate(raw_entries):
        key = f"boot.entries[{i}]"
        e = v.mapping(raw, key, {"id", "label"}, {"cmdline", "local_disk"})
        entry = BootEntry(
            id=v.string(e["id"], f"{key}.id", pattern=_ID_RE, hint="letters, digits, '-', '_' or '.'"),
            label=v.string(e["label"], f"{key}.label"),
            cmdline=v.string(e.get("cmdline", ""), f"{key}.cmdline", empty_ok=True),
            local_disk=v.boolean(e.get("local_disk", False), f"{key}.local_disk"),
        )
        if any(c in entry.label for c in "\n\r\"'"):
            raise v.fail(f"{key}.label", "must not contain quotes or line breaks (it goes into boot menus)")
        if entry.local_disk and entry.cmdline:
            raise v.fail(f"{key}.cmdline", "must be empty when local_disk is true (no kernel is started)")
        if entry.id in {x.id for x in entries}:
            raise v.fail(f"{key}.id", f"duplicate entry id {entry.id!r}")
        entries.append(entry)
    default = v.string(b["default"], "boot.default")
    if default not in {e.id for e in entries}:
        ids = ", ".join(e.id for e in entries)
        raise v.fail("boot.default", f"{default!r} is not the id of an entry (ids: {ids})")
    if next(e for e in entries if e.id == default).local_disk:
        raise v.fail("boot.default", f"{default!r} boots the local disk; the default must start the live system")
    boot_config = BootConfig(
        timeout=v.integer(b["timeout"], "boot.timeout", minimum=0, maximum=600), default=default, entries=tuple(entries)
    )

    s = v.mapping(top["iso"], "iso", {"volume_label", "artifact"}, set())
    iso = IsoConfig(
        volume_label=v.string(
            s["volume_label"], "iso.volume_label", pattern=_VOLUME_RE, hint="ISO 9660: at most 32 of A-Z, 0-9 and _"
        ),
        artifact=v.string(s["artifact"], "iso.artifact", pattern=_ARTIFACT_RE, hint="a plain file name ending in .iso"),
    )

    sde = top["source_date_epoch"]
    if isinstance(sde, str):
        if sde != "git":
            raise v.fail("source_date_epoch", f'must be "git" or an integer (Unix time), got {sde!r}')
    else:
        sde = v.integer(sde, "source_date_epoch", minimum=0, maximum=2**32 - 1)

    q = v.mapping(top["squashfs"], "squashfs", {"compression"}, {"level"})
    compression = v.string(q["compression"], "squashfs.compression")
    if compression not in ("zstd", "xz"):
        raise v.fail("squashfs.compression", f"must be zstd or xz, got {compression!r}")
    level = q.get("level")
    if level is not None:
        if compression == "xz":
            raise v.fail("squashfs.level", "is only meaningful for zstd (xz has no level in mksquashfs)")
        level = v.integer(level, "squashfs.level", minimum=1, maximum=22)
    squashfs = SquashfsConfig(compression=compression, level=level)

    n = v.mapping(top["network"], "network", {"dhcp_timeout"}, set())
    network = NetworkConfig(dhcp_timeout=v.integer(n["dhcp_timeout"], "network.dhcp_timeout", minimum=1, maximum=3600))

    c = v.mapping(top["client"], "client", {"venv"}, set())
    venv = v.string(c["venv"], "client.venv")
    if not venv.startswith("/") or venv.rstrip("/") in ("", "/usr", "/etc", "/bin", "/lib", "/opt") or ".." in venv:
        raise v.fail(
            "client.venv", f"must be an absolute directory of its own such as /opt/failback-client, got {venv!r}"
        )
    client = ClientConfig(venv=venv.rstrip("/"))

    hostname = v.string(
        top["hostname"],
        "hostname",
        pattern=_HOSTNAME_RE,
        hint="letters, digits and '-', at most 63, not starting or ending with '-'",
    )

    initramfs = _initramfs(v, top["initramfs"], packages) if "initramfs" in top else DEFAULT_INITRAMFS
    mask_units = v.string_list(
        top.get("mask_units", []),
        "mask_units",
        pattern=_UNIT_RE,
        non_empty=False,
        hint="a systemd unit file name such as systemd-pstore.service",
    )
    mask_generators = v.string_list(
        top.get("mask_generators", []),
        "mask_generators",
        pattern=_GENERATOR_RE,
        non_empty=False,
        hint="a systemd generator such as systemd-gpt-auto-generator",
    )

    return ImageConfig(
        debian=debian,
        packages=packages,
        exclude_paths=exclude,
        include_paths=include,
        kernel_cmdline=kernel_cmdline,
        boot=boot_config,
        iso=iso,
        source_date_epoch=sde,
        squashfs=squashfs,
        network=network,
        client=client,
        hostname=hostname,
        path=v.path,
        initramfs=initramfs,
        mask_units=mask_units,
        mask_generators=mask_generators,
    )


_GENERATOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*-generator$")
_UNIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9@._:\\-]*\.(service|socket|mount|automount|swap|target|path|timer)$")
_MODULE_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_RELATIVE_GLOB_RE = re.compile(r"^(?!/)(?!.*(^|/)\.\.(/|$))[A-Za-z0-9_.*?/\[\]-]+$")


def _initramfs(v: _Validator, value: Any, packages: tuple[str, ...]) -> InitramfsConfig:
    i = v.mapping(value, "initramfs", set(), {"policy", "modules", "drop", "compression", "level", "keep_code"})
    d = DEFAULT_INITRAMFS
    policy = v.string(i.get("policy", d.policy), "initramfs.policy")
    if policy not in INITRAMFS_POLICIES:
        raise v.fail(
            "initramfs.policy",
            f"must be one of {', '.join(INITRAMFS_POLICIES)} (initramfs-tools MODULES=), got {policy!r}",
        )
    modules = v.string_list(
        i.get("modules", []),
        "initramfs.modules",
        pattern=_MODULE_RE,
        hint="a kernel module name such as sr_mod",
        non_empty=False,
    )
    if policy == "list" and not modules:
        raise v.fail("initramfs.modules", "must list the modules that find the live medium when policy is list")
    drop = v.string_list(
        i.get("drop", []),
        "initramfs.drop",
        pattern=_RELATIVE_GLOB_RE,
        hint="a glob relative to the initramfs root such as usr/lib/firmware, without '..'",
        non_empty=False,
    )
    compression = v.string(i.get("compression", d.compression), "initramfs.compression")
    if compression not in INITRAMFS_COMPRESSORS:
        raise v.fail("initramfs.compression", f"must be one of {', '.join(INITRAMFS_COMPRESSORS)}, got {compression!r}")
    (lo, hi), package = INITRAMFS_COMPRESSORS[compression]
    if package and package not in packages:
        raise v.fail("initramfs.compression", f"{compression} needs the package {package!r} in packages")
    level = i.get("level")
    if level is not None:
        level = v.integer(level, "initramfs.level", minimum=lo, maximum=hi)
    keep_code = v.boolean(i.get("keep_code", d.keep_code), "initramfs.keep_code")
    return InitramfsConfig(
        policy=policy, modules=modules, drop=drop, compression=compression, level=level, keep_code=keep_code
    )


def load_config(path: Path = DEFAULT_CONFIG) -> ImageConfig:
    """Load and validate the image definition at `path`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (pass the image definition with --config)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    return _parse(data, _Validator(path))


def apt_sources(cfg: ImageConfig) -> list[str]:
    """One-line apt sources: the suite and its updates, plus security when configured (the rootfs, the EFI
    package fetch and the test fixtures all use these)."""
    d = cfg.debian
    comps = " ".join(d.components)
    sources = [f"deb {d.mirror} {d.suite} {comps}", f"deb {d.mirror} {d.suite}-updates {comps}"]
    if d.security_mirror:
        sources.append(f"deb {d.security_mirror} {d.suite}-security {comps}")
    return sources


def git_epoch(repo: Path, *paths: str) -> int:
    """Committer date (Unix time) of the last commit touching `paths` (any commit if none)."""
    cmd = ["git", "-C", str(repo), "log", "-1", "--format=%ct"]
    if paths:
        cmd += ["--", *paths]
    try:
        out = run(cmd, capture=True).stdout.strip()
    except CommandError as exc:
        raise ConfigError(
            f"source_date_epoch: git: cannot read the commit date in {repo} "
            f"(set an integer source_date_epoch in the image definition instead): {exc}"
        ) from None
    if not out:
        if paths:  # the file was never committed: fall back to the last commit of the repository
            return git_epoch(repo)
        raise ConfigError(
            f"source_date_epoch: git: {repo} has no commits "
            f"(set an integer source_date_epoch in the image definition instead)"
        )
    return int(out)


def resolve_source_date_epoch(cfg: ImageConfig, repo: Path) -> int:
    """SOURCE_DATE_EPOCH for the overlay/ISO stages: the integer given, or the last commit's date."""
    if isinstance(cfg.source_date_epoch, int):
        return cfg.source_date_epoch
    return git_epoch(repo)


def resolve_base_epoch(cfg: ImageConfig, repo: Path) -> int:
    """SOURCE_DATE_EPOCH for the base rootfs: the date of the last commit that changed the image
    definition, so commits elsewhere (client code, templates) do not invalidate the cached base."""
    if isinstance(cfg.source_date_epoch, int):
        return cfg.source_date_epoch
    try:
        rel = cfg.path.resolve().relative_to(repo.resolve())
    except ValueError:
        return git_epoch(repo)
    return git_epoch(repo, str(rel))
