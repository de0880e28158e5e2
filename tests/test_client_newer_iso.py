"""The newer-ISO notice (newer_iso.py) against moto's S3 server over HTTP, with what `inv publish` really
writes (image/release/publish/cli.py: latest/failback_livecd/version.json): a newer release gives one line naming it and
where it is; an older or equal one, a bucket without the object and an unreachable S3 give no line."""

from __future__ import annotations

import io
import time
from pathlib import Path
from urllib.request import Request, urlopen

import pytest
from failback_client import __version__
from failback_client.console import Console
from failback_client.newer_iso import NewerIsoCheck, is_newer, latest_published, parse_version

from image.release.publish.cli import publish_command
from image.release.publish.s3 import public_read_policy
from tests.controlplane_fixture import ControlPlaneHandle
from tests.test_client_helpers import SEED, agent_listener, client_env, closed_port, run_in_process
from tests.test_client_replication_helpers import BUCKET, HASH_BUCKET, REGION, admin_s3

ISO = "aws-failback-livecd-64bit.iso"
NEWER = "99.1.0"


@pytest.fixture
def s3(moto: str, monkeypatch: pytest.MonkeyPatch) -> str:
    with urlopen(Request(f"{moto}/moto-api/reset", method="POST"), timeout=10):
        pass
    client = admin_s3(moto)
    for bucket in (BUCKET, HASH_BUCKET):
        client.create_bucket(Bucket=bucket)
        client.put_bucket_policy(
            Bucket=bucket,
            Policy=public_read_policy(bucket),
        )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # the publisher's credentials (moto takes any)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    return moto


def publish(url: str, version: str, tmp_path: Path) -> None:
    """`inv publish` of a small ISO to the region's buckets on moto."""
    iso = tmp_path / version / ISO
    iso.parent.mkdir(parents=True)
    iso.write_bytes(b"ISO " + version.encode() * 1000)
    out = io.StringIO()
    assert (
        publish_command(
            REGION,
            version,
            iso=str(iso),
            endpoint_url=url,
            progress="none",
            out=out,
            release_dir=str(tmp_path / "release"),
        )
        == 0
    ), out.getvalue()


def lines(check: NewerIsoCheck | None) -> list[str]:
    out = io.StringIO()
    assert check is not None
    check.report(Console(stdin=io.StringIO(), stdout=out, plain=True), wait=15)
    return out.getvalue().splitlines()


def test_versions_compare_as_numbers() -> None:
    assert parse_version("1.10.0") == (1, 10) and parse_version("v2") == (2,) and parse_version("1.0rc1") is None
    assert is_newer("0.10.0", "0.9.9") and not is_newer("0.1.0", "0.1") and not is_newer("1.0-beta", "0.1.0")


def test_newer_published_iso_is_pointed_out(s3: str, tmp_path: Path) -> None:
    publish(s3, "0.0.1", tmp_path)  # older than this client: no line
    assert latest_published(REGION, s3)["version"] == "0.0.1"  # type: ignore[index]
    assert lines(NewerIsoCheck.start(REGION, s3)) == []
    publish(s3, __version__, tmp_path)  # the same: no line
    assert lines(NewerIsoCheck.start(REGION, s3)) == []
    publish(s3, NEWER, tmp_path)
    [line] = lines(NewerIsoCheck.start(REGION, s3))
    assert line == (
        f"A newer Failback LiveCD ({NEWER}) is published for {REGION}; this one is {__version__}. It is "
        f"at {s3}/{BUCKET}/latest/failback_livecd/{ISO} (this run goes on)"
    )


def test_silent_without_the_object_or_without_s3(s3: str) -> None:
    assert lines(NewerIsoCheck.start(REGION, s3)) == []  # buckets but nothing published yet
    started = time.monotonic()
    check = NewerIsoCheck.start(REGION, f"http://127.0.0.1:{closed_port()}")
    assert lines(check) == []
    assert time.monotonic() - started < 10  # one attempt, short timeouts
    assert NewerIsoCheck.start(None, s3) is None  # no region, no look


def test_the_workflow_shows_the_line_and_goes_on(
    s3: str, drs_controlplane_factory, monkeypatch, capsys, tmp_path: Path
) -> None:
    publish(s3, NEWER, tmp_path)
    cp: ControlPlaneHandle = drs_controlplane_factory(seed=SEED)
    with agent_listener() as port:
        run = run_in_process(
            monkeypatch, capsys, tmp_path, client_env(cp, agent_port=port, FAILBACK_S3_ENDPOINT=s3), "--no-prompt"
        )
    assert run.status == 0, run.all
    assert f"A newer Failback LiveCD ({NEWER}) is published for {REGION}" in run.out
    assert "the failback client stops here" in run.out
