"""The replication software bundle: `failback_assets.tar.gz`, its `.sha512` and `manifest.json`.

The failback client downloads the bundle (not baked into the ISO, so it can be updated without a
new ISO), checks its sha512, unpacks it, writes the configuration and starts
`failback_assets/bin/failback-replicator --config FILE`. The bundle holds the `failback_replicator`
package and, unpacked next to it in `failback_assets/lib/`, the binary wheels pinned by hash in
`client/replicator/requirements.lock` (blake3, for the LiveCD's CPython 3.11 x86_64): the
launcher puts `lib/` first on the path, so the LiveCD's system python3 needs nothing installed.
zstandard is used when the system has it. A wheel that cannot be fetched fails the build (never a
bundle without it); at run time a blake3 that does not load only means SHA-256 digests.

Reproducible: members sorted, owner root:root, fixed modes, every mtime = SOURCE_DATE_EPOCH
(environment, else the date of the last commit touching client/replicator), gzip header without
name and with mtime 0; the wheels' contents are fixed by their pinned hashes. Building twice gives
the same sha512.

Bucket layout (as DRS publishes it): regional bucket `aws-elastic-disaster-recovery-{region}` holds
`latest/manifest.json` and `{installerVersion}/failback_assets/failback_assets.tar.gz`; the hashes
bucket `aws-elastic-disaster-recovery-hashes-{region}` holds
`{installerVersion}/failback_assets/failback_assets.tar.gz.sha512`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from failback_client.regions import hashes_bucket, release_bucket

from image.core.errors import ImageError
from image.core.paths import DEFAULT_BUILD, REPO
from image.core.run import CommandError
from image.stages.clientenv import download_wheels
from image.stages.config import ConfigError, git_epoch
from image.stages.hashes import write_hashes

log = logging.getLogger("image.release.assets")

PACKAGE_DIR = REPO / "client" / "replicator"
TOP = "failback_assets"
TARBALL = "failback_assets.tar.gz"
LOCK_NAME = "requirements.lock"
WHEEL_CACHE = DEFAULT_BUILD / "cache" / "replicator-wheels"
# The LiveCD runs the bundle with Debian 12's /usr/bin/python3: wheels for it, whatever the build host is.
WHEEL_TARGET = ("--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311")  # fmt: skip
_PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


class AssetsError(ImageError, RuntimeError):
    """The bundle cannot be built as pinned (a wheel missing, unfetchable or not matching its hash)."""


LAUNCHER = """#!/bin/sh
# Starts the failback replication software from wherever the bundle was unpacked.
here=$(cd "$(dirname "$0")/.." && pwd)
PYTHONPATH="$here/lib${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m failback_replicator "$@"
"""


@dataclass(frozen=True)
class Assets:
    tarball: Path
    sha512_file: Path
    manifest: Path
    version: str
    sha512: str

    def bucket_objects(self, region: str) -> list[tuple[str, str, Path]]:
        """(bucket, key, local file) for publishing to one region, as the real buckets lay them out."""
        regional, hashes = release_bucket(region), hashes_bucket(region)
        prefix = f"{self.version}/failback_assets"
        return [
            (regional, f"{prefix}/{TARBALL}", self.tarball),
            (hashes, f"{prefix}/{TARBALL}.sha512", self.sha512_file),
            (regional, "latest/manifest.json", self.manifest),
        ]


def package_version(package_dir: Path = PACKAGE_DIR) -> str:
    text = (package_dir / "failback_replicator" / "__init__.py").read_text()
    m = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if not m:
        raise ConfigError(f'{package_dir}/failback_replicator/__init__.py has no __version__ = "..." line')
    return m.group(1)


def source_date_epoch(package_dir: Path = PACKAGE_DIR) -> int:
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        if not env.isdigit():
            raise ConfigError(f"SOURCE_DATE_EPOCH={env!r} is not a Unix time (an integer number of seconds)")
        return int(env)
    try:
        rel = package_dir.resolve().relative_to(REPO)
        return git_epoch(REPO, str(rel))
    except (ValueError, ConfigError) as exc:
        raise ConfigError(f"assets: set SOURCE_DATE_EPOCH (no usable git commit date: {exc})") from None


def locked_pins(lock: Path) -> dict[str, set[str]]:
    """`name==version` -> the sha256 values the lock allows for its wheel."""
    try:
        text = lock.read_text()
    except FileNotFoundError:
        raise AssetsError(f"{lock} is missing: the bundle's pinned wheels are listed there") from None
    pins: dict[str, set[str]] = {}
    for line in text.replace("\\\n", " ").splitlines():  # one logical line per pin
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = _PIN.match(line)
        if not m:
            raise AssetsError(f"{lock}: {line!r} is not a `name==version --hash=sha256:...` pin")
        pins[f"{m.group(1).lower()}=={m.group(2)}"] = set(_HASH.findall(line))
    for pin, hashes in pins.items():
        if not hashes:
            raise AssetsError(f"{lock}: {pin} has no --hash=sha256:... (every bundled wheel is pinned by hash)")
    return pins


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_wheels(house: Path, pins: dict[str, set[str]], lock: Path) -> list[Path]:
    wheels = sorted(house.glob("*.whl"))
    allowed = set().union(*pins.values()) if pins else set()
    for w in wheels:
        if _sha256(w) not in allowed:
            raise AssetsError(f"{w} matches no hash in {lock}: delete {house} and build again")
    names = {w.name.split("-", 1)[0].lower().replace("_", "-") for w in wheels}
    wanted = {p.split("==", 1)[0].replace("_", "-") for p in pins}
    if names != wanted or len(wheels) != len(pins):
        raise AssetsError(f"{house} holds {[w.name for w in wheels]}, {lock} pins {sorted(pins)}: delete {house}")
    return wheels


def fetch_wheels(lock: Path | None = None, cache: Path | None = None) -> list[Path]:
    """The wheels `lock` pins, for the LiveCD's python, downloaded once (pip checks every hash) into
    `cache`/<lock hash>; their hashes are checked again on every build."""
    lock = lock or PACKAGE_DIR / LOCK_NAME
    pins = locked_pins(lock)
    if not pins:
        return []
    house = (cache or WHEEL_CACHE) / hashlib.sha256(lock.read_bytes()).hexdigest()[:16]
    if not (house / ".complete").exists():
        partial = house.with_name(house.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        log.info("assets: downloading %s into %s", ", ".join(sorted(pins)), house)
        try:
            download_wheels(lock, partial, WHEEL_TARGET)
        except CommandError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise AssetsError(
                f"cannot fetch the wheels the replication bundle needs ({', '.join(sorted(pins))}, pinned in {lock}) "
                f"for the LiveCD's CPython 3.11 x86_64. Check that pip reaches PyPI (proxy, pip.conf) and that "
                f"the pinned version and hash exist; the bundle is not built without them.\n{exc}"
            ) from None
        _check_wheels(partial, pins, lock)
        (partial / ".complete").touch()
        shutil.rmtree(house, ignore_errors=True)
        os.replace(partial, house)
    return _check_wheels(house, pins, lock)


def _wheel_members(wheel: Path) -> list[tuple[str, bytes, int]]:
    """A wheel's files as bundle members under lib/ (pure unpacking: what `pip install --target`
    would place, minus scripts; the contents are pinned by the wheel's hash, modes fixed here)."""
    files = []
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            path = PurePosixPath(info.filename)
            if info.is_dir():
                continue
            if path.is_absolute() or ".." in path.parts or path.parts[0].endswith(".data"):
                raise AssetsError(f"{wheel.name}: member {info.filename!r} cannot be unpacked into lib/ as is")
            files.append((f"{TOP}/lib/{path.as_posix()}", z.read(info), 0o644))
    return files


def _members(package_dir: Path, wheels: Sequence[Path] = ()) -> list[tuple[str, bytes, int]]:
    """(archive path, contents, mode) of every file in the bundle, sorted by path."""
    files: list[tuple[str, bytes, int]] = []
    pkg = package_dir / "failback_replicator"
    for path in sorted(pkg.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        files.append((f"{TOP}/lib/{path.relative_to(package_dir).as_posix()}", path.read_bytes(), 0o644))
    for wheel in wheels:
        files += _wheel_members(wheel)
    for name in ("PROTOCOL.md", "pyproject.toml", LOCK_NAME):
        if (package_dir / name).is_file():
            files.append((f"{TOP}/{name}", (package_dir / name).read_bytes(), 0o644))
    files.append((f"{TOP}/bin/failback-replicator", LAUNCHER.encode(), 0o755))
    files.append((f"{TOP}/VERSION", (package_version(package_dir) + "\n").encode(), 0o644))
    paths = [p for p, _, _ in files]
    if len(set(paths)) != len(paths):
        raise AssetsError(f"two bundle members share a path: {sorted({p for p in paths if paths.count(p) > 1})}")
    return sorted(files)


def _tar_bytes(members: list[tuple[str, bytes, int]], epoch: int) -> bytes:
    buf = io.BytesIO()
    dirs = sorted({"/".join(p.split("/")[:i]) for p, _, _ in members for i in range(1, p.count("/") + 1)})
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries = [(d, None, 0o755) for d in dirs] + list(members)
        for path, data, mode in sorted(entries, key=lambda e: e[0]):
            info = tarfile.TarInfo(path)
            info.mtime = epoch
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = mode
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_assets(
    out_dir: Path | None = None,
    package_dir: Path = PACKAGE_DIR,
    epoch: int | None = None,
    wheel_cache: Path | None = None,
) -> Assets:
    """Builds the bundle, its hash and the manifest into `out_dir` (default build/out/failback_assets).
    The pinned wheels are fetched into `wheel_cache` (default build/cache/replicator-wheels) once."""
    out_dir = Path(out_dir or DEFAULT_BUILD / "out" / "failback_assets")
    out_dir.mkdir(parents=True, exist_ok=True)
    epoch = source_date_epoch(package_dir) if epoch is None else epoch
    version = package_version(package_dir)
    wheels = fetch_wheels(package_dir / LOCK_NAME, wheel_cache)
    raw = _tar_bytes(_members(package_dir, wheels), epoch)
    packed = io.BytesIO()
    # filename="" and mtime=0: the gzip header must not carry the build's path or time.
    with gzip.GzipFile(filename="", mode="wb", fileobj=packed, compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    tarball = out_dir / TARBALL
    tmp = tarball.with_name(tarball.name + ".tmp")
    tmp.write_bytes(packed.getvalue())
    os.replace(tmp, tarball)
    single, _ = write_hashes(tarball)
    manifest = out_dir / "manifest.json"
    manifest.write_text(json.dumps({"installerVersion": version}, indent=2, sort_keys=True) + "\n")
    digest = single.read_text().split()[0]
    log.info("failback assets %s: %s (%d bytes), sha512 %s", version, tarball, tarball.stat().st_size, digest)
    return Assets(tarball=tarball, sha512_file=single, manifest=manifest, version=version, sha512=digest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build failback_assets.tar.gz, its .sha512 and manifest.json")
    p.add_argument("--out", type=Path, default=None, help="output directory (default build/out/failback_assets)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    assets = build_assets(args.out)
    print(f"{assets.tarball}\nsha512 {assets.sha512}\ninstallerVersion {assets.version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
