"""GetFailbackClientCredentialsForDrs: the session credentials DRS issues the installed failback client.

The request is not SigV4-signed (the installation credentials may be long expired): the client proves who
it is with a signature by the private key whose certificate IssueAgentCertificateForDrs issued to it (the
certificate is kept with the recovery instance). What it gets: an ASIA key, secret and session token under
AWSElasticDisasterRecoveryFailbackPolicy, scoped to that recovery instance, living `ttl`.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import string
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from drs_controlplane import errors
from drs_controlplane.documents import iso
from drs_controlplane.policies import managed
from drs_controlplane.sigv4 import MAX_SKEW, Credential
from drs_controlplane.store import Store

OPERATION = "GetFailbackClientCredentialsForDrs"
PROOF_PREFIX = "DRS-FAILBACK-CLIENT-CREDENTIALS-V1"
ROLE_NAME = "AWSElasticDisasterRecoveryFailbackRole"
DEFAULT_TTL = timedelta(hours=1)
_KEY_ALPHABET = string.ascii_uppercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits + "/+"


def proof_text(client_id: str, instance_id: str, signed_at: str, nonce: str) -> bytes:
    """What the client signs (the client builds the same bytes: failback_client.drs_credentials)."""
    return f"{PROOF_PREFIX}\n{client_id}\n{instance_id}\n{signed_at}\n{nonce}".encode()


def _denied(message: str) -> errors.ApiError:
    return errors.access_denied(message)


class ClientCredentialIssuer:
    """Checks the proof and mints credentials into `register` (the plane's credential table)."""

    def __init__(
        self,
        store: Store,
        region: str,
        clock: Callable[[], datetime],
        ttl: timedelta,
        register: Callable[[Credential], None],
    ) -> None:
        self.store, self.region, self.clock, self.ttl, self.register = store, region, clock, ttl, register
        self.policy = managed("failback")
        self._nonces: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def _fresh_nonce(self, nonce: str, now: datetime) -> bool:
        with self._lock:
            for old, seen in list(self._nonces.items()):
                if now - seen > 2 * MAX_SKEW:
                    del self._nonces[old]
            if nonce in self._nonces:
                return False
            self._nonces[nonce] = now
            return True

    def handle(self, p: dict[str, Any]) -> dict[str, Any]:
        now = self.clock()
        client_id, instance_id = p["failbackClientID"], p["recoveryInstanceID"]
        record = self.store.recovery_instance(instance_id)
        if record is None:
            raise errors.not_found("RECOVERY_INSTANCE", instance_id, "Recovery instance")
        if record.internal.get("failbackClientID") != client_id:
            raise _denied(
                f"Failback client {client_id} is not associated with recovery instance {instance_id}: "
                "no credentials are issued to it"
            )
        cert_pem = record.internal.get("clientCertificate")
        if not cert_pem:
            raise _denied(
                f"No certificate was issued to failback client {client_id} (IssueAgentCertificateForDrs comes first)"
            )
        try:
            signed_at = datetime.fromisoformat(p["signedAt"].replace("Z", "+00:00"))
        except ValueError:
            raise errors.validation(
                f"signedAt is not a date: {p['signedAt']!r}", [("signedAt", "not ISO 8601")]
            ) from None
        if abs(now - signed_at) > MAX_SKEW:
            raise ApiErrorSkew(p["signedAt"], now)
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        if now >= cert.not_valid_after_utc:
            raise _denied(
                f"The certificate issued to {client_id} expired at {iso(cert.not_valid_after_utc)}: "
                "pair again (start the failback client again)"
            )
        try:
            signature = base64.b64decode(p["signature"], validate=True)
        except (binascii.Error, ValueError):
            raise errors.validation("signature is not base64", [("signature", "not base64")]) from None
        data = proof_text(client_id, instance_id, p["signedAt"], p["nonce"])
        key = cert.public_key()
        try:
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            elif isinstance(key, rsa.RSAPublicKey):
                key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
            else:
                raise InvalidSignature
        except InvalidSignature:
            raise _denied(
                f"The signature does not verify against the certificate issued to failback client {client_id}"
            ) from None
        if not self._fresh_nonce(p["nonce"], now):
            raise _denied("This request was already used (nonce seen before): sign a new one")
        account = self.store.get("account") or "123456789012"
        credential = Credential(
            access_key="ASIA" + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(16)),
            secret_key="".join(secrets.choice(_SECRET_ALPHABET) for _ in range(40)),
            session_token=base64.b64encode(secrets.token_bytes(96)).decode(),
            expires_at=now + self.ttl,
            policy=self.policy,
            scope_instance=instance_id,
            issued_to=client_id,
            principal=f"arn:aws:sts::{account}:assumed-role/{ROLE_NAME}/{client_id}",
        )
        self.register(credential)
        assert credential.session_token is not None and credential.expires_at is not None
        return {
            "accessKeyId": credential.access_key,
            "secretAccessKey": credential.secret_key,
            "sessionToken": credential.session_token,
            "expiration": iso(credential.expires_at),
        }


def ApiErrorSkew(signed_at: str, now: datetime) -> errors.ApiError:
    return errors.ApiError(
        403,
        "InvalidSignatureException",
        f"Signature expired: signedAt {signed_at} is more than 5 minutes from {iso(now)}: set this "
        "machine's clock to UTC",
    )
