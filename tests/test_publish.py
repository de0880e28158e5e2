"""Release publishing against moto's S3 server over HTTP, driven by real boto3/s3transfer.

Artifacts are a few MiB with a 5 MiB part size so the ISO goes multipart (3 parts).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

from image.release.publish.cli import PublishOptions, default_transfer_jobs, publish_command, publish_release
from image.release.publish.plan import VERSION_KEY, bytes_digests, s3_digests_of_file
from image.release.publish.regions import ALL_REGIONS, RegionError, parse_regions
from image.release.publish.s3 import public_read_policy

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
PREFIX = "aws-elastic-disaster-recovery"
ISO = "aws-failback-livecd-64bit.iso"
REGIONS = ["us-east-1", "eu-west-1", "ap-southeast-2"]
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-not-printed"}
WRITE_OPS = {
    "PutObject",
    "UploadPart",
    "CreateMultipartUpload",
    "CompleteMultipartUpload",
    "CopyObject",
    "UploadPartCopy",
    "DeleteObject",
}


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_url: str) -> Iterator[Any]:
    requests.post(f"{moto_url}/moto-api/reset", timeout=10).raise_for_status()
    yield admin_client(moto_url)


def admin_client(url: str, region: str = "us-east-1") -> Any:
    return boto3.Session(
        aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"]
    ).client("s3", region_name=region, endpoint_url=url, config=Config(s3={"addressing_style": "path"}))


def anonymous_client(url: str) -> Any:
    return boto3.client(
        "s3",
        region_name="us-east-1",
        endpoint_url=url,
        config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"}),
    )


def make_buckets(s3: Any, regions: list[str], skip: set[str] = frozenset(), located: dict[str, str] | None = None):
    """Both buckets per region, public-read by bucket policy (as the real ones are)."""
    for region in regions:
        for bucket in (f"{PREFIX}-{region}", f"{PREFIX}-hashes-{region}"):
            if bucket in skip:
                continue
            loc = (located or {}).get(bucket, region)
            kwargs = {} if loc == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": loc}}
            s3.create_bucket(Bucket=bucket, **kwargs)
            s3.put_bucket_policy(
                Bucket=bucket,
                Policy=public_read_policy(bucket),
            )


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("art")
    iso, assets = d / ISO, d / "failback_assets.tar.gz"
    iso.write_bytes(os.urandom(11 * MiB + 123))  # 3 parts of 5 MiB
    assets.write_bytes(os.urandom(2 * MiB + 7))
    return {"iso": iso, "assets": assets, "dir": d}


def session_with_counter() -> tuple[boto3.Session, Counter[str]]:
    """A session whose clients count every S3 operation they send (PUTs, copies, parts...)."""
    session = boto3.Session(
        aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"]
    )
    calls: Counter[str] = Counter()
    lock = threading.Lock()

    def count(event_name: str, **_: Any) -> None:
        with lock:
            calls[event_name.rsplit(".", 1)[1]] += 1

    session.events.register("before-call.s3", count)
    return session, calls


def options(url: str, art: dict[str, Path], tmp: Path, **kw: Any) -> PublishOptions:
    base: dict[str, Any] = dict(
        regions=REGIONS,
        version="1.0.0",
        iso=art["iso"],
        assets=art["assets"],
        endpoint_url=url,
        multipart_threshold=5 * MiB,
        multipart_chunksize=5 * MiB,
        max_concurrency=2,
        release_dir=tmp / "release",
        progress="plain",
    )
    base.update(kw)
    if "session" not in base:
        base["session"] = session_with_counter()[0]
    return PublishOptions(**base)


# -- invariants ------------------------------------------------------------------------------
_DIGESTS: dict[tuple[str, str, str], str] = {}  # (bucket, key, ETag) -> sha512 of the downloaded bytes


def sha512_of(client: Any, bucket: str, key: str) -> str | None:
    """Digest of the object's bytes as downloaded (each version downloaded once, by ETag)."""
    try:
        resp = client.get_object(Bucket=bucket, Key=key, Range="bytes=0-0")
    except client.exceptions.NoSuchKey:
        return None
    tag = (bucket, key, resp["ETag"])
    if tag not in _DIGESTS:
        try:
            full = client.get_object(Bucket=bucket, Key=key, IfMatch=resp["ETag"])
        except client.exceptions.NoSuchKey:
            return None
        except ClientError as exc:  # replaced between the two reads: look again
            if exc.response["Error"]["Code"] in {"PreconditionFailed", "412"}:
                return sha512_of(client, bucket, key)
            raise
        _DIGESTS[tag] = hashlib.sha512(full["Body"].read()).hexdigest()
    return _DIGESTS[tag]


def keys(client: Any, bucket: str) -> list[str]:
    try:
        return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    except client.exceptions.NoSuchBucket:
        return []


def check_invariants(client: Any, regions: list[str]) -> list[str]:
    """What a reader could see that is wrong: a hash without its object, a hash that does not
    match, a `latest/` object that is not a published version, a manifest pointing nowhere.

    Reads go from the last-written kind of object to the first (latest/ and manifest, then
    hashes, then versioned objects), so a publish running meanwhile cannot fake a violation:
    whatever a later object relies on was written before it, hence before we look for it.
    """
    bad: list[str] = []
    for region in regions:
        rel, hb = f"{PREFIX}-{region}", f"{PREFIX}-hashes-{region}"
        rel_keys = keys(client, rel)
        manifest = None
        if "latest/manifest.json" in rel_keys:
            manifest = json.loads(client.get_object(Bucket=rel, Key="latest/manifest.json")["Body"].read())
        latest = {
            k: sha512_of(client, rel, k)
            for k in rel_keys
            if k.startswith("latest/") and k not in ("latest/manifest.json", VERSION_KEY)
        }
        published: dict[str, str] = {}  # object key -> digest its .sha512 publishes
        for k in keys(client, hb):
            if k.endswith(".sha512"):
                published[k.removesuffix(".sha512")] = client.get_object(Bucket=hb, Key=k)["Body"].read().decode()
        for k, text in published.items():
            actual = sha512_of(client, rel, k)
            if actual is None:
                bad.append(f"{region}: hash of {k} published but the object is missing")
            elif not k.startswith("latest/") and actual != text:
                bad.append(f"{region}: hash of {k} does not match the object")
        versioned = {v for k, v in published.items() if not k.startswith("latest/")}
        for k, digest in latest.items():
            if digest is not None and digest not in versioned:
                bad.append(f"{region}: {k} is not a verified, hashed version")
            # during an update the latest hash may still be the previous version's; never a stranger's
            if k in published and published[k] not in versioned:
                bad.append(f"{region}: {k}.sha512 names no published version")
        if VERSION_KEY in rel_keys:  # the newer-ISO notice must name an ISO that is there and hashed
            doc = json.loads(client.get_object(Bucket=rel, Key=VERSION_KEY)["Body"].read())
            vkey = doc["iso"]["versionKey"]
            if published.get(vkey) is None or sha512_of(client, rel, vkey) != published[vkey]:
                bad.append(f"{region}: {VERSION_KEY} points at {vkey}, which is missing or unhashed")
        if manifest is not None:
            akey = f"{manifest['installerVersion']}/failback_assets/failback_assets.tar.gz"
            if published.get(akey) is None or sha512_of(client, rel, akey) != published[akey]:
                bad.append(f"{region}: manifest points at {akey}, which is missing or unhashed")
    return bad


@dataclass
class Watcher:
    """Polls the invariants from another thread while a publish runs."""

    url: str
    regions: list[str]
    violations: list[str] = field(default_factory=list)
    polls: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Watcher:
        client = admin_client(self.url)

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.violations += check_invariants(client, self.regions)
                except Exception as exc:  # a dead watcher must fail the test, not pass it silently
                    self.violations.append(f"watcher error: {exc!r}")
                    return
                self.polls += 1

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=60)


def assert_fully_published(url: str, regions: list[str], art: dict[str, Path], version: str = "1.0.0") -> None:
    """Every object downloaded WITHOUT credentials matches the hashes bucket and the local file."""
    anon = anonymous_client(url)
    local = {f"failback_livecd/{ISO}": art["iso"], "failback_assets/failback_assets.tar.gz": art["assets"]}
    for region in regions:
        rel, hb = f"{PREFIX}-{region}", f"{PREFIX}-hashes-{region}"
        for prefix in (version, "latest"):
            for rel_key, path in local.items():
                key = f"{prefix}/{rel_key}"
                body = anon.get_object(Bucket=rel, Key=key)["Body"].read()
                published = anon.get_object(Bucket=hb, Key=key + ".sha512")["Body"].read().decode()
                assert published == hashlib.sha512(body).hexdigest() == hashlib.sha512(path.read_bytes()).hexdigest()
                assert len(published) == 128 and published == published.lower()
            sums = anon.get_object(Bucket=hb, Key=f"{prefix}/SHA512SUMS")["Body"].read().decode()
            assert f"{hashlib.sha512(art['iso'].read_bytes()).hexdigest()}  {ISO}\n" in sums
        man = json.loads(anon.get_object(Bucket=rel, Key="latest/manifest.json")["Body"].read())
        assert man["installerVersion"] == version
        assert man["failbackAssets"]["key"] == f"{version}/failback_assets/failback_assets.tar.gz"
        # what the failback client reads for its newer-ISO notice, anonymously
        doc = json.loads(anon.get_object(Bucket=rel, Key=VERSION_KEY)["Body"].read())
        assert doc["version"] == version and doc["iso"]["key"] == f"latest/failback_livecd/{ISO}"
        assert doc["iso"]["sha512"] == hashlib.sha512(art["iso"].read_bytes()).hexdigest()
    assert check_invariants(admin_client(url), regions) == []


# -- unit tests ------------------------------------------------------------------------------
def test_regions_all_and_typos() -> None:
    assert len(parse_regions("all")) == 30 and parse_regions("all") == list(ALL_REGIONS)
    assert "us-gov-west-1" in parse_regions("all") and len(parse_regions("commercial")) == 28
    assert parse_regions("eu-west-1, us-east-1,eu-west-1") == ["eu-west-1", "us-east-1"]
    with pytest.raises(RegionError, match=r"'eu-wset-1' is not a DRS region \(did you mean 'eu-west-1'\?\)"):
        parse_regions("us-east-1,eu-wset-1")
    with pytest.raises(RegionError, match="no region"):
        parse_regions(" , ")


def test_s3_digests_composite(tmp_path: Path) -> None:
    data = os.urandom(11 * MiB)
    p = tmp_path / "f"
    p.write_bytes(data)
    d = s3_digests_of_file(p, 5 * MiB)
    parts = b"".join(hashlib.sha256(data[i : i + 5 * MiB]).digest() for i in range(0, len(data), 5 * MiB))
    import base64

    assert d.composite == base64.b64encode(hashlib.sha256(parts).digest()).decode()
    assert d.full == base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert d.accepts(d.composite + "-3") and d.accepts(d.full) and not d.accepts(None)
    assert not d.accepts(bytes_digests(b"other")[1].full)


def test_dry_run_prints_every_object(artifacts: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    out = io.StringIO()
    code = publish_command(
        "us-east-1,us-gov-west-1",
        "2.0",
        iso=str(artifacts["iso"]),
        assets=str(artifacts["assets"]),
        dry_run=True,
        out=out,
        release_dir=str(tmp_path),
    )
    assert code == 0
    text = out.getvalue()
    iso_digest = hashlib.sha512(artifacts["iso"].read_bytes()).hexdigest()
    for region in ("us-east-1", "us-gov-west-1"):
        for key in (
            f"2.0/failback_livecd/{ISO}",
            f"latest/failback_livecd/{ISO}",
            "latest/manifest.json",
            "2.0/failback_assets/failback_assets.tar.gz",
            VERSION_KEY,
        ):
            assert f"s3://{PREFIX}-{region}/{key}" in text
        assert f"s3://{PREFIX}-hashes-{region}/latest/failback_livecd/{ISO}.sha512  128 bytes" in text
    assert f"{artifacts['iso'].stat().st_size} bytes  sha512 {iso_digest}" in text
    # GovCloud is its own partition: it uploads too, it cannot copy from us-east-1.
    assert "copy from us-east-1" not in text
    # manifest last in each region
    assert text.index(f"{PREFIX}-us-east-1/latest/manifest.json") > text.index(
        f"{PREFIX}-hashes-us-east-1/latest/failback_livecd/{ISO}.sha512"
    )


def test_bad_input_is_named(artifacts: dict[str, Path], capsys: Any, tmp_path: Path) -> None:
    assert publish_command("us-east-1", "latest", iso=str(artifacts["iso"]), dry_run=True) == 2
    assert "bad --version 'latest'" in capsys.readouterr().err
    assert publish_command("us-east-1", "1.0", iso="/nonexistent/x.iso", dry_run=True) == 2
    assert "/nonexistent/x.iso does not exist" in capsys.readouterr().err
    assert (
        publish_command(
            "us-east-1",
            "1.0",
            iso=str(artifacts["iso"]),
            bucket_prefix="Bad_Prefix",
            dry_run=True,
            release_dir=str(tmp_path),
        )
        == 2
    )
    assert "bad --bucket-prefix 'Bad_Prefix'" in capsys.readouterr().err


def test_stale_sidecar_refused(tmp_path: Path) -> None:
    iso = tmp_path / ISO
    iso.write_bytes(b"new iso")
    (tmp_path / (ISO + ".sha512")).write_text("0" * 128 + "\n")
    assert publish_command("us-east-1", "1.0", iso=str(iso), dry_run=True) == 2


# -- against moto over HTTP ------------------------------------------------------------------
def test_publish_three_regions_then_anonymous_download(
    s3: Any, moto_url: str, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    make_buckets(s3, REGIONS)
    session, calls = session_with_counter()
    sent_owner: list[str] = []
    copies: list[dict[str, Any]] = []
    session.events.register(
        "before-parameter-build.s3", lambda params, **_: sent_owner.append(params.get("ExpectedBucketOwner", ""))
    )
    session.events.register("before-parameter-build.s3.CopyObject", lambda params, **_: copies.append(params))
    out = io.StringIO()
    opts = options(moto_url, artifacts, tmp_path, session=session, expected_owner="123456789012")
    with Watcher(moto_url, REGIONS) as watcher:
        report = publish_release(opts, out)
    assert report.ok, out.getvalue()
    assert watcher.polls > 0 and watcher.violations == []
    assert_fully_published(moto_url, REGIONS, artifacts)
    # multipart in the seed region, server-side copies elsewhere (bytes uploaded once)
    iso_key = f"1.0.0/failback_livecd/{ISO}"
    assert s3.head_object(Bucket=f"{PREFIX}-us-east-1", Key=iso_key)["ETag"].endswith('-3"')
    assert calls["UploadPart"] == 3 and calls["CreateMultipartUpload"] >= 1
    assert calls["CopyObject"] + calls["UploadPartCopy"] > 0
    assert sent_owner and all(o == "123456789012" for o in sent_owner)
    # a copy is only of the verified source (its ETag), in the owner's bucket, and S3 re-checksums it
    assert copies and all(
        c["ExpectedSourceBucketOwner"] == "123456789012"
        and c["CopySourceIfMatch"]
        and c["ChecksumAlgorithm"] == "SHA256"
        for c in copies
    )
    assert all(r.verified and r.objects == r.planned for r in report.results)
    text = out.getvalue()
    for region in REGIONS:
        assert f"[{region}] done" in text
    assert "region" in text and "verified" in text  # the final table
    assert "testing-secret-not-printed" not in text


def test_rerun_with_nothing_changed_uploads_nothing(
    s3: Any, moto_url: str, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    make_buckets(s3, REGIONS)
    assert publish_release(options(moto_url, artifacts, tmp_path), io.StringIO()).ok
    before = {
        (r, k): s3.head_object(Bucket=f"{PREFIX}-{r}", Key=k)["LastModified"]
        for r in REGIONS
        for k in keys(s3, f"{PREFIX}-{r}")
    }
    session, calls = session_with_counter()
    report = publish_release(options(moto_url, artifacts, tmp_path, session=session), io.StringIO())
    assert report.ok
    assert not (set(calls) & WRITE_OPS), calls
    assert calls["HeadObject"] > 0
    assert all(r.written == 0 and r.bytes == 0 for r in report.results)
    after = {
        (r, k): s3.head_object(Bucket=f"{PREFIX}-{r}", Key=k)["LastModified"]
        for r in REGIONS
        for k in keys(s3, f"{PREFIX}-{r}")
    }
    assert after == before


class Crash(Exception):
    pass


@pytest.mark.parametrize(
    "phase, key_end",
    [
        ("artifact", ISO),
        ("artifact", "tar.gz"),
        ("hash", ".iso.sha512"),
        ("latest", ISO),
        ("latest-hash", "SHA512SUMS"),
    ],
)
def test_crash_between_steps_then_rerun_repairs(
    s3: Any, moto_url: str, artifacts: dict[str, Path], tmp_path: Path, phase: str, key_end: str
) -> None:
    """An injected failure right after a step (in every region): what is left is consistent,
    and a re-run completes the release."""
    make_buckets(s3, REGIONS)
    seen: list[tuple[str, str]] = []

    def crash(region: str, ph: str, key: str) -> None:
        seen.append((ph, key))
        check = check_invariants(s3, REGIONS)
        assert check == [], check
        if ph == phase and key.endswith(key_end):
            raise Crash(f"injected after {ph} {key}")

    report = publish_release(options(moto_url, artifacts, tmp_path, on_step=crash), io.StringIO())
    assert not report.ok
    assert all("injected after" in (r.error or "") for r in report.results)
    assert check_invariants(s3, REGIONS) == []
    assert not any(k == "latest/manifest.json" for r in REGIONS for k in keys(s3, f"{PREFIX}-{r}"))
    report = publish_release(options(moto_url, artifacts, tmp_path), io.StringIO())
    assert report.ok
    assert_fully_published(moto_url, REGIONS, artifacts)


CHILD = r"""
import json, os, signal, sys
from pathlib import Path
import boto3
from image.release.publish.cli import PublishOptions, publish_release
cfg = json.loads(sys.argv[1])
session = boto3.Session()
after_step = cfg.pop("kill_after_step", None)
after_parts = cfg.pop("kill_after_parts", None)
def hook(region, phase, key):
    if after_step and phase == after_step[0] and key.endswith(after_step[1]):
        os.kill(os.getpid(), signal.SIGKILL)
parts = []
def on_part(**_):
    parts.append(1)
    if after_parts and len(parts) >= after_parts:
        os.kill(os.getpid(), signal.SIGKILL)
session.events.register("after-call.s3.UploadPart", on_part)
opts = PublishOptions(regions=cfg["regions"], version=cfg["version"], iso=Path(cfg["iso"]),
                      assets=Path(cfg["assets"]), endpoint_url=cfg["url"], multipart_threshold=5 << 20,
                      multipart_chunksize=5 << 20, max_concurrency=1, release_dir=Path(cfg["release_dir"]),
                      progress="plain", session=session, on_step=hook)
sys.exit(0 if publish_release(opts).ok else 1)
"""


@pytest.mark.parametrize(
    "kill",
    [
        {"kill_after_parts": 2},
        {"kill_after_step": ["artifact", ISO]},
        {"kill_after_step": ["hash", ".iso.sha512"]},
        {"kill_after_step": ["latest", ISO]},
    ],
    ids=["mid-multipart", "after-iso", "after-hash", "after-latest-iso"],
)
def test_sigkill_then_rerun_repairs(
    s3: Any, moto_url: str, artifacts: dict[str, Path], tmp_path: Path, kill: dict[str, Any]
) -> None:
    """A real SIGKILL of a publish process at several points; a watcher polls the buckets all the
    time; a second process run finishes the job."""
    make_buckets(s3, REGIONS)
    cfg = {
        "regions": REGIONS,
        "version": "1.0.0",
        "iso": str(artifacts["iso"]),
        "assets": str(artifacts["assets"]),
        "url": moto_url,
        "release_dir": str(tmp_path / "release"),
    }
    env = {**os.environ, **CREDS, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with Watcher(moto_url, REGIONS) as watcher:
        killed = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps({**cfg, **kill})],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        assert check_invariants(s3, REGIONS) == []
        if "kill_after_parts" in kill:
            uploads = s3.list_multipart_uploads(Bucket=f"{PREFIX}-us-east-1").get("Uploads", [])
            assert uploads, "the kill was meant to leave an unfinished multipart upload"
        rerun = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(cfg)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "testing-secret-not-printed" not in rerun.stdout + rerun.stderr
    assert watcher.polls > 0 and watcher.violations == []
    assert_fully_published(moto_url, REGIONS, artifacts)
    if "kill_after_parts" in kill:
        assert "aborted a stale multipart upload" in rerun.stdout
        assert not s3.list_multipart_uploads(Bucket=f"{PREFIX}-us-east-1").get("Uploads")


def test_new_version_moves_latest_safely(s3: Any, moto_url: str, artifacts: dict[str, Path], tmp_path: Path) -> None:
    make_buckets(s3, REGIONS)
    assert publish_release(options(moto_url, artifacts, tmp_path, version="1.0.0"), io.StringIO()).ok
    new_iso = tmp_path / ISO
    new_iso.write_bytes(os.urandom(6 * MiB))
    art2 = {**artifacts, "iso": new_iso}
    with Watcher(moto_url, REGIONS) as watcher:
        assert publish_release(options(moto_url, art2, tmp_path, version="1.1.0"), io.StringIO()).ok
    assert watcher.polls > 0 and watcher.violations == []
    assert_fully_published(moto_url, REGIONS, art2, version="1.1.0")
    anon = anonymous_client(moto_url)  # the old version stays where it was
    old = anon.get_object(Bucket=f"{PREFIX}-eu-west-1", Key=f"1.0.0/failback_livecd/{ISO}")["Body"].read()
    assert hashlib.sha512(old).hexdigest() == hashlib.sha512(artifacts["iso"].read_bytes()).hexdigest()


def test_one_failing_region_does_not_hide_the_others(
    s3: Any, moto_url: str, artifacts: dict[str, Path], tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    for k, v in CREDS.items():  # the `inv publish` path: the standard credential chain
        monkeypatch.setenv(k, v)
    regions = [*REGIONS, "sa-east-1"]
    make_buckets(s3, regions, skip={f"{PREFIX}-hashes-eu-west-1"}, located={f"{PREFIX}-sa-east-1": "eu-central-1"})
    out = io.StringIO()
    code = publish_command(
        ",".join(regions),
        "1.0.0",
        iso=str(artifacts["iso"]),
        assets=str(artifacts["assets"]),
        endpoint_url=moto_url,
        multipart_threshold_mib=5,
        multipart_chunksize_mib=5,
        progress="plain",
        out=out,
        release_dir=str(tmp_path),
    )
    assert code == 1
    text = out.getvalue()
    assert f"s3://{PREFIX}-hashes-eu-west-1: no such bucket (create it in eu-west-1" in text
    assert f"s3://{PREFIX}-sa-east-1: wrong region, the bucket is in eu-central-1, not sa-east-1" in text
    assert "FAILED in 2 of 4 region(s): eu-west-1, sa-east-1" in capsys.readouterr().err
    # nothing written to the broken regions (checked before any write), the others complete
    assert keys(s3, f"{PREFIX}-eu-west-1") == []
    assert_fully_published(moto_url, ["us-east-1", "ap-southeast-2"], artifacts)


def gnupg_daemons(home: Path) -> list[int]:
    """PIDs of live processes started for this GnuPG home (gpg-agent, keyboxd, dirmngr...): gpg
    passes them `--homedir HOME`, or they inherit GNUPGHOME=HOME."""
    arg, env = str(home).encode(), b"GNUPGHOME=" + str(home).encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline, environ = (proc / "cmdline").read_bytes(), (proc / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if arg in cmdline.split(b"\0") or env in environ.split(b"\0"):
            pids.append(int(proc.name))
    return pids


@contextlib.contextmanager
def gnupg_home(home: Path) -> Iterator[Path]:
    """A throw-away GnuPG home; on exit the daemons gpg autostarted for it are stopped (a
    gpg-agent otherwise outlives the test, holding a deleted tmp dir)."""
    home.mkdir(mode=0o700)
    try:
        yield home
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=False, capture_output=True)
        deadline = time.monotonic() + 10
        while gnupg_daemons(home) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in gnupg_daemons(home):  # did not obey gpgconf: started by this test, for this home
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_gpg_signature_of_sha512sums(s3: Any, moto_url: str, artifacts: dict[str, Path], tmp_path: Path) -> None:
    with gnupg_home(tmp_path / "gnupg") as home:
        check_gpg_signature_of_sha512sums(s3, moto_url, artifacts, tmp_path, home)
        # signing went through a gpg-agent of this home: the check below can see one
        assert gnupg_daemons(home), "no gpg-agent found for the test's GnuPG home"
    assert gnupg_daemons(home) == [], "a GnuPG daemon outlived the test"


def check_gpg_signature_of_sha512sums(
    s3: Any, moto_url: str, artifacts: dict[str, Path], tmp_path: Path, home: Path
) -> None:
    gpg = ["gpg", "--homedir", str(home), "--batch"]
    subprocess.run(
        [
            *gpg,
            "--passphrase",
            "",
            "--quick-gen-key",
            "Release Test <release@example.test>",
            "ed25519",
            "sign",
            "never",
        ],
        check=True,
        capture_output=True,
    )
    make_buckets(s3, REGIONS[:1])
    opts = options(moto_url, artifacts, tmp_path, regions=REGIONS[:1], gpg_key="release@example.test", gpg_homedir=home)
    assert publish_release(opts, io.StringIO()).ok
    anon = anonymous_client(moto_url)
    hb = f"{PREFIX}-hashes-us-east-1"
    for prefix in ("1.0.0", "latest"):
        (tmp_path / "SUMS").write_bytes(anon.get_object(Bucket=hb, Key=f"{prefix}/SHA512SUMS")["Body"].read())
        (tmp_path / "SUMS.asc").write_bytes(anon.get_object(Bucket=hb, Key=f"{prefix}/SHA512SUMS.asc")["Body"].read())
        subprocess.run(
            [*gpg, "--verify", str(tmp_path / "SUMS.asc"), str(tmp_path / "SUMS")], check=True, capture_output=True
        )
    # The signature is reused, so an unchanged signed release re-publishes nothing.
    session, calls = session_with_counter()
    report = publish_release(
        options(
            moto_url,
            artifacts,
            tmp_path,
            regions=REGIONS[:1],
            gpg_key="release@example.test",
            gpg_homedir=home,
            session=session,
        ),
        io.StringIO(),
    )
    assert report.ok and not (set(calls) & WRITE_OPS), calls
    # Publishing without a key afterwards removes the now-unmatched latest signature.
    assert publish_release(
        options(moto_url, artifacts, tmp_path, regions=REGIONS[:1], version="1.0.1"), io.StringIO()
    ).ok
    assert "latest/SHA512SUMS.asc" not in keys(s3, hb) and "1.0.0/SHA512SUMS.asc" in keys(s3, hb)


def test_rich_reporter_and_table() -> None:
    """The terminal path: bars per region and the final table."""
    from image.release.publish.progress import RegionResult, make_reporter, render_table

    out = io.StringIO()
    rep = make_reporter("rich", out)
    rep.region_started("us-east-1", 100)
    rep.advance("us-east-1", 100)
    rep.region_finished(RegionResult("us-east-1", objects=1, planned=1, verified=True))
    rep.close()
    render_table(
        [RegionResult("us-east-1", objects=1, planned=1, bytes=100, seconds=0.5, verified=True)],
        rich_output=True,
        out=out,
    )
    assert "us-east-1" in out.getvalue() and "yes" in out.getvalue()


def test_other_part_size_still_uploads_nothing(
    s3: Any, moto_url: str, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    """Objects uploaded with 5 MiB parts are recognised (composite checksum recomputed for the
    object's own part size) by a run configured with 6 MiB parts: nothing is re-uploaded."""
    make_buckets(s3, REGIONS[:1])
    assert publish_release(options(moto_url, artifacts, tmp_path, regions=REGIONS[:1]), io.StringIO()).ok
    session, calls = session_with_counter()
    report = publish_release(
        options(moto_url, artifacts, tmp_path, regions=REGIONS[:1], session=session, multipart_chunksize=6 * MiB),
        io.StringIO(),
    )
    assert report.ok and not (set(calls) & WRITE_OPS), calls


def test_a_published_version_is_never_replaced(
    s3: Any, moto_url: str, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    make_buckets(s3, REGIONS[:2])
    assert publish_release(options(moto_url, artifacts, tmp_path, regions=REGIONS[:2]), io.StringIO()).ok
    other = tmp_path / "other" / ISO
    other.parent.mkdir()
    other.write_bytes(os.urandom(1 * MiB))
    out = io.StringIO()
    report = publish_release(options(moto_url, {**artifacts, "iso": other}, tmp_path, regions=REGIONS[:2]), out)
    assert not report.ok
    for r in report.results:
        assert "already holds a different file" in (r.error or "") and "new --version" in (r.error or "")
        assert r.written == 0
    assert_fully_published(moto_url, REGIONS[:2], artifacts)  # the first release, untouched


def test_error_messages_name_bucket_and_fix() -> None:
    from image.release.publish.s3 import describe_error

    def err(code: str, status: int, op: str, headers: dict[str, str] | None = None) -> ClientError:
        return ClientError(
            {
                "Error": {"Code": code, "Message": ""},
                "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers or {}},
            },
            op,
        )

    assert describe_error(err("403", 403, "HeadBucket"), "s3://b-x", "eu-west-1") == (
        "s3://b-x: access denied (403); check the credentials' policy, the bucket policy and --expected-owner"
    )
    msg = describe_error(
        err("PermanentRedirect", 301, "PutObject", {"x-amz-bucket-region": "us-west-2"}), "s3://b-x/k", "eu-west-1"
    )
    assert msg == "s3://b-x/k: wrong region, the bucket is in us-west-2, not eu-west-1"
    assert "no such bucket (create it in eu-west-1" in describe_error(
        err("404", 404, "HeadBucket"), "s3://b-x", "eu-west-1"
    )
    from botocore.exceptions import NoCredentialsError

    assert "no AWS credentials found" in describe_error(NoCredentialsError(), "s3://b", "eu-west-1")


def test_acl_option_grants_public_read(s3: Any, moto_url: str, artifacts: dict[str, Path], tmp_path: Path) -> None:
    make_buckets(s3, REGIONS[:1])
    assert publish_release(
        options(moto_url, artifacts, tmp_path, regions=REGIONS[:1], acl="public-read"), io.StringIO()
    ).ok
    for bucket in (f"{PREFIX}-us-east-1", f"{PREFIX}-hashes-us-east-1"):
        for key in keys(s3, bucket):
            grants = s3.get_object_acl(Bucket=bucket, Key=key)["Grants"]
            assert any(
                g["Grantee"].get("URI", "").endswith("/global/AllUsers") and g["Permission"] == "READ" for g in grants
            ), (bucket, key, grants)


def test_large_writes_share_one_budget_across_regions(
    s3: Any, moto_url: str, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    """With transfer_jobs=1, never two uploads/copies of an artifact at once, whatever the regions."""
    regions = [*REGIONS, "sa-east-1", "eu-central-1"]
    make_buckets(s3, regions)
    session, _ = session_with_counter()
    lock = threading.Lock()
    in_flight = [0, 0]  # now, most seen
    finished: list[str] = []
    # An upload spans CreateMultipartUpload..CompleteMultipartUpload (or is one PutObject); a copy is one CopyObject.
    starts, ends = (
        {"CreateMultipartUpload", "PutObject", "CopyObject"},
        {"CompleteMultipartUpload", "PutObject", "CopyObject"},
    )

    def large(params: dict[str, Any]) -> bool:
        return str(params.get("Key", "")).endswith((ISO, "failback_assets.tar.gz"))

    def before(params: dict[str, Any], model: Any, context: dict[str, Any], **_: Any) -> None:
        context["test_params"] = dict(params)  # after-call gets no request parameters
        if model.name in starts and large(params):
            with lock:
                in_flight[0] += 1
                in_flight[1] = max(in_flight)

    def after(model: Any, context: dict[str, Any], **_: Any) -> None:
        if model.name in ends and large(context.get("test_params", {})):
            with lock:
                in_flight[0] -= 1
                finished.append(model.name)

    session.events.register("before-parameter-build.s3", before)
    session.events.register("after-call.s3", after)
    report = publish_release(
        options(moto_url, artifacts, tmp_path, regions=regions, session=session, transfer_jobs=1), io.StringIO()
    )
    assert report.ok
    assert_fully_published(moto_url, regions, artifacts)
    assert len(finished) == 2 * 2 * len(regions)  # 2 artifacts, at {version}/ and latest/, in every region
    assert in_flight == [0, 1]


def test_default_transfer_jobs() -> None:
    cpus = os.cpu_count() or 1
    assert default_transfer_jobs(None) == 8  # AWS: copies are S3's work
    assert default_transfer_jobs("https://s3.eu-west-1.amazonaws.com") == 8
    assert default_transfer_jobs("https://minio.example.test:9000") == 8
    for url in ("http://127.0.0.1:5000", "http://localhost:9000", "http://[::1]:9000", "http://127.0.0.2"):
        assert default_transfer_jobs(url) == cpus, url  # the server shares our CPUs
