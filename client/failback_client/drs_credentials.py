"""After pairing, the failback client works on credentials DRS issues it, not on the admin's.

The admin's credentials carry AWSElasticDisasterRecoveryFailbackInstallationPolicy: enough to install
(associate, map, get the replication software's certificate), not to run. Once the certificate is installed,
GetFailbackClientCredentialsForDrs gives this client session credentials under the service-role policy
AWSElasticDisasterRecoveryFailbackPolicy, scoped to its recovery instance. That call is not SigV4-signed: the
client proves who it is by signing a fresh statement with the private key whose certificate DRS issued (the
key never leaves this machine), so it can get new credentials however long it was cut off, without the admin.

botocore's RefreshableCredentials decides when to refresh (well before expiry); a refresh that fails keeps
the current credentials while they are valid, is retried with exponential backoff (no network attempt before
the next try is due), and is shown on the console. Replication itself never waits for it: the replication
software needs no AWS credentials, and the supervisor's DRS calls already tolerate failures.
"""

from __future__ import annotations

import base64
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import botocore.exceptions
from botocore.credentials import CredentialProvider, RefreshableCredentials

from failback_client.logs import REDACTOR
from failback_client.pairing import PairingError, openssl

log = logging.getLogger(__name__)

OPERATION = "GetFailbackClientCredentialsForDrs"
PROOF_PREFIX = "DRS-FAILBACK-CLIENT-CREDENTIALS-V1"
METHOD = "drs-failback-client"
BACKOFF_FIRST_S = 2.0
BACKOFF_MAX_S = 60.0
SHOW_FAILURES = (1, 2, 5, 10)  # console lines for these failed attempts, then every 20th


class Notices(Protocol):
    def ok(self, text: str) -> None: ...
    def warn(self, text: str) -> None: ...


def proof_text(client_id: str, instance_id: str, signed_at: str, nonce: str) -> bytes:
    """The statement the client signs (the control plane checks the same bytes)."""
    return f"{PROOF_PREFIX}\n{client_id}\n{instance_id}\n{signed_at}\n{nonce}".encode()


def sign(key: Path, data: bytes) -> str:
    """Base64 DER signature (SHA-256) by the replication software's private key, with openssl like pairing."""
    return base64.b64encode(openssl(["dgst", "-sha256", "-sign", str(key)], stdin=data)).decode()


def _describe(error: Exception) -> str:
    if isinstance(error, botocore.exceptions.ClientError):
        e = error.response.get("Error", {})
        return f"{e.get('Code')}: {e.get('Message')}"
    return str(error)


class _Provider(CredentialProvider):
    METHOD = METHOD
    CANONICAL_NAME = "DrsFailbackClient"

    def __init__(self, credentials: RefreshableCredentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> RefreshableCredentials:
        return self._credentials


class DrsIssuedCredentials:
    """The credentials DRS issues this failback client, refreshed by botocore through `_refresh`."""

    def __init__(
        self,
        *,
        region: str,
        endpoint_url: str | None,
        client_id: str,
        recovery_instance_id: str,
        key: Path,
        notices: Notices,
        clock: Callable[[], float] = time.monotonic,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        from failback_client.drs_model import make_drs_client

        self.region, self.endpoint_url = region, endpoint_url
        self.client_id, self.recovery_instance_id, self.key = client_id, recovery_instance_id, key
        self.notices, self.clock = notices, clock
        self.client_options = dict(client_options or {})
        self._unsigned = make_drs_client(
            region=region, endpoint_url=endpoint_url, unsigned=True, **{"max_attempts": 3, **self.client_options}
        )
        self.issued = 0  # successful GetFailbackClientCredentialsForDrs calls (the first + refreshes)
        self.failures = 0  # consecutive failed refreshes
        self._next_try = 0.0
        self._last_error = ""
        self._current: dict[str, Any] | None = None
        self._lock = threading.Lock()

    @property
    def refreshes(self) -> int:
        return max(0, self.issued - 1)

    def fetch(self) -> dict[str, Any]:
        """One signed request for new credentials → botocore's credential metadata."""
        signed_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        nonce = secrets.token_urlsafe(24)
        signature = sign(self.key, proof_text(self.client_id, self.recovery_instance_id, signed_at, nonce))
        out = self._unsigned.get_failback_client_credentials_for_drs(
            failbackClientID=self.client_id,
            recoveryInstanceID=self.recovery_instance_id,
            signedAt=signed_at,
            nonce=nonce,
            signature=signature,
        )
        self.issued += 1
        REDACTOR.add(out["secretAccessKey"], out["sessionToken"])  # never in the log, the console or DRS's copy
        log.info("DRS issued credentials %s, valid until %s", out["accessKeyId"], out["expiration"])
        return {
            "access_key": out["accessKeyId"],
            "secret_key": out["secretAccessKey"],
            "token": out["sessionToken"],
            "expiry_time": out["expiration"],
        }

    def _still_valid(self) -> bool:
        if self._current is None:
            return False
        expiry = datetime.fromisoformat(self._current["expiry_time"].replace("Z", "+00:00"))
        return (expiry - datetime.now(UTC)).total_seconds() > 1

    def _refresh(self) -> dict[str, Any]:
        """botocore's refresh callback: new credentials, or the current ones while they last, with backoff."""
        with self._lock:
            now = self.clock()
            if now < self._next_try:
                return self._keep_or_fail(f"next try in {self._next_try - now:.0f} s; last error: {self._last_error}")
            try:
                metadata = self.fetch()
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, PairingError) as e:
                self.failures += 1
                delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self.failures - 1)) * random.uniform(0.8, 1.2)
                self._next_try = now + delay
                self._last_error = _describe(e)
                log.warning(
                    "refreshing the DRS-issued credentials failed (attempt %d, next in %.0f s): %s",
                    self.failures,
                    delay,
                    self._last_error,
                )
                if self.failures in SHOW_FAILURES or self.failures % 20 == 0:
                    self.notices.warn(
                        f"Could not refresh this client's DRS credentials (attempt {self.failures}; "
                        f"replication goes on, retrying in {delay:.0f} s): {self._last_error}"
                    )
                return self._keep_or_fail(self._last_error)
            if self.failures:
                self.notices.ok(f"DRS credentials refreshed after {self.failures} failed attempt(s)")
            self.failures, self._next_try, self._current = 0, 0.0, metadata
            return metadata

    def _keep_or_fail(self, why: str) -> dict[str, Any]:
        if self._current is not None and self._still_valid():
            return self._current
        raise botocore.exceptions.CredentialRetrievalError(provider=METHOD, error_msg=why)

    def credentials(self) -> RefreshableCredentials:
        """The first credentials (errors raised as botocore's), wrapped to refresh themselves."""
        self._current = self.fetch()
        expiry = datetime.fromisoformat(self._current["expiry_time"].replace("Z", "+00:00"))
        lifetime = max(1.0, (expiry - datetime.now(UTC)).total_seconds())
        # botocore refreshes 15 min (advisory) / 10 min (mandatory) before expiry: too late for credentials
        # that live less; these refresh at half their life, and must at 1/6 left.
        return RefreshableCredentials.create_from_metadata(
            self._current,
            refresh_using=self._refresh,
            method=METHOD,
            advisory_timeout=min(15 * 60, lifetime / 2),
            mandatory_timeout=min(10 * 60, lifetime / 6),
        )

    def client(self) -> Any:
        """A boto3 drs client on these credentials (and nothing else)."""
        from failback_client.drs_model import make_drs_client

        return make_drs_client(
            region=self.region,
            endpoint_url=self.endpoint_url,
            credential_provider=_Provider(self.credentials()),
            **self.client_options,
        )


def switch_to_drs_credentials(
    api: Any, notices: Notices, client_id: str, recovery_instance_id: str, key: Path
) -> DrsIssuedCredentials:
    """Point the workflow's DRS client (api.client, which ReplicationApi uses too) at DRS-issued credentials."""
    from failback_client.api import explain

    settings = api.settings
    issued = DrsIssuedCredentials(
        region=settings.region or "",
        endpoint_url=settings.endpoint_url,
        client_id=client_id,
        recovery_instance_id=recovery_instance_id,
        key=key,
        notices=notices,
    )
    try:
        api.client = issued.client()
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        raise explain(e, settings, f"getting this failback client's own credentials ({OPERATION})") from None
    api.installed = True
    notices.ok(
        "Working on credentials Elastic Disaster Recovery issued this failback client (refreshed before "
        "they expire): the credentials entered for installation are no longer used"
    )
    return issued
