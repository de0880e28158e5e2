"""Guide step 15, the certificate half: a private key and CSR for IssueAgentCertificateForDrs, then the
returned certificate and CA installed beside the key as the replication software's TLS files.

The key is made here (mode 0600 from the first byte), never leaves this machine and is never logged or
shown: only the CSR goes to DRS (subject CN = failbackClientID). What comes back is refused unless it is a
certificate for our key and our client ID, signed by the CA that came with it. Uses the openssl command
(Debian's ca-certificates depends on it, so the LiveCD has it); the replication software is not in the
client's environment (it is downloaded), so this lives in the client package. `openssl()` is the one
openssl runner of the repository (the test agent's PKI, drs_agent.pki, uses it too). It does not go through
convert/runner.run, the conversion's runner: that one logs a command's output, and `genpkey` prints the key.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from failback_client.errors import EXIT_REPLICATION, ClientError

_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$")


class PairingError(ClientError):
    exit_status = EXIT_REPLICATION


@dataclass(frozen=True)
class TlsPaths:
    ca: Path
    cert: Path
    key: Path

    def as_config(self) -> dict[str, str]:
        return {"ca": str(self.ca), "cert": str(self.cert), "key": str(self.key)}


def tls_paths(directory: Path) -> TlsPaths:
    return TlsPaths(
        ca=directory / "pairing-ca.pem", cert=directory / "replicator.pem", key=directory / "replicator.key"
    )


def openssl(args: list[str], stdin: bytes | None = None) -> bytes:
    """Run `openssl ARGS` (stdin piped in, output captured, never logged); its stdout, or PairingError."""
    try:
        proc = subprocess.run(["openssl", *args], input=stdin, capture_output=True, timeout=60)
    except FileNotFoundError:
        raise PairingError("the openssl command is missing (install the openssl package)") from None
    if proc.returncode != 0:
        raise PairingError(f"openssl {args[0]} failed: {proc.stderr.decode(errors='replace').strip()[-300:]}")
    return proc.stdout


def create_key_and_csr(directory: Path, client_id: str) -> str:
    """Make a fresh P-256 key (0600) for this pairing and return a PEM CSR for `client_id`."""
    if not _CLIENT_ID.match(client_id):
        raise PairingError(f"failback client ID {client_id!r} cannot be a certificate common name")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    paths = tls_paths(directory)
    pem = openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"])
    tmp = paths.key.with_name(paths.key.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as f:
        f.write(pem)
    os.replace(tmp, paths.key)
    return openssl(["req", "-new", "-key", str(paths.key), "-subj", f"/CN={client_id}"]).decode()


def _subject_cn(cert: Path) -> str:
    text = openssl(["x509", "-noout", "-subject", "-nameopt", "multiline", "-in", str(cert)]).decode()
    m = re.search(r"commonName\s*=\s*(\S+)", text)
    return m.group(1) if m else ""


def install_certificates(directory: Path, client_id: str, certificate_pem: str, ca_pem: str) -> TlsPaths:
    """Write the issued certificate and CA beside the key, refusing anything that is not ours."""
    for label, pem in (("certificate", certificate_pem), ("caCertificate", ca_pem)):
        if "-----BEGIN CERTIFICATE-----" not in pem:
            raise PairingError(f"the {label} DRS returned is not a PEM certificate")
    paths = tls_paths(directory)
    paths.cert.write_text(certificate_pem)
    paths.ca.write_text(ca_pem)
    try:
        cert_pub = openssl(["x509", "-noout", "-pubkey", "-in", str(paths.cert)])
        key_pub = openssl(["pkey", "-pubout", "-in", str(paths.key)])
        if cert_pub.strip() != key_pub.strip():
            raise PairingError(
                "the certificate DRS issued is not for this replication software's key: refused "
                "(start the failback client again to pair afresh)"
            )
        cn = _subject_cn(paths.cert)
        if cn != client_id:
            raise PairingError(
                f"the certificate DRS issued is for {cn!r}, not this failback client ({client_id}): refused"
            )
        try:
            openssl(["verify", "-CAfile", str(paths.ca), "-purpose", "sslclient", str(paths.cert)])
        except PairingError as e:
            raise PairingError(f"the certificate DRS issued does not verify against the CA it came with: {e}") from None
    except PairingError:
        paths.cert.unlink(missing_ok=True)
        paths.ca.unlink(missing_ok=True)
        raise
    return paths
