"""SigV4 verification: recompute the signature with botocore's own signer and compare.

Errors mirror AWS's: unknown key or wrong/missing session token → UnrecognizedClientException, expired
token → ExpiredTokenException, wrong secret → InvalidSignatureException, clock skew over 5 minutes →
InvalidSignatureException "Signature expired" (what a hardware clock in local time produces).
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from drs_controlplane.errors import EXPIRED_TOKEN, INVALID_TOKEN, SIGNATURE_MISMATCH, ApiError
from drs_controlplane.policies import Policy

SERVICE = "drs"
ALGORITHM = "AWS4-HMAC-SHA256"
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
MAX_SKEW = timedelta(minutes=5)
_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+),\s*SignedHeaders=(?P<signed>[^,\s]+),"
    r"\s*Signature=(?P<signature>[0-9a-f]{64})\s*$"
)


@dataclass(frozen=True)
class Credential:
    """A key pair the control plane accepts, with what IAM would attach to it.

    `policy=None` allows every action (drs:*). `scope_instance` limits every call about a recovery instance
    to that one (DRS-issued failback client credentials: the service role's session is scoped to it).
    """

    access_key: str
    secret_key: str
    session_token: str | None = None
    expires_at: datetime | None = None
    policy: Policy | None = None
    principal: str = "arn:aws:iam::123456789012:user/failback-installer"
    scope_instance: str | None = None
    issued_to: str | None = None  # the failback client ID DRS issued this credential to

    def __repr__(self) -> str:  # never show the secret or the token
        return f"Credential(access_key={self.access_key!r}, principal={self.principal!r})"


def _incomplete(message: str) -> ApiError:
    return ApiError(400, "IncompleteSignatureException", message)


def _invalid_signature(message: str) -> ApiError:
    return ApiError(403, "InvalidSignatureException", message)


def verify(
    *,
    method: str,
    host_url: str,
    path_and_query: str,
    headers: dict[str, str],
    body: bytes,
    region: str,
    credentials: dict[str, Credential],
    now: datetime,
) -> Credential:
    """Return the credential that signed the request, or raise the ApiError AWS would send.

    `headers` maps lower-case names to values as received; `host_url` is scheme://host[:port].
    """
    authorization = headers.get("authorization")
    if not authorization:
        raise ApiError(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
    match = _AUTH_RE.match(authorization)
    if not match:
        raise _incomplete(
            "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' parameters (AWS4-HMAC-SHA256)."
        )
    scope = match["credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise _incomplete(f"Credential scope is malformed: expected 5 slash-separated parts, got {len(scope)}.")
    access_key, scope_date, scope_region, scope_service, _ = scope

    credential = credentials.get(access_key)
    if credential is None:
        raise ApiError(403, "UnrecognizedClientException", INVALID_TOKEN)
    token = headers.get("x-amz-security-token")
    if (credential.session_token or None) != (token or None):
        raise ApiError(403, "UnrecognizedClientException", INVALID_TOKEN)
    if credential.expires_at is not None and now >= credential.expires_at:
        raise ApiError(403, "ExpiredTokenException", EXPIRED_TOKEN)

    amz_date = headers.get("x-amz-date")
    if not amz_date:
        raise _incomplete("Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.")
    try:
        signed_at = datetime.strptime(amz_date, AMZ_DATE_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise _incomplete(f"Date must be in ISO-8601 'basic format'. Got '{amz_date}'.") from None
    now_text = now.strftime(AMZ_DATE_FORMAT)
    if signed_at < now - MAX_SKEW:
        raise _invalid_signature(
            f"Signature expired: {amz_date} is now earlier than {(now - MAX_SKEW).strftime(AMZ_DATE_FORMAT)} "
            f"({now_text} - 5 min.)"
        )
    if signed_at > now + MAX_SKEW:
        raise _invalid_signature(
            f"Signature not yet current: {amz_date} is still later than "
            f"{(now + MAX_SKEW).strftime(AMZ_DATE_FORMAT)} ({now_text} + 5 min.)"
        )
    if scope_date != amz_date[:8]:
        raise _invalid_signature(
            f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
            f"from HTTP: '{scope_date}' != '{amz_date[:8]}', from '{amz_date}'."
        )
    if scope_service != SERVICE:
        raise _invalid_signature(f"Credential should be scoped to correct service: '{SERVICE}'. ")
    if scope_region != region:
        raise _invalid_signature(f"Credential should be scoped to a valid region, not '{scope_region}'. ")

    signed_names = match["signed"].split(";")
    if "host" not in signed_names:
        raise _incomplete("'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.")
    missing = [name for name in signed_names if name not in headers]
    if missing:
        raise _invalid_signature(SIGNATURE_MISMATCH)
    # Recompute over exactly the headers the client signed, with botocore's canonicalization.
    request = AWSRequest(
        method=method, url=host_url + path_and_query, headers={name: headers[name] for name in signed_names}, data=body
    )
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(access_key, credential.secret_key, token), scope_service, scope_region)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if not hmac.compare_digest(expected, match["signature"]):
        raise _invalid_signature(SIGNATURE_MISMATCH)
    return credential
