"""Guide steps 13-19 end to end on loopback, host level: the failback client (a real process) downloads the
replication software from moto's S3 server (uploaded by boto3), checks its sha512, configures it, pairs through
the local DRS control plane (IssueAgentCertificateForDrs), runs it against the real agent serving ext4 images
over mutual TLS, writes loop devices, forwards the state to DRS, and finishes when the test presses Failback.

Fast tests (download, unpacking, pairing checks) run by default; whole client runs need root (loop devices)
and are marked slow.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.request import Request, urlopen

import pytest
from drs_agent.testing import CuttingProxy, change_blocks
from failback_client.download import DownloadError, download_software, unpack
from failback_client.identify import local_identity
from failback_client.pairing import PairingError, create_key_and_csr, install_certificates

from image.stages.hashes import sha512_file

# The client stack's fixtures (moto, assets, s3, stack_factory) come from tests/controlplane_fixture.py (conftest).
from tests.controlplane_fixture import OTHER_MAC, RI, ClientProcess, blank, described, failback_state, wait_for
from tests.test_client_replication_helpers import (
    BUCKET,
    REGION,
    MiB,
    make_ext4,
    publish_assets,
    seed_for,
)

VERSION_KEY = "failback_assets/failback_assets.tar.gz"


# -- download (fast) ----------------------------------------------------------------------------
def test_download_checks_and_unpacks_the_software(s3: str, assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    software = download_software(REGION, s3, tmp_path / "work")
    assert software.version == assets.version and software.sha512 == assets.sha512
    assert os.access(software.launcher, os.X_OK)
    assert not (tmp_path / "work" / "failback_assets.tar.gz").exists(), "the tarball is removed once unpacked"
    out = subprocess.run([str(software.launcher), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--check-config" in out.stdout


def test_corrupt_download_is_refused_and_nothing_unpacked(moto: str, assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with urlopen(Request(f"{moto}/moto-api/reset", method="POST"), timeout=10):
        pass
    data = bytearray(assets.tarball.read_bytes())
    data[len(data) // 2] ^= 0x01
    publish_assets(moto, assets, tarball_bytes=bytes(data))
    with pytest.raises(DownloadError) as err:
        download_software(REGION, moto, tmp_path / "work")
    message = str(err.value)
    assert f"s3://{BUCKET}/{assets.version}/{VERSION_KEY}" in message
    assert hashlib.sha512(bytes(data)).hexdigest() in message and assets.sha512 in message
    assert "nothing was unpacked" in message and err.value.exit_status == 8
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == []


def test_missing_manifest_names_the_object(moto: str, tmp_path: Path) -> None:
    with urlopen(Request(f"{moto}/moto-api/reset", method="POST"), timeout=10):
        pass
    with pytest.raises(DownloadError, match=rf"s3://{BUCKET}/latest/manifest.json from {moto}"):
        download_software(REGION, moto, tmp_path / "work")


class _RecordingProxy(BaseHTTPRequestHandler):
    """A plain HTTP forward proxy (absolute-URI GETs) that records what went through it."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        with urlopen(
            Request(
                self.path,
                headers={k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "connection")},
            ),
            timeout=30,
        ) as upstream:
            body = upstream.read()
            self.send_response(upstream.status)
            for k, v in upstream.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_download_goes_through_the_proxy_from_the_environment(
    s3: str,
    assets,
    tmp_path: Path,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """botocore takes proxies from the standard variables (https_proxy on the LiveCD; the moto endpoint is
    plain HTTP, so http_proxy here): the same code path."""
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _RecordingProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    _RecordingProxy.seen = []
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.server_address[1]}")
    try:
        software = download_software(REGION, s3, tmp_path / "work")
    finally:
        proxy.shutdown()
    assert software.sha512 == assets.sha512
    assert any(p.endswith("/latest/manifest.json") for p in _RecordingProxy.seen)
    assert any(p.endswith(".tar.gz.sha512") for p in _RecordingProxy.seen)
    assert any(p.endswith(".tar.gz") for p in _RecordingProxy.seen), _RecordingProxy.seen


def _tarball(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


@pytest.mark.parametrize(
    "bad", ["../escape", "/etc/evil", "failback_assets/../../escape", "elsewhere/x", "symlink", "hardlink", "device"]
)
def test_unpack_refuses_escapes_links_and_devices(tmp_path: Path, bad: str) -> None:
    launcher = tarfile.TarInfo("failback_assets/bin/failback-replicator")
    launcher.mode = 0o755
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [(launcher, b"#!/bin/sh\n")]
    if bad == "symlink":
        info = tarfile.TarInfo("failback_assets/lib")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc"
        members.append((info, None))
    elif bad == "hardlink":
        info = tarfile.TarInfo("failback_assets/passwd")
        info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
        members.append((info, None))
    elif bad == "device":
        info = tarfile.TarInfo("failback_assets/dev")
        info.type = tarfile.CHRTYPE
        members.append((info, None))
    else:
        members.append((tarfile.TarInfo(bad), b"x"))
    tarball = _tarball(tmp_path / "a.tar.gz", members)
    into = tmp_path / "sub" / "work"
    with pytest.raises(DownloadError, match="refused"):
        unpack(tarball, into)
    assert not (into / "failback_assets").exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.tar.gz"]


def test_unpack_replaces_an_older_copy(tmp_path: Path) -> None:
    launcher = tarfile.TarInfo("failback_assets/bin/failback-replicator")
    launcher.mode = 0o755
    tarball = _tarball(tmp_path / "a.tar.gz", [(launcher, b"#!/bin/sh\necho new\n")])
    old = tmp_path / "work" / "failback_assets"
    old.mkdir(parents=True)
    (old / "stale").write_text("old")
    root = unpack(tarball, tmp_path / "work")
    assert not (root / "stale").exists() and (root / "bin/failback-replicator").read_text().endswith("new\n")
    assert os.stat(root / "bin/failback-replicator").st_mode & 0o777 == 0o755


# -- pairing (fast) -----------------------------------------------------------------------------
def test_pairing_key_csr_and_wrong_certificates(drs_controlplane_factory, tmp_path: Path) -> None:
    from drs_controlplane.certs import sign_csr

    cp = drs_controlplane_factory()
    client_id = "fbc-0123456789abcdefg"
    tls = tmp_path / "tls"
    csr = create_key_and_csr(tls, client_id)
    assert os.stat(tls / "replicator.key").st_mode & 0o777 == 0o600
    assert os.stat(tls).st_mode & 0o777 == 0o700
    assert "PRIVATE KEY" not in csr and "CERTIFICATE REQUEST" in csr
    store, now = cp.plane.store, cp.plane.now()
    good = sign_csr(store, csr, expected_cn=client_id, now=now, server=False)
    paths = install_certificates(tls, client_id, good.certificate_pem, good.ca_certificate_pem)
    assert paths.cert.read_text() == good.certificate_pem
    # a certificate for another key (someone else's CSR with our CN) is refused, and not left installed
    other = create_key_and_csr(tmp_path / "other", client_id)
    foreign = sign_csr(store, other, expected_cn=client_id, now=now, server=False)
    with pytest.raises(PairingError, match="not for this replication software's key"):
        install_certificates(tls, client_id, foreign.certificate_pem, foreign.ca_certificate_pem)
    assert not paths.cert.exists()
    # ours, but checked against a CA that did not sign it
    with pytest.raises(PairingError, match="does not verify against the CA"):
        install_certificates(tls, client_id, good.certificate_pem, _other_ca(tmp_path))
    with pytest.raises(PairingError, match="not a PEM certificate"):
        install_certificates(tls, client_id, "garbage", good.ca_certificate_pem)
    with pytest.raises(PairingError, match="cannot be a certificate common name"):
        create_key_and_csr(tmp_path / "x", "fbc/../evil")


def _other_ca(tmp_path: Path) -> str:
    from drs_agent.pki import CertificateAuthority

    return CertificateAuthority.create(tmp_path / "rogue-ca", name="rogue").cert.read_text()


@pytest.mark.root
@pytest.mark.slow
def test_full_sync_continuous_writes_and_failback(s3: str, stack_factory, tmp_path: Path) -> None:
    """Another server, two volumes: full sync, Ready/Healthy in DRS, writes on the recovery instance arrive
    while replicating continuously, Failback pressed: final sync, completion reported, job COMPLETED."""
    src0 = make_ext4(tmp_path / "root.img", 48, seed=1, fill_mib=24)
    src1 = make_ext4(tmp_path / "data.img", 24, seed=2, fill_mib=12)
    sizes = {"/dev/nvme0n1": src0.stat().st_size, "/dev/nvme1n1": src1.stat().st_size}
    seed = seed_for(RI, list(sizes.items()), [OTHER_MAC])
    stack = stack_factory(
        seed,
        {"/dev/nvme0n1": src0, "/dev/nvme1n1": src1},
        {"/dev/nvme0n1": blank(tmp_path / "t0.img", 64 * MiB), "/dev/nvme1n1": blank(tmp_path / "t1.img", 32 * MiB)},
    )
    cp = stack.cp
    client = ClientProcess(stack.env(s3), tmp_path / "client.out")
    try:
        wait_for("Ready for launch", lambda: failback_state(cp) == "FAILBACK_READY_FOR_LAUNCH", client)
        ready = described(cp)
        info = ready["dataReplicationInfo"]
        assert info["dataReplicationState"] == "CONTINUOUS"
        assert {s["name"]: s["status"] for s in info["dataReplicationInitiation"]["steps"]} == dict.fromkeys(
            [s["name"] for s in info["dataReplicationInitiation"]["steps"]], "SUCCEEDED"
        )
        assert len(info["dataReplicationInitiation"]["steps"]) == 7
        assert {
            d["deviceName"]: (d["totalStorageBytes"], d["replicatedStorageBytes"]) for d in info["replicatedDisks"]
        } == {n: (s, s) for n, s in sizes.items()}
        assert ready["failback"]["failbackToOriginalServer"] is False
        assert "agentLastSeenByServiceDateTime" in ready["failback"] and "firstByteDateTime" in ready["failback"]

        # the recovery instance keeps running and writing: the change must arrive before Failback is pressed
        change_blocks(src0, [3, 17, 40], 1 * MiB, seed=11)
        expected = sha512_file(src0, sizes["/dev/nvme0n1"])
        wait_for(
            "continuous replication of the new writes",
            lambda: sha512_file(stack.devices["/dev/nvme0n1"], sizes["/dev/nvme0n1"]) == expected,
            client,
            60,
        )

        job = cp.press_failback(RI)
        status = client.wait(120)
    finally:
        client.kill()
    out = client.output
    assert status == 0, out
    assert "The failback completed successfully" in out
    assert "Not rebooting (REBOOT=0" in out
    # conversion ran after the final sync; the volumes hold no operating system, so nothing was changed
    assert "Conversion report" in out and "Conversion done (0 changes)" in out, out
    assert "sha512 verified" in out and "full sync (another server" in out
    assert "Failback launch requested" in out
    assert any(
        line.startswith(("INITIAL_SYNC: /dev/nvme0n1 ->", "CONTINUOUS: /dev/nvme0n1 ->"))
        and "ETA" in line
        and "/s" in line
        for line in out.splitlines()
    ), out
    stack.assert_targets_equal_sources()
    # the agent counts a connection's bytes when it ends
    assert stack.agent.bytes_sent > 36 * MiB, "a full sync moves every (incompressible) byte"
    final = described(cp)
    assert final["failback"]["state"] == "FAILBACK_COMPLETED"
    assert final["dataReplicationInfo"]["dataReplicationState"] == "STOPPED"
    jobs = cp.client().describe_jobs(filters={"jobIDs": [job["jobID"]]})["items"]
    assert jobs[0]["status"] == "COMPLETED"
    assert jobs[0]["participatingServers"][0]["launchStatus"] == "LAUNCHED"
    log = (tmp_path / "client.log").read_text()
    assert cp.secret_key not in out + log
    key = (tmp_path / "work" / "tls" / "replicator.key").read_text()
    assert key.strip().splitlines()[1] not in out + log + (tmp_path / "work" / "run" / "replicator.log").read_text()


@pytest.mark.root
@pytest.mark.slow
def test_delta_to_the_original_server_sends_only_what_differs(s3: str, stack_factory, tmp_path: Path) -> None:
    macs = local_identity("/").macs
    if not macs:
        pytest.skip("this host has no physical NIC MAC to stand for the original server")
    src = make_ext4(tmp_path / "root.img", 64, seed=3, fill_mib=40)
    size = src.stat().st_size
    tgt = tmp_path / "orig.img"
    shutil.copyfile(src, tgt)
    change_blocks(tgt, [2, 9, 33, 60], 1 * MiB, seed=5)  # the original server's disk, a little behind
    stack = stack_factory(seed_for(RI, [("/dev/nvme0n1", size)], macs), {"/dev/nvme0n1": src}, {"/dev/nvme0n1": tgt})
    client = ClientProcess({**stack.env(s3), "CONVERT": "0"}, tmp_path / "client.out")
    try:
        wait_for("Ready for launch", lambda: failback_state(stack.cp) == "FAILBACK_READY_FOR_LAUNCH", client)
        stack.cp.press_failback(RI)
        status = client.wait(120)
    finally:
        client.kill()
    assert status == 0, client.output
    assert "rescan (original server" in client.output
    assert "Conversion skipped (CONVERT=0" in client.output
    assert described(stack.cp)["failback"]["failbackToOriginalServer"] is True
    stack.assert_targets_equal_sources()
    sent = stack.agent.bytes_sent
    print(f"\ndelta: agent sent {sent / MiB:.2f} MiB for a {size / MiB:.0f} MiB volume with 4 changed 1 MiB blocks")
    assert sent < 8 * MiB, f"delta sent {sent} bytes"


@pytest.mark.root
@pytest.mark.slow
def test_corrupt_download_stops_the_client_before_any_write(
    moto: str,
    assets,
    stack_factory,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    with urlopen(Request(f"{moto}/moto-api/reset", method="POST"), timeout=10):
        pass
    data = bytearray(assets.tarball.read_bytes())
    data[100] ^= 0xFF
    publish_assets(moto, assets, tarball_bytes=bytes(data))
    src = make_ext4(tmp_path / "root.img", 16, seed=4, fill_mib=4)
    stack = stack_factory(
        seed_for(RI, [("/dev/nvme0n1", src.stat().st_size)], [OTHER_MAC]),
        {"/dev/nvme0n1": src},
        {"/dev/nvme0n1": blank(tmp_path / "t.img", 16 * MiB)},
    )
    client = ClientProcess(stack.env(moto), tmp_path / "client.out")
    status = client.wait(120)
    out = client.output
    assert status == 8, out
    assert "is corrupt or was tampered with" in out and assets.sha512 in out and "nothing was unpacked" in out
    assert not (tmp_path / "work" / "software" / "failback_assets").exists()
    info = described(stack.cp)["dataReplicationInfo"]
    steps = {s["name"]: s["status"] for s in info["dataReplicationInitiation"]["steps"]}
    assert steps["DOWNLOAD_REPLICATION_SOFTWARE_TO_FAILBACK_CLIENT"] == "FAILED"
    assert info["dataReplicationError"]["error"] == "FAILED_TO_DOWNLOAD_REPLICATION_SOFTWARE_TO_FAILBACK_CLIENT"
    assert (tmp_path / "t.img").read_bytes() == bytes(16 * MiB)


@pytest.mark.root
@pytest.mark.slow
def test_agent_with_a_wrong_certificate_is_refused(s3: str, stack_factory, tmp_path: Path) -> None:
    from drs_agent.pki import CertificateAuthority

    from tests.test_client_replication_helpers import AgentTls

    rogue = CertificateAuthority.create(tmp_path / "rogue")
    files = rogue.issue(tmp_path / "rogue-agent", f"agent.{RI}.drs.local", "server")
    src = make_ext4(tmp_path / "root.img", 16, seed=6, fill_mib=4)
    stack = stack_factory(
        seed_for(RI, [("/dev/nvme0n1", src.stat().st_size)], [OTHER_MAC]),
        {"/dev/nvme0n1": src},
        {"/dev/nvme0n1": blank(tmp_path / "t.img", 16 * MiB)},
        agent_tls=AgentTls(ca=files.ca, cert=files.cert, key=files.key),
    )
    client = ClientProcess(stack.env(s3), tmp_path / "client.out")
    status = client.wait(120)
    out = client.output
    assert status == 8, out
    assert "FAILED_TO_PAIR_AGENT_WITH_REPLICATION_SOFTWARE" in out
    info = described(stack.cp)["dataReplicationInfo"]
    steps = {s["name"]: s["status"] for s in info["dataReplicationInitiation"]["steps"]}
    assert steps["CONFIGURE_REPLICATION_SOFTWARE"] == "SUCCEEDED"
    assert steps["PAIR_AGENT_WITH_REPLICATION_SOFTWARE"] == "FAILED"
    assert info["dataReplicationError"]["error"] == "FAILED_TO_PAIR_AGENT_WITH_REPLICATION_SOFTWARE"
    assert described(stack.cp)["failback"]["state"] == "FAILBACK_ERROR"
    assert (tmp_path / "t.img").read_bytes() == bytes(16 * MiB), "nothing may be written for an unpaired agent"


@pytest.mark.root
@pytest.mark.slow
def test_stop_failback_ends_the_client_cleanly(s3: str, stack_factory, tmp_path: Path) -> None:
    src = make_ext4(tmp_path / "root.img", 16, seed=7, fill_mib=4)
    stack = stack_factory(
        seed_for(RI, [("/dev/nvme0n1", src.stat().st_size)], [OTHER_MAC]),
        {"/dev/nvme0n1": src},
        {"/dev/nvme0n1": blank(tmp_path / "t.img", 16 * MiB)},
    )
    client = ClientProcess(stack.env(s3), tmp_path / "client.out")
    try:
        wait_for("Ready for launch", lambda: failback_state(stack.cp) == "FAILBACK_READY_FOR_LAUNCH", client)
        stack.cp.client().stop_failback(recoveryInstanceID=RI)
        status = client.wait(60)
    finally:
        client.kill()
    out = client.output
    assert status == 0, out
    assert "Failback was stopped in Elastic Disaster Recovery (StopFailback)" in out
    assert "completed successfully" not in out
    doc = described(stack.cp)
    assert doc["failback"]["state"] == "FAILBACK_NOT_STARTED"
    assert doc["dataReplicationInfo"]["dataReplicationState"] == "STOPPED"
    assert not _replicator_pids(tmp_path / "work"), "the replication software must not outlive the client"


def _replicator_pids(work: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"failback_replicator" in b" ".join(cmdline) and str(work).encode() in b" ".join(cmdline):
            pids.append(int(entry.name))
    return pids


@pytest.mark.root
@pytest.mark.slow
def test_cut_link_and_killed_replicator_resume(s3: str, stack_factory, tmp_path: Path) -> None:
    """The link to the agent is cut mid-transfer (the replication software reconnects and resumes; DRS sees
    the disconnection), then the replication software itself is killed (the client restarts it)."""
    src = make_ext4(tmp_path / "root.img", 64, seed=8, fill_mib=48)
    size = src.stat().st_size
    stack = stack_factory(
        seed_for(RI, [("/dev/nvme0n1", size)], [OTHER_MAC], bandwidth_mbps=200),
        {"/dev/nvme0n1": src},
        {"/dev/nvme0n1": blank(tmp_path / "t.img", 64 * MiB)},
    )
    proxy = CuttingProxy(stack.agent.port, cut_after=12 * MiB)
    env = stack.env(s3, FAILBACK_AGENT_PORT=str(proxy.port))
    client = ClientProcess(env, tmp_path / "client.out")
    killed: list[int] = []
    try:
        wait_for("the first cut", lambda: proxy.cuts >= 1, client)
        wait_for("the second session", lambda: proxy.connections >= 2, client)
        wait_for("more data after the cut", lambda: proxy.forwarded > 24 * MiB, client)
        pids = _replicator_pids(tmp_path / "work")
        assert pids, client.output
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        wait_for("Ready for launch", lambda: failback_state(stack.cp) == "FAILBACK_READY_FOR_LAUNCH", client)
        stack.cp.press_failback(RI)
        status = client.wait(120)
    finally:
        client.kill()
        proxy.close()
    out = client.output
    assert status == 0, out
    assert "restarting it (1/3)" in out
    assert "UNSTABLE_NETWORK" in out or "DISCONNECTED" in out
    stack.assert_targets_equal_sources()
    # Restarting from zero after the cut (12 MiB) and the kill (24+ MiB) would move at least 12 + 24 + 48 MiB;
    # resuming moves the volume once plus the unverified batches (the engine's tests measure that precisely).
    print(
        f"\ncut+kill: {proxy.forwarded / MiB:.1f} MiB through the proxy for {size / MiB:.0f} MiB "
        f"(48 MiB incompressible), {proxy.connections} connections"
    )
    assert proxy.forwarded < 80 * MiB
