"""`drs-controlplane serve --credentials FILE`: the keys the plane accepts and what IAM attaches to each.

credentials:
  - access_key: ASIAEXAMPLEINSTALL01
    secret_key: ...                # or secret_key_file: path (relative to this file)
    session_token: ...             # optional (STS credentials have one)
    policy: installation           # installation | failback | operator | admin
    lifetime: 3600                 # optional: seconds from `serve` start, then ExpiredTokenException
    principal: arn:aws:sts::123456789012:assumed-role/FailbackInstaller/admin   # optional
    recovery_instance: i-...       # optional: only calls about this recovery instance
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from botocore.model import ServiceModel

from drs_controlplane.policies import POLICY_NAMES, policy_named
from drs_controlplane.seed import read_yaml
from drs_controlplane.sigv4 import Credential

KEYS = {
    "access_key",
    "secret_key",
    "secret_key_file",
    "session_token",
    "policy",
    "lifetime",
    "principal",
    "recovery_instance",
}
DEFAULT_PRINCIPAL = "arn:aws:iam::123456789012:user/{name}"


class CredentialsFileError(ValueError):
    """The credentials file is unusable; the message names the file, the entry and the fix."""


def _entry(raw: Any, where: str, base: Path, model: ServiceModel, now: datetime) -> Credential:
    if not isinstance(raw, dict):
        raise CredentialsFileError(f"{where}: expected a mapping with access_key, secret_key and policy")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise CredentialsFileError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(KEYS))})")
    access = raw.get("access_key")
    if not isinstance(access, str) or not access.isalnum() or not 16 <= len(access) <= 128:
        raise CredentialsFileError(f"{where}: access_key must be 16-128 letters and digits")
    secret = raw.get("secret_key")
    if raw.get("secret_key_file"):
        path = base / str(raw["secret_key_file"])
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CredentialsFileError(f"{where}: cannot read secret_key_file {path}: {exc.strerror}") from None
    if not isinstance(secret, str) or not secret:
        raise CredentialsFileError(f"{where} ({access}): secret_key (or secret_key_file) is missing")
    policy = raw.get("policy")
    if policy not in POLICY_NAMES:
        raise CredentialsFileError(
            f"{where} ({access}): policy must be one of {', '.join(POLICY_NAMES)}, not {policy!r}"
        )
    lifetime = raw.get("lifetime")
    if lifetime is not None and (isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0):
        raise CredentialsFileError(f"{where} ({access}): lifetime must be a number of seconds above 0")
    token = raw.get("session_token")
    if token is not None and (not isinstance(token, str) or not token):
        raise CredentialsFileError(f"{where} ({access}): session_token must be a non-empty string")
    return Credential(
        access_key=access,
        secret_key=secret,
        session_token=token,
        expires_at=now + timedelta(seconds=lifetime) if lifetime else None,
        policy=policy_named(policy, model),
        principal=str(raw.get("principal") or DEFAULT_PRINCIPAL.format(name=f"{policy}-{access[-4:]}")),
        scope_instance=raw.get("recovery_instance"),
    )


def load_credentials(path: Path, model: ServiceModel, now: datetime) -> list[Credential]:
    data = read_yaml(path, "the credentials file", CredentialsFileError)
    entries = data.get("credentials") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise CredentialsFileError(f"{path}: expected a top-level 'credentials:' list with at least one entry")
    out = [_entry(raw, f"{path}: credentials[{i}]", path.parent, model, now) for i, raw in enumerate(entries)]
    seen: set[str] = set()
    for credential in out:
        if credential.access_key in seen:
            raise CredentialsFileError(f"{path}: access key {credential.access_key} is listed twice")
        seen.add(credential.access_key)
    return out
