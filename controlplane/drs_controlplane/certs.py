"""The control plane's certificate authority for mutual TLS between the replication software on the
failback client and the agent on the recovery instance (TCP 1500).

Both sides send CSRs, so private keys never leave the machine that made them; the CA's own key
lives in the control plane's state database (a local test service, not a real PKI).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from drs_controlplane.store import Store

CERT_LIFETIME = timedelta(days=7)
MIN_RSA_BITS = 2048


class CsrError(ValueError):
    """The CSR is unusable; the message says why."""


@dataclass(frozen=True)
class IssuedCertificate:
    certificate_pem: str
    ca_certificate_pem: str
    not_after: datetime


def agent_common_name(recovery_instance_id: str) -> str:
    return f"agent.{recovery_instance_id}.drs.local"


def _ca(store: Store, now: datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_pem, cert_pem = store.get("ca_key"), store.get("ca_cert")
    if key_pem and cert_pem:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key, x509.load_pem_x509_certificate(cert_pem.encode())
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "DRS control plane failback CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    store.put(
        "ca_key",
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
    )
    store.put("ca_cert", cert.public_bytes(serialization.Encoding.PEM).decode())
    return key, cert


def ca_certificate_pem(store: Store, now: datetime) -> str:
    with store.transaction():
        return _ca(store, now)[1].public_bytes(serialization.Encoding.PEM).decode()


def sign_csr(
    store: Store, csr_pem: str, *, expected_cn: str, now: datetime, server: bool, ip_addresses: tuple[str, ...] = ()
) -> IssuedCertificate:
    """Check the CSR (parses, self-signature valid, CN as expected, strong key) and sign it.

    `server=True` issues a TLS server certificate (the agent side, with IP SANs); otherwise a client one.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise CsrError(f"certificateSigningRequest is not a PEM certificate request: {exc}") from None
    if not csr.is_signature_valid:
        raise CsrError("certificateSigningRequest's signature is not valid")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = names[0].value if names else None
    if cn != expected_cn:
        raise CsrError(f"certificateSigningRequest's subject CN must be {expected_cn!r}, not {cn!r}")
    public_key = csr.public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise CsrError(
                f"certificateSigningRequest's RSA key has {public_key.key_size} bits, at least {MIN_RSA_BITS} needed"
            )
    elif not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise CsrError("certificateSigningRequest's key must be RSA (2048 bits or more) or EC")
    with store.transaction():
        ca_key, ca_cert = _ca(store, now)
    not_after = now + CERT_LIFETIME
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, expected_cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if server:
        sans: list[x509.GeneralName] = [x509.DNSName(expected_cn)]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return IssuedCertificate(
        cert.public_bytes(serialization.Encoding.PEM).decode(),
        ca_cert.public_bytes(serialization.Encoding.PEM).decode(),
        not_after,
    )
