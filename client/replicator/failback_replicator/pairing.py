"""The replicator's side of pairing: a private key and CSR for IssueAgentCertificateForDrs, then the
returned certificate and CA written next to the key as the TLS files the engine uses.

The key never leaves this machine and is never logged: only the CSR goes to the control plane
(subject CN = failbackClientID). Uses the openssl command (Debian's ca-certificates depends on it).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from .tlsconf import TlsFiles

_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$")


class PairingSetupError(RuntimeError):
    pass


def _openssl(args: list[str], stdin: bytes | None = None) -> bytes:
    try:
        proc = subprocess.run(["openssl", *args], input=stdin, capture_output=True, timeout=60)
    except FileNotFoundError:
        raise PairingSetupError("the openssl command is missing (install the openssl package)") from None
    if proc.returncode != 0:
        raise PairingSetupError(f"openssl {args[0]} failed: {proc.stderr.decode(errors='replace').strip()[-300:]}")
    return proc.stdout


def create_key_and_csr(directory: Path, failback_client_id: str) -> tuple[Path, str]:
    """Makes (or reuses) `replicator.key` (0600) and returns it with a PEM CSR for the client ID."""
    if not _CLIENT_ID.match(failback_client_id):
        raise PairingSetupError(f"failback client ID {failback_client_id!r} cannot be a certificate common name")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = directory / "replicator.key"
    if not key.exists():
        pem = _openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"])
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "wb") as f:
            f.write(pem)
    csr = _openssl(["req", "-new", "-key", str(key), "-subj", f"/CN={failback_client_id}"])
    return key, csr.decode()


def install_certificates(directory: Path, certificate_pem: str, ca_pem: str) -> TlsFiles:
    """Writes IssueAgentCertificateForDrs' certificate and CA beside the key; returns the TLS files."""
    for label, pem in (("certificate", certificate_pem), ("caCertificate", ca_pem)):
        if "-----BEGIN CERTIFICATE-----" not in pem:
            raise PairingSetupError(f"{label} from the control plane is not a PEM certificate")
    files = TlsFiles(
        ca=directory / "pairing-ca.pem", cert=directory / "replicator.pem", key=directory / "replicator.key"
    )
    files.cert.write_text(certificate_pem)
    files.ca.write_text(ca_pem)
    # The certificate must belong to our key: openssl prints the same public key for both.
    cert_pub = _openssl(["x509", "-noout", "-pubkey", "-in", str(files.cert)])
    key_pub = _openssl(["pkey", "-pubout", "-in", str(files.key)])
    if cert_pub.strip() != key_pub.strip():
        raise PairingSetupError("the issued certificate does not match this replicator's key (re-run pairing)")
    files.check()
    return files
