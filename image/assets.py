"""The replication software bundle: `failback_assets.tar.gz`, its `.sha512` and `manifest.json`.

The failback client downloads the bundle (not baked into the ISO, so it can be updated without a
new ISO), checks its sha512, unpacks it, writes the configuration and starts
`failback_assets/bin/failback-replicator --config FILE`. The bundle holds the stdlib-only
`failback_replicator` package (zstandard is used when the system has it).

Reproducible: members sorted, owner root:root, fixed modes, every mtime = SOURCE_DATE_EPOCH
(environment, else the date of the last commit touching client/replicator), gzip header without
name and with mtime 0. Building twice gives the same sha512.

Bucket layout (drs-facts.md): regional bucket `aws-elastic-disaster-recovery-{region}` holds
`latest/manifest.json` and `{installerVersion}/failback_assets/failback_assets.tar.gz`; the hashes
bucket `aws-elastic-disaster-recovery-hashes-{region}` holds
`{installerVersion}/failback_assets/failback_assets.tar.gz.sha512`.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from image.config import ConfigError, _git_epoch
from image.hashes import write_hashes
from image.paths import DEFAULT_BUILD, REPO

log = logging.getLogger("image.assets")

PACKAGE_DIR = REPO / "client" / "replicator"
TOP = "failback_assets"
TARBALL = "failback_assets.tar.gz"

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
        regional = f"aws-elastic-disaster-recovery-{region}"
        hashes = f"aws-elastic-disaster-recovery-hashes-{region}"
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
        raise ConfigError(f"{package_dir}/failback_replicator/__init__.py has no __version__ = \"...\" line")
    return m.group(1)


def source_date_epoch(package_dir: Path = PACKAGE_DIR) -> int:
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        if not env.isdigit():
            raise ConfigError(f"SOURCE_DATE_EPOCH={env!r} is not a Unix time (an integer number of seconds)")
        return int(env)
    try:
        rel = package_dir.resolve().relative_to(REPO)
        return _git_epoch(REPO, str(rel))
    except (ValueError, ConfigError) as exc:
        raise ConfigError(f"assets: set SOURCE_DATE_EPOCH (no usable git commit date: {exc})") from None


def _members(package_dir: Path) -> list[tuple[str, bytes, int]]:
    """(archive path, contents, mode) of every file in the bundle, sorted by path."""
    files: list[tuple[str, bytes, int]] = []
    pkg = package_dir / "failback_replicator"
    for path in sorted(pkg.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        files.append((f"{TOP}/lib/{path.relative_to(package_dir).as_posix()}", path.read_bytes(), 0o644))
    for name in ("PROTOCOL.md", "pyproject.toml"):
        if (package_dir / name).is_file():
            files.append((f"{TOP}/{name}", (package_dir / name).read_bytes(), 0o644))
    files.append((f"{TOP}/bin/failback-replicator", LAUNCHER.encode(), 0o755))
    files.append((f"{TOP}/VERSION", (package_version(package_dir) + "\n").encode(), 0o644))
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


def build_assets(out_dir: Path | None = None, package_dir: Path = PACKAGE_DIR, epoch: int | None = None) -> Assets:
    """Builds the bundle, its hash and the manifest into `out_dir` (default build/out/failback_assets)."""
    out_dir = Path(out_dir or DEFAULT_BUILD / "out" / "failback_assets")
    out_dir.mkdir(parents=True, exist_ok=True)
    epoch = source_date_epoch(package_dir) if epoch is None else epoch
    version = package_version(package_dir)
    raw = _tar_bytes(_members(package_dir), epoch)
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
