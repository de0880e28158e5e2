"""A throw-away pairing PKI made with the openssl CLI, for tests and demos.

In production the certificates come from the control plane (IssueAgentCertificateForDrs signs the
failback client's CSR with CN = failbackClientID and returns the CA that also signed the agent's
certificate). Keys are written 0600 and never printed. openssl runs through the client's one runner
(failback_client.pairing.openssl): a failure is its PairingError with the tail of openssl's stderr.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from failback_client.pairing import openssl
from failback_replicator.tlsconf import TlsFiles


@dataclass(frozen=True)
class CertificateAuthority:
    cert: Path
    key: Path

    @classmethod
    def create(cls, directory: Path, name: str = "pairing-ca") -> CertificateAuthority:
        directory.mkdir(parents=True, exist_ok=True)
        key, cert = directory / f"{name}.key", directory / f"{name}.pem"
        openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key)])
        key.chmod(0o600)
        openssl([
            "req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", "2",
            "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ])  # fmt: skip
        return cls(cert=cert, key=key)

    def issue(self, directory: Path, common_name: str, purpose: str) -> TlsFiles:
        """A leaf certificate for `common_name`; purpose 'server' (agent) or 'client' (replicator)."""
        directory.mkdir(parents=True, exist_ok=True)
        stem = directory / common_name
        key, csr, cert = Path(f"{stem}.key"), Path(f"{stem}.csr"), Path(f"{stem}.pem")
        openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key)])
        key.chmod(0o600)
        openssl(["req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={common_name}"])
        ext = directory / f"{common_name}.ext"
        self._sign(csr, cert, ext, purpose)
        return TlsFiles(ca=self.cert, cert=cert, key=key)

    def _sign(self, csr: Path, cert: Path, ext: Path, purpose: str) -> None:
        """Signs `csr` into `cert`: a leaf certificate for TLS server or client authentication."""
        usage = "serverAuth" if purpose == "server" else "clientAuth"
        ext.write_text(f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n")
        openssl([
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
        ])  # fmt: skip

    def sign_csr(self, csr_pem: str, directory: Path, purpose: str = "client") -> str:
        """Signs a CSR as IssueAgentCertificateForDrs would; returns the certificate PEM."""
        directory.mkdir(parents=True, exist_ok=True)
        csr, cert, ext = directory / "request.csr", directory / "issued.pem", directory / "issued.ext"
        csr.write_text(csr_pem)
        self._sign(csr, cert, ext, purpose)
        return cert.read_text()
