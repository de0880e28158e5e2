"""Mutual TLS for the replication link: TLS 1.2+ only, both sides present a certificate from the
pinned pairing CA, and each side checks that the other is the peer it was paired with (by the
certificate's common name: the agent's CN / the failback client ID)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import cast


class PairingError(Exception):
    """The peer's certificate is valid TLS-wise but is not the paired peer (or has no identity)."""


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the pairing CA (pinned: the only trust anchor)
    cert: Path  # our certificate (PEM)
    key: Path  # our private key (PEM); never logged

    def check(self) -> None:
        for label, path in (("CA certificate", self.ca), ("certificate", self.cert), ("private key", self.key)):
            if not Path(path).is_file():
                raise FileNotFoundError(f"TLS {label} not found: {path} (pairing writes it; re-run pairing)")


def _base(purpose: ssl.Purpose, files: TlsFiles) -> ssl.SSLContext:
    files.check()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if purpose is ssl.Purpose.SERVER_AUTH else ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Only the pairing CA: the system store must not let any public certificate in.
    ctx.load_verify_locations(cafile=str(files.ca))
    ctx.load_cert_chain(certfile=str(files.cert), keyfile=str(files.key))
    return ctx


def client_context(files: TlsFiles) -> ssl.SSLContext:
    ctx = _base(ssl.Purpose.SERVER_AUTH, files)
    # The agent is reached by IP; its identity is checked by CN after the handshake instead.
    ctx.check_hostname = False
    return ctx


def server_context(files: TlsFiles) -> ssl.SSLContext:
    return _base(ssl.Purpose.CLIENT_AUTH, files)


def peer_identity(sock: ssl.SSLSocket) -> str:
    cert = sock.getpeercert()
    if not cert:
        raise PairingError("peer presented no certificate")
    # typeshed types every field of the dict as the union of all fields'
    subject = cast("tuple[tuple[tuple[str, str], ...], ...]", cert.get("subject", ()))
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    raise PairingError("peer certificate has no common name")


def require_identity(sock: ssl.SSLSocket, allowed: set[str] | frozenset[str], role: str) -> str:
    ident = peer_identity(sock)
    if ident not in allowed:
        raise PairingError(f"{role} certificate is for {ident!r}, not the paired {role} ({', '.join(sorted(allowed))})")
    return ident
