"""pytest fixtures that run the local DRS control plane on 127.0.0.1 (free port) for a test.

tests/conftest.py registers this module (pytest_plugins), so every test module may name its fixtures without
importing them. `drs_controlplane` gives a handle seeded from controlplane/examples/seed.yaml;
`drs_controlplane_factory(seed=..., credentials=...)` makes more (own seed, several keys, a restart).
The client stack below (`moto`, `assets`, `s3`, `stack_factory`) runs the failback client against it.

    def test_x(drs_controlplane):
        drs = drs_controlplane.client()                      # boto3 client: public + our operations
        drs.describe_recovery_instances()
        drs_controlplane.throttle_next(2)                    # next 2 requests get 429
        drs_controlplane.set_clock_offset(600)               # server clock 10 min ahead (Date header too)
        drs_controlplane.press_failback("i-0a1b2c3d4e5f60001")  # console "Failback" (StartFailbackLaunch)
"""

from __future__ import annotations

import secrets
import string
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.request import Request, urlopen

import pytest
from botocore.client import BaseClient
from drs_agent.testing import blank_image
from drs_controlplane.certs import IssuedCertificate
from drs_controlplane.seed import Seed, load_seed, parse_seed
from drs_controlplane.server import ControlPlane
from drs_controlplane.sigv4 import Credential
from failback_client.drs_model import make_drs_client

from image.release.assets import Assets
from image.stages.hashes import sha512_file
from tests.test_client_replication_helpers import (
    AgentTls,
    agent_tls_from_controlplane,
    build_test_assets,
    clean_env,
    client_run_env,
    loop_device,
    publish_assets,
    start_agent,
    start_moto,
)

EXAMPLE_SEED = Path(__file__).resolve().parents[1] / "controlplane" / "examples" / "seed.yaml"
REGION = "us-east-1"


def random_credential(**kwargs: Any) -> Credential:
    alphabet = string.ascii_uppercase + string.digits
    access_key = "AKIA" + "".join(secrets.choice(alphabet) for _ in range(16))
    secret_key = "".join(secrets.choice(string.ascii_letters + string.digits + "/+") for _ in range(40))
    return Credential(access_key=access_key, secret_key=secret_key, **kwargs)


@dataclass
class ControlPlaneHandle:
    """A running control plane and the credentials it accepts (`credential` is the main one)."""

    plane: ControlPlane
    credential: Credential
    state_path: Path
    seed: Seed
    extra_credentials: list[Credential] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.plane.url

    @property
    def region(self) -> str:
        return self.plane.region

    @property
    def access_key(self) -> str:
        return self.credential.access_key

    @property
    def secret_key(self) -> str:
        return self.credential.secret_key

    @property
    def session_token(self) -> str | None:
        return self.credential.session_token

    def client(self, credential: Credential | None = None, **kwargs: Any) -> BaseClient:
        """A boto3 drs client for this plane (make_drs_client; kwargs override, e.g. max_attempts=1)."""
        cred = credential or self.credential
        options: dict[str, Any] = {
            "region": self.region,
            "endpoint_url": self.url,
            "access_key": cred.access_key,
            "secret_key": cred.secret_key,
            "session_token": cred.session_token,
        }
        options.update(kwargs)
        return make_drs_client(**options)

    # state knobs
    def throttle_next(self, count: int, retry_after: int = 1) -> None:
        self.plane.throttle_next(count, retry_after)

    def set_clock_offset(self, seconds: float) -> None:
        """Move the control plane's clock (signature checks and the Date header) relative to real time."""
        self.plane.clock_offset = timedelta(seconds=seconds)

    def set_account_initialized(self, initialized: bool) -> None:
        """False: every call gets UninitializedAccountException (DRS not set up in this Region)."""
        self.plane.account_initialized = initialized

    def recovery_instance(self, instance_id: str) -> dict[str, Any]:
        """The RecoveryInstance document as DescribeRecoveryInstances returns it (read directly)."""
        with self.plane.store.transaction():
            record = self.plane.store.recovery_instance(instance_id)
        if record is None:
            raise KeyError(instance_id)
        return record.doc

    def internal(self, instance_id: str) -> dict[str, Any]:
        """What the service keeps about a recovery instance but does not show (mapping, lag, ...)."""
        with self.plane.store.transaction():
            record = self.plane.store.recovery_instance(instance_id)
        if record is None:
            raise KeyError(instance_id)
        return record.internal

    def set_ec2_state(self, instance_id: str, state: str) -> None:
        with self.plane.store.transaction():
            record = self.plane.store.recovery_instance(instance_id)
            if record is None:
                raise KeyError(instance_id)
            record.doc["ec2InstanceState"] = state
            self.plane.store.save_recovery_instance(record)

    def press_failback(self, *instance_ids: str) -> dict[str, Any]:
        """The console's Failback button: StartFailbackLaunch through boto3; returns the job."""
        return self.client().start_failback_launch(recoveryInstanceIDs=list(instance_ids))["job"]

    def issue_agent_certificate(self, instance_id: str, csr_pem: str) -> IssuedCertificate:
        """The agent side of pairing: sign the agent's CSR (CN agent.<id>.drs.local; SANs its IPs + 127.0.0.1)."""
        return self.plane.issue_agent_certificate(instance_id, csr_pem)

    def client_logs(self) -> list[dict[str, Any]]:
        with self.plane.store.transaction():
            return self.plane.store.logs()

    def client_metrics(self) -> list[dict[str, Any]]:
        with self.plane.store.transaction():
            return self.plane.store.metrics()

    def restart(self) -> None:
        """Stop and start again on the same state database (new port: read .url again)."""
        credentials = list(self.plane.credentials.values())  # with those DRS issued failback clients
        ttl, not_seen = self.plane.issuer.ttl, self.plane.service.client_not_seen_after
        self.plane.stop()
        self.plane = ControlPlane(
            state_path=self.state_path,
            credentials=credentials,
            region=self.plane.region,
            client_credentials_ttl=ttl,
            client_not_seen_after=not_seen,
        ).start()

    def stop(self) -> None:
        self.plane.stop()


ControlPlaneFactory = Callable[..., ControlPlaneHandle]


@pytest.fixture
def drs_controlplane_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneFactory]:
    """Makes control planes: factory(seed=None|dict|Path|Seed, credential=None, extra_credentials=(), region=...)."""
    handles: list[ControlPlaneHandle] = []

    def make(
        seed: Seed | dict[str, Any] | Path | None = None,
        credential: Credential | None = None,
        extra_credentials: tuple[Credential, ...] = (),
        region: str = REGION,
        client_credentials_ttl: float = 3600.0,
        client_not_seen_after: float | None = None,
    ) -> ControlPlaneHandle:
        if seed is None:
            seed = load_seed(EXAMPLE_SEED)
        elif isinstance(seed, Path):
            seed = load_seed(seed)
        elif isinstance(seed, dict):
            seed = parse_seed(seed)
        credential = credential or random_credential()
        state = tmp_path_factory.mktemp("drs-controlplane") / "state.db"
        plane = ControlPlane(
            state_path=state,
            credentials=[credential, *extra_credentials],
            region=region,
            seed=seed,
            client_credentials_ttl=timedelta(seconds=client_credentials_ttl),
            client_not_seen_after=None if client_not_seen_after is None else timedelta(seconds=client_not_seen_after),
        ).start()
        handle = ControlPlaneHandle(plane, credential, state, seed, list(extra_credentials))
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.stop()


@pytest.fixture
def drs_controlplane(drs_controlplane_factory: ControlPlaneFactory) -> ControlPlaneHandle:
    """A control plane seeded from controlplane/examples/seed.yaml, with one random key pair."""
    return drs_controlplane_factory()


# -- the client stack: the failback client (a real process) against this control plane, the agent and moto S3
# (the replication software published there); used by the client's replication, liveness, boot-mode and
# last-look tests. Whole client runs need root (loop devices).
RI = "i-0e2e0000000000001"


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    server, url = start_moto()
    yield url
    server.stop()


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    return build_test_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture
def s3(moto: str, assets: Assets) -> str:
    with urlopen(Request(f"{moto}/moto-api/reset", method="POST"), timeout=10):
        pass
    publish_assets(moto, assets)
    return moto


class ClientProcess:
    """`python -m failback_client` with the launcher's variables; output to a file the test reads."""

    def __init__(self, env: dict[str, str], out: Path) -> None:
        self.out_path = out
        self._out = open(out, "wb")  # noqa: SIM115 - closed in wait()
        command = [sys.executable, "-m", "failback_client", "--log-file", str(out.with_suffix(".log"))]
        self.proc = subprocess.Popen(
            command, env=clean_env(env), stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT
        )

    @property
    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._out.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


def wait_for(what: str, check: Callable[[], bool], client: ClientProcess, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if client.proc.poll() is not None:
            raise AssertionError(f"client exited ({client.proc.returncode}) before {what}:\n{client.output}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{client.output}")


def failback_state(cp: ControlPlaneHandle) -> str:
    return cp.recovery_instance(RI)["failback"]["state"]


def described(cp: ControlPlaneHandle) -> dict[str, Any]:
    """The recovery instance as DescribeRecoveryInstances shows it (through boto3, like the console)."""
    items = cp.client().describe_recovery_instances(filters={"recoveryInstanceIDs": [RI]})["items"]
    assert len(items) == 1
    return items[0]


class Stack:
    """Control plane + agent + loop-device targets for one client run."""

    def __init__(
        self,
        cp: ControlPlaneHandle,
        tmp: Path,
        sources: dict[str, Path],
        targets: dict[str, Path],
        agent_tls: AgentTls | None = None,
    ) -> None:
        self.cp, self.tmp, self.sources, self.targets = cp, tmp, sources, targets
        self.tls = agent_tls or agent_tls_from_controlplane(cp, RI, tmp / "agent-tls")
        self.agent = start_agent(cp, RI, sources, self.tls)
        self.devices: dict[str, str] = {}
        self._loops = [loop_device(p) for p in targets.values()]
        for name, ctx in zip(targets, self._loops, strict=True):
            self.devices[name] = ctx.__enter__()

    def close(self) -> None:
        self.agent.stop()
        for ctx in self._loops:
            ctx.__exit__(None, None, None)

    @property
    def mapping(self) -> str:
        return ",".join(f"{name}={dev}" for name, dev in self.devices.items())

    def env(self, s3_url: str, **extra: str) -> dict[str, str]:
        return client_run_env(
            self.cp,
            s3_url,
            RI,
            self.mapping,
            self.tmp / "work",
            **{"FAILBACK_AGENT_PORT": str(self.agent.port), **extra},
        )

    def assert_targets_equal_sources(self) -> dict[str, str]:
        digests = {}
        for name, src in self.sources.items():
            size = src.stat().st_size
            digests[name] = sha512_file(src, size)
            assert sha512_file(self.devices[name], size) == digests[name], f"{name}: target differs from source"
        return digests


blank = blank_image  # an empty (sparse) local disk of `size` bytes


@pytest.fixture
def stack_factory(drs_controlplane_factory: ControlPlaneFactory, tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def make(seed: dict[str, Any], sources: dict[str, Path], targets: dict[str, Path], **kw: Any) -> Stack:
        cp = drs_controlplane_factory(seed=seed)
        stack = Stack(cp, tmp_path, sources, targets, **kw)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.close()


OTHER_MAC = "52:54:00:0e:2e:99"  # not this host: failing back to another server (full sync)
