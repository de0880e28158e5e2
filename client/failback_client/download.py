"""Guide step 13: download the replication software from the regional S3 buckets, check it, unpack it.

Layout (as DRS publishes it): `aws-elastic-disaster-recovery-{region}` holds `latest/manifest.json`
(`installerVersion`) and `{version}/failback_assets/failback_assets.tar.gz`; the hashes bucket
`aws-elastic-disaster-recovery-hashes-{region}` holds `{version}/failback_assets/failback_assets.tar.gz.sha512`
(bare hex; the first token counts). The buckets are public: requests go unsigned, through the regional
endpoint or FAILBACK_S3_ENDPOINT, and through the HTTPS proxy botocore takes from https_proxy/HTTPS_PROXY
(and no_proxy). The tarball is hashed while it streams to disk; a mismatch deletes it and nothing is
unpacked. Unpacking accepts only plain files and directories below `failback_assets/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import botocore.exceptions
from botocore import UNSIGNED
from botocore.config import Config

from failback_client.errors import EXIT_REPLICATION, ClientError
from failback_client.regions import hashes_bucket, release_bucket

log = logging.getLogger(__name__)

TOP = "failback_assets"
TARBALL = "failback_assets.tar.gz"
LAUNCHER = f"{TOP}/bin/failback-replicator"
CHUNK = 1 << 20
MAX_MANIFEST = 64 * 1024
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_HEX512 = re.compile(r"^[0-9a-f]{128}$")


class DownloadError(ClientError):
    exit_status = EXIT_REPLICATION


@dataclass(frozen=True)
class AssetLocation:
    region: str
    version: str

    @property
    def bucket(self) -> str:
        return release_bucket(self.region)

    @property
    def hashes_bucket(self) -> str:
        return hashes_bucket(self.region)

    @property
    def key(self) -> str:
        return f"{self.version}/failback_assets/{TARBALL}"

    @property
    def hash_key(self) -> str:
        return f"{self.key}.sha512"


@dataclass(frozen=True)
class Software:
    """The unpacked replication software."""

    root: Path  # .../failback_assets
    version: str
    sha512: str

    @property
    def launcher(self) -> Path:
        return self.root / "bin" / "failback-replicator"


def s3_endpoint_url(region: str, custom: str | None) -> str:
    return custom.rstrip("/") if custom else f"https://s3.{region}.amazonaws.com"


def make_s3_client(region: str, endpoint_url: str) -> Any:
    """Anonymous S3 client (the buckets are public). A custom endpoint gets path-style addressing, which every
    S3-compatible endpoint and VPC endpoint accepts; proxies come from the environment (botocore's default)."""
    import boto3

    config = Config(
        signature_version=UNSIGNED,
        region_name=region,
        connect_timeout=15,
        read_timeout=60,
        retries={"mode": "standard", "total_max_attempts": 5},
        s3={"addressing_style": "virtual" if endpoint_url.endswith(".amazonaws.com") else "path"},
    )
    return boto3.session.Session().client("s3", region_name=region, endpoint_url=endpoint_url, config=config)


def _describe(e: Exception, what: str, endpoint: str) -> DownloadError:
    if isinstance(e, botocore.exceptions.ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "404", "NotFound"):
            why = "it does not exist"
        elif code == "NoSuchBucket":
            why = "the bucket does not exist in this region"
        elif code in ("AccessDenied", "403"):
            why = "access denied (a proxy or VPC endpoint policy blocking S3?)"
        else:
            why = f"{code or status}"
        return DownloadError(f"Cannot download {what} from {endpoint}: {why}")
    if isinstance(e, botocore.exceptions.ProxyConnectionError):
        return DownloadError(f"The HTTPS proxy refused the connection while downloading {what} from {endpoint}")
    if isinstance(e, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)):
        return DownloadError(
            f"Cannot reach the S3 endpoint {endpoint} to download {what}: allow outbound HTTPS to "
            "S3 from this server, or set an HTTPS proxy"
        )
    if isinstance(e, botocore.exceptions.BotoCoreError):
        return DownloadError(f"Downloading {what} from {endpoint} failed: {e}")
    raise e


class Downloader:
    def __init__(self, region: str, s3_endpoint: str | None, client: Any | None = None) -> None:
        self.region = region
        self.endpoint = s3_endpoint_url(region, s3_endpoint)
        self.s3 = client or make_s3_client(region, self.endpoint)

    def _get(self, bucket: str, key: str) -> Any:
        what = f"s3://{bucket}/{key}"
        try:
            return self.s3.get_object(Bucket=bucket, Key=key)["Body"]
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            log.info("GET %s failed: %s", what, e)
            raise _describe(e, what, self.endpoint) from None

    def _small(self, bucket: str, key: str) -> str:
        body = self._get(bucket, key)
        try:
            data = body.read(MAX_MANIFEST + 1)
        except (botocore.exceptions.BotoCoreError, OSError) as e:
            raise DownloadError(f"Reading s3://{bucket}/{key} from {self.endpoint} failed: {e}") from None
        if len(data) > MAX_MANIFEST:
            raise DownloadError(f"s3://{bucket}/{key} is larger than {MAX_MANIFEST} bytes: not what was expected")
        return data.decode("utf-8", "replace")

    def latest_version(self) -> str:
        bucket = release_bucket(self.region)
        text = self._small(bucket, "latest/manifest.json")
        try:
            version = json.loads(text)["installerVersion"]
        except (ValueError, KeyError, TypeError):
            raise DownloadError(f"s3://{bucket}/latest/manifest.json is not JSON with an installerVersion") from None
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            raise DownloadError(f"s3://{bucket}/latest/manifest.json names an invalid installerVersion {version!r}")
        return version

    def expected_sha512(self, where: AssetLocation) -> str:
        text = self._small(where.hashes_bucket, where.hash_key).split()
        digest = text[0].lower() if text else ""
        if not _HEX512.match(digest):
            raise DownloadError(f"s3://{where.hashes_bucket}/{where.hash_key} does not hold a sha512 hex digest")
        return digest

    def fetch(self, where: AssetLocation, dest: Path) -> str:
        """Stream the tarball to `dest`, hashing as it goes; returns the sha512 hex of what arrived."""
        body = self._get(where.bucket, where.key)
        h = hashlib.sha512()
        size = 0
        try:
            with open(dest, "wb") as f:
                for chunk in body.iter_chunks(CHUNK):
                    h.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
        except (botocore.exceptions.BotoCoreError, OSError) as e:
            dest.unlink(missing_ok=True)
            raise DownloadError(
                f"Downloading s3://{where.bucket}/{where.key} from {self.endpoint} failed after {size} bytes: {e}"
            ) from None
        log.info("downloaded s3://%s/%s: %d bytes", where.bucket, where.key, size)
        return h.hexdigest()


def _safe_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Every member, checked: plain files and directories under failback_assets/, no escapes, sane modes."""
    members = []
    for m in tar.getmembers():
        path = PurePosixPath(m.name)
        if path.is_absolute() or ".." in path.parts or not path.parts or path.parts[0] != TOP:
            raise DownloadError(f"the replication software archive holds {m.name!r}, outside {TOP}/: refused")
        if not (m.isfile() or m.isdir()):
            raise DownloadError(
                f"the replication software archive holds {m.name!r}, which is not a plain file "
                "or directory (links and devices are refused)"
            )
        members.append(m)
    return members


def unpack(tarball: Path, into: Path) -> Path:
    """Unpack into a staging directory beside `into`/failback_assets, then swap it in. Returns the new root."""
    into.mkdir(parents=True, exist_ok=True)
    staging = into / ".unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o755)
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for m in _safe_members(tar):
                target = staging.joinpath(*PurePosixPath(m.name).parts)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with open(fd, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
                os.chmod(target, 0o755 if m.mode & stat.S_IXUSR else 0o644)
    except (tarfile.TarError, OSError, EOFError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise DownloadError(f"Unpacking {tarball.name} failed: {e}") from None
    except DownloadError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    launcher = staging / LAUNCHER
    if not launcher.is_file():
        shutil.rmtree(staging, ignore_errors=True)
        raise DownloadError(f"the replication software archive has no {LAUNCHER}")
    final = into / TOP
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging / TOP, final)
    shutil.rmtree(staging, ignore_errors=True)
    return final


def download_software(region: str, s3_endpoint: str | None, work_dir: Path, client: Any | None = None) -> Software:
    """Step 13 in full: manifest -> expected digest -> streamed, hashed tarball -> checked -> unpacked."""
    dl = Downloader(region, s3_endpoint, client)
    version = dl.latest_version()
    where = AssetLocation(region, version)
    expected = dl.expected_sha512(where)
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tarball = work_dir / TARBALL
    got = dl.fetch(where, tarball)
    if got != expected:
        tarball.unlink(missing_ok=True)
        raise DownloadError(
            f"s3://{where.bucket}/{where.key} is corrupt or was tampered with: its sha512 is {got}, but "
            f"s3://{where.hashes_bucket}/{where.hash_key} says {expected}; nothing was unpacked (try again; if it "
            "persists, a proxy may be altering downloads)"
        )
    root = unpack(tarball, work_dir)
    tarball.unlink(missing_ok=True)
    return Software(root=root, version=version, sha512=got)
