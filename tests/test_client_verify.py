"""Step 12 pieces: which address/port is checked, proxies, and the clock correction when permitted."""

from __future__ import annotations

from pathlib import Path

import pytest
from failback_client.errors import ClientError
from failback_client.verify import Target, replication_target, service_targets, tcp_problem

from tests.test_client_helpers import SEED, agent_listener, client_env, closed_port, run_in_process

INSTANCE = {
    "recoveryInstanceID": "i-0123456789abcdef0",
    "recoveryInstanceProperties": {
        "networkInterfaces": [
            {"macAddress": "0e:00:00:00:00:01", "ips": ["10.0.1.21", "203.0.113.21"], "isPrimary": True}
        ]
    },
}


def test_private_or_public_ip_per_replication_settings() -> None:
    private = replication_target({"usePrivateIP": True, "port": 1500, "privateIP": "10.0.1.21"}, INSTANCE)
    assert (private.host, private.port) == ("10.0.1.21", 1500) and "VPN/Direct Connect" in private.fix
    public = replication_target(
        {"usePrivateIP": False, "port": 1500, "privateIP": "10.0.1.21", "publicIP": "203.0.113.9"}, INSTANCE
    )
    assert public.host == "203.0.113.9" and "security group" in public.fix
    # without addresses in the association answer, the instance's own interfaces are used
    assert replication_target({"usePrivateIP": False}, INSTANCE).address == "203.0.113.21:1500"
    assert replication_target({"usePrivateIP": True}, INSTANCE, port_override=4321).address == "10.0.1.21:4321"
    lonely = {
        "recoveryInstanceID": "i-0123456789abcdef1",
        "recoveryInstanceProperties": {"networkInterfaces": [{"ips": ["10.0.1.22"]}]},
    }
    with pytest.raises(ClientError, match="has no public IP address: assign it a public IP or Elastic IP"):
        replication_target({"usePrivateIP": False}, lonely)


def test_service_targets_direct_and_through_a_proxy() -> None:
    direct = service_targets("https://drs.eu-west-1.amazonaws.com", "eu-west-1", None, env={})
    assert [t.address for t in direct] == ["drs.eu-west-1.amazonaws.com:443", "s3.eu-west-1.amazonaws.com:443"]
    proxied = service_targets(
        "https://vpce-1.drs.eu-west-1.vpce.amazonaws.com",
        "eu-west-1",
        None,
        env={"https_proxy": "http://proxy.corp:3128"},
    )
    assert {t.address for t in proxied} == {"proxy.corp:3128"} and all(t.via_proxy for t in proxied)
    assert "CONNECT to s3.eu-west-1.amazonaws.com" in proxied[1].fix


def test_tcp_problem_names_host_port_and_fix() -> None:
    with agent_listener() as port:
        assert tcp_problem(Target("x", "127.0.0.1", port, "fix it")) is None
    port = closed_port()
    message = tcp_problem(Target("the recovery instance", "127.0.0.1", port, "Open the port."), timeout=2)
    assert message == f"Cannot reach the recovery instance at 127.0.0.1:{port}: connection refused. Open the port."
    assert "does not resolve" in tcp_problem(Target("S3", "no-such-host.invalid", 443, "Check DNS."), timeout=2)


def test_skewed_clock_is_corrected_when_permitted(
    drs_controlplane_factory,
    monkeypatch,
    capsys,
    tmp_path: Path,
) -> None:
    import failback_client.preflight as preflight

    cp = drs_controlplane_factory(seed=SEED)
    cp.set_clock_offset(2 * 3600)
    steps: list[float] = []
    # stand in for the clock syscall only: the host clock must not move during tests
    monkeypatch.setattr(
        preflight.time, "clock_settime", lambda clock, value: steps.append(value - preflight.time.time())
    )
    monkeypatch.setattr(preflight.os, "geteuid", lambda: 0)
    run = run_in_process(monkeypatch, capsys, tmp_path, client_env(cp, FAILBACK_FIX_CLOCK="1"), "--no-prompt")
    assert "behind the endpoint's clock: corrected the system clock" in run.out
    assert len(steps) == 1 and abs(steps[0] - 7200) < 5
    # the clock did not really move, so DRS still refuses the signature: said as a clock problem
    assert run.status == 3 and "clock is more than 5 minutes off" in run.out
