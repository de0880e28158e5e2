"""`inv e2e`: the whole failback in QEMU.

The host runs, on 127.0.0.1: the local DRS control plane, moto's S3 server holding the replication software
(`inv assets`, uploaded with boto3 into the real bucket layout) and the replication agent serving an ext4
image as the recovery instance's volume (certificate issued by the control plane). The ISO boots under TCG
with 1 GiB, an empty virtual disk (the server being failed back to) and a seed volume (FBSEED, client/SEED.md)
that hands the client everything unattended; the guest reaches the host's services at 10.0.2.2 through
QEMU's user-mode network. Once DRS shows the recovery instance Ready, the Failback button is pressed
(StartFailbackLaunch); the guest does the final sync, reports completion (the job becomes COMPLETED), and
reboots (QEMU runs with -no-reboot, so the reboot ends it). Then the guest disk's digest must equal the source
volume's. Prints `source sha512: <hex>` and `target sha512: <hex>`.

With `convert` (the default), the recovery instance has a second volume: a bootable cloud-like Debian disk
(image/vm/convert_fixture.py: NVMe names in fstab and GRUB, an NVMe-only initramfs, a MAC-pinned network). The
guest replicates it too and converts it after the final sync (guide step 18); when the guest has rebooted, the
host boots that converted disk on the same machine model (virtio-blk, not NVMe) and it must reach its marker
line with a DHCP address. The data volume's digests are compared (conversion leaves a disk without an
operating system as replicated); the OS volume is expected to differ from its source by the conversion.

Credentials as a real account has them: the guest gets STS-like installation credentials that carry only
AWSElasticDisasterRecoveryFailbackInstallationPolicy and expire `installation_ttl` seconds after pairing; the
installed client must go on with the credentials DRS issues it (living `client_credentials_ttl`, refreshed).
Failback is pressed with a separate operator key. Prints `credential refreshes: N` and `access denied: N` from
the control plane's request record.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import secrets
import string
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from failback_client.regions import hashes_bucket, release_bucket

from image.core.errors import ImageError
from image.core.mounts import require_no_mounts
from image.core.paths import DEFAULT_BUILD
from image.core.run import run
from image.release.publish.s3 import public_read_policy
from image.stages.hashes import sha512_file

log = logging.getLogger("image.vm.e2e")

REGION = "us-east-1"
RECOVERY_INSTANCE = "i-0e2e00000000000aa"
SOURCE_SERVER = "s-0e2e00000000000aa"
GUEST_HOST = "10.0.2.2"  # the host's loopback as QEMU's user-mode network shows it to the guest
OTHER_MAC = "02:00:00:0e:2e:01"  # not the guest's: a failback to another server (full sync)
MiB = 1024 * 1024
REBOOT_GRACE_S = 180.0  # completion reported -> the guest's reboot (QEMU's -no-reboot ends it)
REBOOT_LINE = re.compile(r"reboot: Restarting system")


class E2EError(ImageError, RuntimeError):
    pass


@dataclass
class E2EOptions:
    iso: Path
    work: Path
    source_mib: int = 32
    fill_mib: int = 12  # random (incompressible) data in the source filesystem
    target_mib: int = 64
    memory_mib: int = 1024
    timeout: float = 2400.0
    way: str = "seabios-cd"  # Linux servers boot the client in BIOS mode (user guide)
    convert: bool = True  # also replicate, convert and boot a cloud-like OS volume (issue: conversion)
    converted_boot_timeout: float = 600.0
    windows: bool = False  # the OS volume is Windows-like (image/vm/windows_fixture.py, BIOS layout) instead
    installation_ttl: float | None = 60.0  # the admin's credentials expire this long after pairing (None: never)
    client_credentials_ttl: float = 30.0  # lifetime of the credentials DRS issues the installed client


@dataclass
class E2EResult:
    source_sha512: str
    target_sha512: str
    job_status: str
    failback_state: str
    seconds_to_ready: float
    seconds_total: float
    boot_outcome: str  # "matched": the guest rebooted (the kernel's restart line)
    serial_log: Path
    notes: list[str] = field(default_factory=list)
    converted_boot: str = "not run"  # "matched": the converted OS volume booted to its marker with an address
    converted_boot_line: str = ""
    converted_boot_seconds: float = 0.0
    converted: bool = False  # whether the run included the OS volume
    windows_hive: dict[str, tuple[str, str]] = field(default_factory=dict)  # reglookup of the converted hive
    credential_counts: dict[str, int] = field(default_factory=dict)  # ControlPlane.counts()
    # What the client sent DRS (SendClientLogsForDrs): the same on whichever console won the race to run it.
    client_log: list[str] = field(default_factory=list)
    installation_expired_before_completion_s: float | None = None  # how long the failback ran without them

    @property
    def ok(self) -> bool:
        converted = self.converted_boot == "matched" or bool(self.windows_hive)
        return (
            self.source_sha512 == self.target_sha512
            and self.job_status == "COMPLETED"
            and self.credential_counts.get("access denied", 0) == 0
            and self.failback_state == "FAILBACK_COMPLETED"
            and self.boot_outcome == "matched"
            and (not self.converted or converted)
        )


def _random_credential(policy: str, prefix: str = "AKIA", **kwargs: Any) -> Any:
    from drs_controlplane.policies import policy_named
    from drs_controlplane.sigv4 import Credential
    from failback_client.drs_model import drs_service_model

    alphabet = string.ascii_uppercase + string.digits
    return Credential(
        access_key=prefix + "".join(secrets.choice(alphabet) for _ in range(16)),
        secret_key="".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40)),
        policy=policy_named(policy, drs_service_model()),
        **kwargs,
    )


def make_source(path: Path, size_mib: int, fill_mib: int) -> Path:
    """The recovery instance's volume: an ext4 filesystem with files."""
    tree = path.with_suffix(".tree")
    (tree / "etc").mkdir(parents=True, exist_ok=True)
    (tree / "etc" / "hostname").write_text("restored-by-e2e\n")
    rng = random.Random(20261126)
    (tree / "data").mkdir(exist_ok=True)
    for i in range(fill_mib):
        (tree / "data" / f"chunk{i:03d}.bin").write_bytes(rng.randbytes(MiB))
    require_no_mounts(tree, f"copy it into {path.name}")
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "restored", "-d", str(tree), str(path), f"{size_mib}M"])
    return path


def publish_assets(url: str, out: Path) -> str:
    """Build the replication software bundle and upload it as the real buckets hold it; returns its version."""
    import boto3
    from botocore.config import Config

    from image.release.assets import build_assets

    assets = build_assets(out)
    s3 = boto3.Session(aws_access_key_id="e2e", aws_secret_access_key="e2e-secret").client(
        "s3", region_name=REGION, endpoint_url=url, config=Config(s3={"addressing_style": "path"})
    )
    for bucket in (release_bucket(REGION), hashes_bucket(REGION)):
        s3.create_bucket(Bucket=bucket)
        s3.put_bucket_policy(
            Bucket=bucket,
            Policy=public_read_policy(bucket),
        )
    for bucket, key, path in assets.bucket_objects(REGION):
        s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
    return assets.version


def agent_certificate(plane: Any, directory: Path) -> tuple[Path, Path, Path]:
    """The agent's key + CSR, signed by the control plane (what the service does for the real agent)."""
    directory.mkdir(parents=True, exist_ok=True)
    key, csr = directory / "agent.key", directory / "agent.csr"
    run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key)])
    key.chmod(0o600)
    run(
        [
            "openssl",
            "req",
            "-new",
            "-key",
            str(key),
            "-out",
            str(csr),
            "-subj",
            f"/CN=agent.{RECOVERY_INSTANCE}.drs.local",
        ]
    )
    issued = plane.issue_agent_certificate(RECOVERY_INSTANCE, csr.read_text(), extra_ips=("127.0.0.1", GUEST_HOST))
    (directory / "agent.pem").write_text(issued.certificate_pem)
    (directory / "ca.pem").write_text(issued.ca_certificate_pem)
    return directory / "ca.pem", directory / "agent.pem", key


class LinkedClient(set[str]):
    """The agent's paired failback client: the one DRS links to the recovery instance (asked from the plane)."""

    def __init__(self, plane: Any) -> None:
        super().__init__()
        self.plane = plane

    def __contains__(self, client_id: object) -> bool:
        with self.plane.store.transaction():
            record = self.plane.store.recovery_instance(RECOVERY_INSTANCE)
        linked = record.internal.get("failbackClientID") if record else None
        return bool(linked) and client_id == linked


def _paired(plane: Any) -> bool:
    """DRS issued the guest's replication software its certificate (the end of the installation)."""
    with plane.store.transaction():
        return bool(plane.store.recovery_instance(RECOVERY_INSTANCE).internal.get("clientCertificate"))


def credential_lines(res: E2EResult) -> list[str]:
    counts = res.credential_counts
    lines = [
        f"credential refreshes: {counts.get('credential refreshes', 0)}",
        f"access denied: {counts.get('access denied', 0)}",
        f"expired token: {counts.get('expired token', 0)}",
    ]
    if res.installation_expired_before_completion_s is not None:
        lines.append(
            f"failback completed {res.installation_expired_before_completion_s:.0f} s after the "
            "installation credentials expired"
        )
    return lines


def _instance(plane: Any) -> dict[str, Any]:
    with plane.store.transaction():
        return plane.store.recovery_instance(RECOVERY_INSTANCE).doc


def run_e2e(opts: E2EOptions) -> E2EResult:
    from drs_agent.server import AgentConfig, AgentServer
    from drs_agent.volume import VolumeSpec
    from drs_controlplane.seed import parse_seed
    from drs_controlplane.server import ControlPlane
    from failback_replicator.tlsconf import TlsFiles
    from moto.server import ThreadedMotoServer

    from image.release.seedimage import build_seed_image
    from image.vm import qemu

    if not opts.iso.is_file():
        raise E2EError(f"ISO {opts.iso} not found: build it first (inv build -b build/e2e)")
    work = opts.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    source = make_source(work / "source.img", opts.source_mib, opts.fill_mib)
    size = source.stat().st_size
    target = blank_disk(work / "target.img", opts.target_mib * MiB)
    # volume name on the recovery instance -> (source image, local device in the guest, target image)
    volumes = {"/dev/nvme1n1": (source, "/dev/vdb" if opts.convert else "/dev/vda", target)}
    if opts.windows:
        from image.vm.windows_fixture import e2e_windows_volume

        win_source = e2e_windows_volume(work / "windows-source.img")
        volumes = {
            "/dev/nvme0n1": (
                win_source,
                "/dev/vda",
                blank_disk(work / "windows-target.img", win_source.stat().st_size),
            ),
            **volumes,
        }
    elif opts.convert:
        from image.vm.convert_fixture import cloud_fixture, copy_image

        os_source = copy_image(cloud_fixture().image, work / "os-source.img")
        os_target = blank_disk(work / "os-target.img", os_source.stat().st_size)
        volumes = {"/dev/nvme0n1": (os_source, "/dev/vda", os_target), **volumes}

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    moto_port = moto.get_host_and_port()[1]
    # The admin's STS credentials (installation policy only) for the guest; an operator key for the console.
    credential = _random_credential(
        "installation",
        "ASIA",
        session_token=secrets.token_urlsafe(64),
        principal="arn:aws:sts::123456789012:assumed-role/FailbackInstaller/e2e",
    )
    operator = _random_credential("operator", principal="arn:aws:iam::123456789012:user/e2e-operator")
    seed = parse_seed(
        {
            "source_servers": [
                {
                    "id": SOURCE_SERVER,
                    "hostname": "e2e01",
                    "nics": [{"mac": OTHER_MAC}],
                    **({"os": "Microsoft Windows Server 2022 Datacenter"} if opts.windows else {}),
                    "disks": [
                        {"device": f"/dev/sd{chr(97 + i)}", "bytes": v[0].stat().st_size}
                        for i, v in enumerate(volumes.values())
                    ],
                }
            ],
            "recovery_instances": [
                {
                    "id": RECOVERY_INSTANCE,
                    "source_server": SOURCE_SERVER,
                    "private_ip": GUEST_HOST,
                    "use_private_ip": True,
                    "disks": [
                        {"device": name, "bytes": v[0].stat().st_size, "source_device": f"/dev/sd{chr(97 + i)}"}
                        for i, (name, v) in enumerate(volumes.items())
                    ],
                }
            ],
        }
    )
    state = work / "controlplane.db"
    state.unlink(missing_ok=True)
    # The guest reaches 10.0.2.2:<port>, which QEMU forwards to 127.0.0.1:<port>.
    plane = ControlPlane(
        state_path=state,
        credentials=[credential, operator],
        region=REGION,
        seed=seed,
        client_credentials_ttl=timedelta(seconds=opts.client_credentials_ttl),
    ).start()
    agent = None
    try:
        version = publish_assets(f"http://127.0.0.1:{moto_port}", work / "assets")
        ca, cert, key = agent_certificate(plane, work / "agent-tls")
        agent = AgentServer(
            AgentConfig(
                recovery_instance_id=RECOVERY_INSTANCE,
                volumes=[VolumeSpec(name, v[0]) for name, v in volumes.items()],
                tls=TlsFiles(ca=ca, cert=cert, key=key),
                paired_clients=LinkedClient(plane),
                port=0,
                watch_interval=1.0,
            )
        ).start()
        plane_port = int(plane.url.rsplit(":", 1)[1])
        seed_img = work / "seed.img"
        seed_img.unlink(missing_ok=True)
        build_seed_image(
            seed_img,
            kind="fat",
            sets=[
                f"AWS_REGION={REGION}",
                f"AWS_ACCESS_KEY={credential.access_key}",
                f"AWS_SECRET_KEY={credential.secret_key}",
                f"AWS_SESSION_TOKEN={credential.session_token}",
                f"AWS_DRS_ENDPOINT=http://{GUEST_HOST}:{plane_port}",
                f"RECOVERY_INSTANCE_ID={RECOVERY_INSTANCE}",
                "DEVICE_MAPPING=" + ",".join(f"{name}={v[1]}" for name, v in volumes.items()),
                "NO_PROMPT=1",
                f"FAILBACK_S3_ENDPOINT=http://{GUEST_HOST}:{moto_port}",
                f"FAILBACK_AGENT_PORT={agent.port}",
                "REBOOT=1",
            ],
        )
        log.info(
            "e2e: replication software %s in S3 at :%d, control plane %s, agent :%d, volumes %s",
            version,
            moto_port,
            plane.url,
            agent.port,
            ", ".join(f"{n} ({v[0].stat().st_size} bytes) -> {v[1]}" for n, v in volumes.items()),
        )

        way = qemu.boot_way(opts.way)
        serial = work / "serial.log"
        qmp = qemu.short_socket_path("e2e-qmp")
        argv = qemu.iso_argv(way, image=opts.iso, serial_log=serial, qmp_socket=qmp, memory_mib=opts.memory_mib)
        # The empty disks the recovery volumes land on (virtio, in order: /dev/vda, /dev/vdb), then the seed.
        for i, (_source, _device, tgt) in enumerate(sorted(volumes.values(), key=lambda v: v[1])):
            argv += [
                "-drive",
                f"if=none,id=target{i},file={tgt},format=raw",
                "-device",
                f"virtio-blk-pci,drive=target{i}" + (",bootindex=1" if i == 0 else ""),
            ]
        argv += [
            "-drive",
            f"if=none,id=seed,file={seed_img},format=raw,readonly=on",
            "-device",
            "virtio-blk-pci,drive=seed",
        ]
        boot: dict[str, Any] = {}

        def boot_thread() -> None:
            try:
                boot["result"] = qemu.watch_boot(
                    argv, serial_log=serial, qmp_socket=qmp, pattern=REBOOT_LINE, timeout=opts.timeout
                )
            except Exception as exc:  # reported by the main thread
                boot["error"] = exc

        thread = threading.Thread(target=boot_thread, name="e2e-qemu", daemon=True)
        thread.start()
        deadline = started + opts.timeout
        completed_at: float | None = None
        ready_at = None
        job: dict[str, Any] | None = None
        last_state = None
        installation_expires: float | None = None
        installation_expires_at = None  # the plane's clock, to compare with the job's endDateTime
        while time.monotonic() < deadline:
            if not thread.is_alive():
                break
            doc = _instance(plane)
            if installation_expires is None and opts.installation_ttl is not None and _paired(plane):
                installation_expires_at = plane.now() + timedelta(seconds=opts.installation_ttl)
                plane.set_credential_expiry(credential.access_key, installation_expires_at)
                installation_expires = time.monotonic() + opts.installation_ttl
                log.info("e2e: paired; the installation credentials expire in %.0f s", opts.installation_ttl)
            fb_state = doc["failback"]["state"]
            if fb_state != last_state:
                log.info(
                    "e2e: failback state %s (replication %s)",
                    fb_state,
                    doc["dataReplicationInfo"].get("dataReplicationState"),
                )
                last_state = fb_state
            if ready_at is None and fb_state == "FAILBACK_READY_FOR_LAUNCH":
                ready_at = time.monotonic() - started
            # Failback is pressed once the admin's credentials have expired: the rest runs without them.
            if (
                job is None
                and fb_state == "FAILBACK_READY_FOR_LAUNCH"
                and (installation_expires is None or time.monotonic() >= installation_expires)
            ):
                client = plane_client(plane, operator)
                job = client.start_failback_launch(recoveryInstanceIDs=[RECOVERY_INSTANCE])["job"]
                log.info(
                    "e2e: ready after %.0f s; Failback pressed (job %s) after %.0f s",
                    ready_at,
                    job["jobID"],
                    time.monotonic() - started,
                )
            if fb_state == "FAILBACK_COMPLETED" and completed_at is None:
                completed_at = time.monotonic()
            if completed_at is not None and time.monotonic() - completed_at > REBOOT_GRACE_S:
                log.warning("e2e: the guest did not reboot within %.0f s of completing", REBOOT_GRACE_S)
                break
            if fb_state == "FAILBACK_ERROR":
                error = doc["dataReplicationInfo"].get("dataReplicationError")
                log.warning("e2e: DRS shows FAILBACK_ERROR: %s", error)
            time.sleep(1.0)
        if thread.is_alive():  # deadline, or no reboot after completion: stop QEMU ourselves
            qemu.qmp_quit(qmp)
            thread.join(timeout=60)
        if "error" in boot:
            raise E2EError(f"QEMU failed: {boot['error']}")
        result = boot.get("result")
        doc = _instance(plane)
        job_status = "NONE"
        completed_after_expiry: float | None = None
        if job is not None:
            jobs = plane_client(plane, operator).describe_jobs(filters={"jobIDs": [job["jobID"]]})["items"]
            job_status = jobs[0]["status"] if jobs else "MISSING"
            ended = jobs[0].get("endDateTime") if jobs else None
            if ended and installation_expires_at is not None:
                # the guest may reboot before a poll sees COMPLETED: the job's end is DRS's record of it
                end = datetime.fromisoformat(ended.replace("Z", "+00:00"))
                completed_after_expiry = (end - installation_expires_at).total_seconds()
        src_digest = sha512_file(source, size)
        tgt_digest = sha512_file(target, size)
        outcome = result.outcome if result is not None else "no result"
        res = E2EResult(
            source_sha512=src_digest,
            target_sha512=tgt_digest,
            job_status=job_status,
            failback_state=doc["failback"]["state"],
            seconds_to_ready=ready_at or -1.0,
            seconds_total=time.monotonic() - started,
            boot_outcome=outcome,
            serial_log=serial,
            credential_counts=plane.counts(),
            client_log=[e["message"] for e in plane.store.logs()],
        )
        res.installation_expired_before_completion_s = completed_after_expiry
        if result is not None and not res.ok:
            res.notes.append("serial console tail:\n" + result.tail(40))
        if opts.windows:
            from image.vm.windows_fixture import converted_hive

            res.converted = True
            res.windows_hive = converted_hive(volumes["/dev/nvme0n1"][2], "bios")
        elif opts.convert and outcome == "matched":
            res.converted = True
            from image.vm.convert_fixture import boot_disk

            converted = boot_disk(volumes["/dev/nvme0n1"][2], "virtio-blk", work, timeout=opts.converted_boot_timeout)
            res.converted_boot, res.converted_boot_seconds = converted.outcome, converted.seconds
            res.converted_boot_line = converted.match or ""
            if converted.outcome != "matched":
                res.notes.append("converted disk's serial console tail:\n" + converted.tail(40))
        elif opts.convert:
            res.converted = True
        return res
    finally:
        if agent is not None:
            agent.stop()
        plane.stop()
        moto.stop()


def blank_disk(path: Path, size: int) -> Path:
    """An empty (sparse) disk image: the local server's disk the failback writes to."""
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def plane_client(plane: Any, credential: Any) -> Any:
    from failback_client.drs_model import make_drs_client

    return make_drs_client(
        region=REGION, endpoint_url=plane.url, access_key=credential.access_key, secret_key=credential.secret_key
    )


def default_iso() -> Path:
    """The ISO `inv build` made (the one under test, as for `inv smoke`), never a stale copy elsewhere."""
    from image.vm.smoke import default_iso as built_iso

    return built_iso()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iso", type=Path, default=None, help="ISO to boot (default build/out/...iso, made by `inv build`)")
    p.add_argument("--work", type=Path, default=DEFAULT_BUILD / "e2e" / "run", help="scratch directory")
    p.add_argument("--timeout", type=float, default=2400.0)
    p.add_argument(
        "--no-convert",
        action="store_true",
        help="only the data volume: skip the cloud-like OS volume, its conversion and its boot",
    )
    p.add_argument(
        "--windows",
        action="store_true",
        help="the OS volume is Windows-like (NTFS, SYSTEM hive): converted by the guest, hive checked",
    )
    p.add_argument(
        "--installation-ttl",
        type=float,
        default=60.0,
        help="the admin's credentials expire this many seconds after pairing (0: never; default 60)",
    )
    p.add_argument(
        "--client-credentials-ttl",
        type=float,
        default=30.0,
        help="lifetime of the credentials DRS issues the installed client (default 30)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    res = run_e2e(
        E2EOptions(
            iso=args.iso or default_iso(),
            work=args.work,
            timeout=args.timeout,
            convert=not args.no_convert,
            windows=args.windows,
            installation_ttl=args.installation_ttl or None,
            client_credentials_ttl=args.client_credentials_ttl,
        )
    )
    print(
        f"job {res.job_status}, failback state {res.failback_state}, QEMU {res.boot_outcome}, ready after "
        f"{res.seconds_to_ready:.0f} s, total {res.seconds_total:.0f} s; serial console: {res.serial_log}"
    )
    if res.converted:
        print(
            f"converted OS volume booted on virtio-blk: {res.converted_boot} after "
            f"{res.converted_boot_seconds:.0f} s ({res.converted_boot_line or 'no marker line'})"
        )
    for note in res.notes:
        print(note)
    for line in credential_lines(res):
        print(line)
    print(f"source sha512: {res.source_sha512}")
    print(f"target sha512: {res.target_sha512}")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
