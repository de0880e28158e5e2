"""Mutual TLS pairing between the replicator and the agent: only the paired peers talk."""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path

import pytest
from drs_agent.testing import Pki, RecordingReporter, make_image, replicator_config, start_agent
from failback_replicator.engine import ReplicationFailed, Replicator
from failback_replicator.interfaces import Command, QueueCommandSource
from failback_replicator.tlsconf import TlsFiles

DEV = "/dev/xvda"
SIZE = 1024 * 1024


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture()
def volumes(tmp_path: Path) -> tuple[Path, Path]:
    src = make_image(tmp_path / "source.img", SIZE, seed=5)
    tgt = tmp_path / "target.img"
    with open(tgt, "wb") as f:
        f.truncate(SIZE)
    return src, tgt


def _replicate(pki: Pki, port: int, tgt: Path, state: Path, tls: TlsFiles | None = None, **kw):  # type: ignore[no-untyped-def]
    reporter = RecordingReporter()
    cfg = replicator_config(pki, port, {DEV: tgt}, state, tls=tls, **{"give_up_after": 3.0, **kw})
    r = Replicator(cfg, reporter=reporter, commands=QueueCommandSource(Command.FINAL_SYNC), sleep=lambda s: None)
    return r, reporter


def _assert_pairing_failed(reporter: RecordingReporter, exc: pytest.ExceptionInfo) -> None:
    assert exc.value.error == "FAILED_TO_PAIR_AGENT_WITH_REPLICATION_SOFTWARE"
    assert ("PAIR_AGENT_WITH_REPLICATION_SOFTWARE", "FAILED") in reporter.names("initiation_step") or (
        "ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION",
        "FAILED",
    ) in reporter.names("initiation_step")
    assert [e for e, _ in reporter.names("error")] == ["FAILED_TO_PAIR_AGENT_WITH_REPLICATION_SOFTWARE"]


def test_client_certificate_from_another_ca_is_refused_and_logged(
    pki: Pki, volumes: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, tgt = volumes
    caplog.set_level(logging.WARNING)
    with start_agent(pki, {DEV: src}) as agent:
        r, reporter = _replicate(pki, agent.port, tgt, tmp_path / "state", tls=pki.rogue_client)
        with pytest.raises(ReplicationFailed) as exc:
            r.run()
        assert agent.refused and "TLS handshake failed" in agent.refused[0]
    _assert_pairing_failed(reporter, exc)
    assert any("refused connection" in rec.message and rec.name == "drs_agent" for rec in caplog.records)
    assert tgt.read_bytes() == bytes(SIZE), "nothing may be written for an unpaired peer"


def test_client_of_another_failback_client_id_is_refused(
    pki: Pki, volumes: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, tgt = volumes
    caplog.set_level(logging.WARNING)
    with start_agent(pki, {DEV: src}) as agent:
        r, reporter = _replicate(pki, agent.port, tgt, tmp_path / "state", tls=pki.other_client)
        with pytest.raises(ReplicationFailed) as exc:
            r.run()
        assert agent.refused and "fbc-zzzzzzzzzzzzzzzzz" in agent.refused[0]
    _assert_pairing_failed(reporter, exc)
    assert "NOT_PAIRED" in str(exc.value)
    assert any("not the paired failback client" in rec.message for rec in caplog.records)


def test_agent_certificate_from_another_ca_is_refused(
    pki: Pki, volumes: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, tgt = volumes
    caplog.set_level(logging.ERROR)
    impostor = Pki(
        agent=pki.rogue_agent,
        client=pki.client,
        rogue_client=pki.rogue_client,
        other_client=pki.other_client,
        rogue_agent=pki.rogue_agent,
    )
    with start_agent(impostor, {DEV: src}) as agent:
        r, reporter = _replicate(pki, agent.port, tgt, tmp_path / "state")
        with pytest.raises(ReplicationFailed) as exc:
            r.run()
    _assert_pairing_failed(reporter, exc)
    assert "certificate verify failed" in str(exc.value)
    assert any("pairing with the agent" in rec.message for rec in caplog.records)


def test_agent_with_another_identity_is_refused(pki: Pki, volumes: tuple[Path, Path], tmp_path: Path) -> None:
    src, tgt = volumes
    with start_agent(pki, {DEV: src}) as agent:
        r, reporter = _replicate(
            pki, agent.port, tgt, tmp_path / "state", agent_identity="drs-agent.i-0fffffffffffffff0"
        )
        with pytest.raises(ReplicationFailed) as exc:
            r.run()
    _assert_pairing_failed(reporter, exc)
    assert "not the paired agent" in str(exc.value)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_agent_refuses_tls_below_1_2(pki: Pki, volumes: tuple[Path, Path]) -> None:
    src, _ = volumes
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(pki.client.ca))
    ctx.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    try:
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with start_agent(pki, {DEV: src}) as agent:
        raw = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
        with pytest.raises((ssl.SSLError, OSError)):
            ctx.wrap_socket(raw).recv(1)
        raw.close()


def test_unreachable_agent_is_reported_as_not_seen(pki: Pki, volumes: tuple[Path, Path], tmp_path: Path) -> None:
    _, tgt = volumes
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r, reporter = _replicate(pki, port, tgt, tmp_path / "state", agent_not_seen_after=0.0, give_up_after=0.3)
    with pytest.raises(ReplicationFailed) as exc:
        r.run()
    assert exc.value.error == "AGENT_NOT_SEEN"
    assert "AGENT_NOT_SEEN" in [e for e, _ in reporter.names("error")]
    assert f"127.0.0.1:{port} refused" in str(exc.value)
    assert ("PAIR_AGENT_WITH_REPLICATION_SOFTWARE", "FAILED") in reporter.names("initiation_step")


def test_pairing_with_a_csr_signed_by_the_control_plane(tmp_path: Path, volumes: tuple[Path, Path]) -> None:
    """The client's pairing path (failback_client.pairing): key + CSR there, certificate from
    IssueAgentCertificateForDrs, and the replicator pairs and replicates with those files. The refusals of a
    wrong certificate are test_client_replication.py::test_pairing_key_csr_and_wrong_certificates."""
    from drs_agent.pki import CertificateAuthority
    from drs_agent.testing import AGENT_CN, CLIENT_ID
    from failback_client.pairing import create_key_and_csr, install_certificates

    src, tgt = volumes
    ca = CertificateAuthority.create(tmp_path / "ca")
    agent_tls = ca.issue(tmp_path / "agent", AGENT_CN, "server")
    csr = create_key_and_csr(tmp_path / "replicator", CLIENT_ID)
    issued = ca.sign_csr(csr, tmp_path / "issued")
    paths = install_certificates(tmp_path / "replicator", CLIENT_ID, issued, ca.cert.read_text())
    files = TlsFiles(ca=paths.ca, cert=paths.cert, key=paths.key)
    pki = Pki(agent=agent_tls, client=files, rogue_client=files, other_client=files, rogue_agent=agent_tls)
    with start_agent(pki, {DEV: src}) as agent:
        r, _ = _replicate(pki, agent.port, tgt, tmp_path / "state")
        assert r.run() == "COMPLETED"
    assert tgt.read_bytes() == src.read_bytes()


def test_mapping_that_does_not_fit_fails_configuration(pki: Pki, tmp_path: Path) -> None:
    src = make_image(tmp_path / "source.img", 2 * SIZE, seed=6)
    small = tmp_path / "small.img"
    with open(small, "wb") as f:
        f.truncate(SIZE)
    with start_agent(pki, {DEV: src}) as agent:
        for targets, why in (({DEV: small}, "needs"), ({"/dev/nvme9n1": small}, "has no volume '/dev/nvme9n1'")):
            reporter = RecordingReporter()
            r = Replicator(
                replicator_config(pki, agent.port, targets, tmp_path / "state", give_up_after=3.0),
                reporter=reporter,
                commands=QueueCommandSource(Command.FINAL_SYNC),
            )
            with pytest.raises(ReplicationFailed, match=why) as exc:
                r.run()
            assert exc.value.error == "FAILED_TO_CONFIGURE_REPLICATION_SOFTWARE"
            assert [e for e, _ in reporter.names("error")] == ["FAILED_TO_CONFIGURE_REPLICATION_SOFTWARE"]
            assert ("ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION", "FAILED") in reporter.names("initiation_step")
    assert small.read_bytes() == bytes(SIZE)
