"""What the failback client itself needs in memory, measured: its own peak RSS over a whole run up to the
connectivity checks (a real process against the local control plane), printed next to the figure preflight
warns below (preflight.NEEDED_MIB, which adds the replicator's measured peak)."""

from __future__ import annotations

from pathlib import Path

from drs_agent.testing import run_measuring_peak_rss
from failback_client.preflight import CLIENT_PEAK_MIB, NEEDED_MIB, REPLICATOR_PEAK_MIB

from tests.controlplane_fixture import ControlPlaneHandle, drs_controlplane_factory  # noqa: F401
from tests.test_client_helpers import SEED, agent_listener, client_env, subprocess_env

KiB = 1024


def test_client_peak_rss_is_within_what_preflight_asks_for(drs_controlplane_factory, tmp_path: Path) -> None:  # noqa: F811
    cp: ControlPlaneHandle = drs_controlplane_factory(seed=SEED)
    with agent_listener() as port:
        env = subprocess_env(client_env(cp, agent_port=port, FAILBACK_PLAIN="1"))
        proc, peak_kib = run_measuring_peak_rss(
            ["failback_client", "--no-prompt", "--log-file", str(tmp_path / "client.log")],
            tmp_path / "peak",
            timeout=120,
            env=env,
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the failback client stops here" in proc.stdout
    print(
        f"\nclient peak RSS {peak_kib / KiB:.1f} MiB (preflight assumes {CLIENT_PEAK_MIB} MiB; "
        f"+ replicator {REPLICATOR_PEAK_MIB} MiB: warns below {NEEDED_MIB} MiB available)"
    )
    assert 10 * KiB < peak_kib <= CLIENT_PEAK_MIB * KiB, f"client peak RSS {peak_kib} KiB"
