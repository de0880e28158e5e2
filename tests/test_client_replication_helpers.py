"""Shared helpers for the failback client's replication tests (no tests here) and the QEMU end-to-end run:
moto's S3 server holding the built replication software, the DRS control plane's recovery instance, and the
real agent serving ext4 images with a certificate issued by that control plane.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from failback_client.pairing import openssl

from image.release.assets import Assets, build_assets
from image.release.publish.s3 import public_read_policy

REGION = "us-east-1"
BUCKET = f"aws-elastic-disaster-recovery-{REGION}"
HASH_BUCKET = f"aws-elastic-disaster-recovery-hashes-{REGION}"
MiB = 1024 * 1024
EPOCH = 1_760_000_000  # fixed SOURCE_DATE_EPOCH: the bundle is the same bytes every run


def start_moto() -> tuple[Any, str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def admin_s3(url: str) -> Any:
    return boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing-secret").client(
        "s3", region_name=REGION, endpoint_url=url, config=Config(s3={"addressing_style": "path"})
    )


def build_test_assets(out: Path) -> Assets:
    return build_assets(out, epoch=EPOCH)


def publish_assets(url: str, assets: Assets, *, tarball_bytes: bytes | None = None) -> None:
    """Both buckets, public-read as the real ones; the bundle under its version, its hash, the manifest.
    `tarball_bytes` replaces the bundle's bytes (not its hash): a corrupt download."""
    s3 = admin_s3(url)
    for bucket in (BUCKET, HASH_BUCKET):
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=bucket)
        s3.put_bucket_policy(
            Bucket=bucket,
            Policy=public_read_policy(bucket),
        )
    for bucket, key, path in assets.bucket_objects(REGION):
        body = tarball_bytes if (tarball_bytes is not None and key.endswith(".tar.gz")) else path.read_bytes()
        s3.put_object(Bucket=bucket, Key=key, Body=body)


def make_ext4(path: Path, size_mib: int, seed: int, fill_mib: int) -> Path:
    """An ext4 image with files: /etc/hostname and `fill_mib` MiB of random data (incompressible on purpose:
    a full sync must really move the bytes)."""
    tree = path.with_suffix(".tree")
    (tree / "etc").mkdir(parents=True, exist_ok=True)
    (tree / "etc" / "hostname").write_text(f"restored-{seed}\n")
    rng = random.Random(seed)
    (tree / "data").mkdir(exist_ok=True)
    for i in range(fill_mib):
        (tree / "data" / f"chunk{i:03d}.bin").write_bytes(rng.randbytes(MiB))
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", f"vol{seed}", "-d", str(tree), str(path), f"{size_mib}M"],
        check=True,
        capture_output=True,
    )
    return path


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[str]:
    dev = subprocess.run(
        ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)


@dataclass
class AgentTls:
    ca: Path
    cert: Path
    key: Path


def agent_tls_from_controlplane(cp: Any, instance_id: str, directory: Path) -> AgentTls:
    """The agent's side of pairing: its own key and CSR, signed by the control plane (as the service does)."""
    directory.mkdir(parents=True, exist_ok=True)
    key, csr = directory / "agent.key", directory / "agent.csr"
    openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key)])
    key.chmod(0o600)
    openssl(["req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN=agent.{instance_id}.drs.local"])
    issued = cp.issue_agent_certificate(instance_id, csr.read_text())
    (directory / "agent.pem").write_text(issued.certificate_pem)
    (directory / "ca.pem").write_text(issued.ca_certificate_pem)
    return AgentTls(ca=directory / "ca.pem", cert=directory / "agent.pem", key=key)


class LinkedClients(set):  # type: ignore[type-arg]
    """The agent's paired failback clients: whichever one DRS has linked to the recovery instance now (the real
    agent learns it from the service; here it asks the control plane's store)."""

    def __init__(self, cp: Any, instance_id: str) -> None:
        super().__init__()
        self.cp = cp
        self.instance_id = instance_id

    def __contains__(self, client_id: object) -> bool:
        linked = self.cp.internal(self.instance_id).get("failbackClientID")
        return bool(linked) and client_id == linked


def start_agent(
    cp: Any, instance_id: str, volumes: dict[str, Path], tls: AgentTls, *, host: str = "127.0.0.1", port: int = 0
) -> Any:
    from drs_agent.server import AgentConfig, AgentServer
    from drs_agent.volume import VolumeSpec
    from failback_replicator.tlsconf import TlsFiles

    cfg = AgentConfig(
        recovery_instance_id=instance_id,
        volumes=[VolumeSpec(n, p) for n, p in volumes.items()],
        tls=TlsFiles(ca=tls.ca, cert=tls.cert, key=tls.key),
        paired_clients=LinkedClients(cp, instance_id),
        host=host,
        port=port,
        watch_interval=0.3,
    )
    return AgentServer(cfg).start()


def seed_for(
    instance_id: str,
    disks: list[tuple[str, int]],
    macs: list[str],
    *,
    agent_ip: str = "127.0.0.1",
    bandwidth_mbps: int = 0,
) -> dict[str, Any]:
    """One source server (identified by `macs`) and its recovery instance with `disks` [(device, bytes)]."""
    return {
        "source_servers": [
            {
                "id": "s-0000000000000e2e0",
                "hostname": "restore01",
                "nics": [{"mac": m, "ips": ["192.168.50.10"]} for m in macs],
                "disks": [{"device": f"/dev/sd{chr(97 + i)}", "bytes": b} for i, (_, b) in enumerate(disks)],
            }
        ],
        "recovery_instances": [
            {
                "id": instance_id,
                "source_server": "s-0000000000000e2e0",
                "private_ip": agent_ip,
                "use_private_ip": True,
                "bandwidth_mbps": bandwidth_mbps,
                "disks": [
                    {"device": d, "bytes": b, "source_device": f"/dev/sd{chr(97 + i)}"}
                    for i, (d, b) in enumerate(disks)
                ],
            }
        ],
    }


def client_run_env(
    cp: Any, s3_url: str, instance_id: str, mapping: str, work_dir: Path, **extra: str
) -> dict[str, str]:
    """The launcher's variables for an unattended client run against this stack (no check-only, no reboot)."""
    env = {
        "AWS_ACCESS_KEY": cp.access_key,
        "AWS_SECRET_KEY": cp.secret_key,
        "AWS_REGION": cp.region,
        "AWS_DRS_ENDPOINT": cp.url,
        "RECOVERY_INSTANCE_ID": instance_id,
        "DEVICE_MAPPING": mapping,
        "NO_PROMPT": "1",
        "FAILBACK_S3_ENDPOINT": s3_url,
        "FAILBACK_WORK_DIR": str(work_dir),
        "FAILBACK_INCLUDE_LOOP": "1",
        "FAILBACK_PLAIN": "1",
        "FAILBACK_FIX_CLOCK": "0",
        "REBOOT": "0",
    }
    env.update(extra)
    return env


def clean_env(env: dict[str, str]) -> dict[str, str]:
    from tests.test_client_helpers import CLIENT_ENV_VARS

    drop = set(CLIENT_ENV_VARS) | {"http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"}
    base = {k: v for k, v in os.environ.items() if k not in drop}
    base.update(env)
    base["PYTHONUNBUFFERED"] = "1"
    return base
