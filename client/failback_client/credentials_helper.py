"""`failback-client credentials`: temporary installation credentials for the failback client, made on the
admin's workstation with their usual AWS profile (the guide's "Generating temporary failback credentials").

1. An IAM role (default FailbackClientInstallation) that carries only the AWS managed policy
   AWSElasticDisasterRecoveryFailbackInstallationPolicy and that principals of this account may assume:
   created if missing; if it exists with other policies or a shorter maximum session, nothing changes unless
   --update is given.
2. STS AssumeRole for --duration seconds (the installation only: the running client gets its own
   credentials from DRS).
3. The values as the launcher's variables (secrets shown as **** unless --show), or onto a seed volume
   (`inv seed`'s writer, mode 0600) or a seed file (mode 0600).

Every check runs before anything changes; a bad case is one line naming what to do, and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INSTALLATION_POLICY_ARN = "arn:aws:iam::aws:policy/AWSElasticDisasterRecoveryFailbackInstallationPolicy"
DEFAULT_ROLE = "FailbackClientInstallation"
DEFAULT_DURATION = 3600
MIN_DURATION, MAX_DURATION = 900, 43200  # STS AssumeRole's range; a role allows at most 12 h
MASK = "****"
NEW_ROLE_TRIES, NEW_ROLE_WAIT_S = 8, 2.0


class HelperError(Exception):
    """One line for the admin: what is wrong and how to fix it."""


@dataclass
class Issued:
    access_key: str
    secret_key: str
    session_token: str
    expiration: str
    role_arn: str
    region: str

    def launcher_variables(self, show: bool) -> list[str]:
        def secret(value: str) -> str:
            return value if show else MASK

        return [
            f"AWS_REGION={self.region}",
            f"AWS_ACCESS_KEY={self.access_key}",
            f"AWS_SECRET_KEY={secret(self.secret_key)}",
            f"AWS_SESSION_TOKEN={secret(self.session_token)}",
        ]


def trust_policy(account: str, caller: str) -> dict[str, Any]:
    """Principals of the account (its root principal: whoever IAM policies allow sts:AssumeRole) and, when the
    admin is an IAM user, that user by name (allowed without an identity policy for it)."""
    principals = [f"arn:aws:iam::{account}:root"]
    if ":user/" in caller:
        principals.append(caller)
    return {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": principals}, "Action": "sts:AssumeRole"}],
    }


def _code(error: Exception) -> str:
    return getattr(error, "response", {}).get("Error", {}).get("Code", "")


def _denied(error: Exception, action: str, who: str) -> HelperError | None:
    if _code(error) in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation"):
        return HelperError(
            f"{who} may not call {action} (AccessDenied): ask an administrator for {action}, or use "
            "a profile that has it"
        )
    return None


def _call(what: str, who: str, fn: Any, **kwargs: Any) -> Any:
    import botocore.exceptions

    try:
        return fn(**kwargs)
    except botocore.exceptions.ClientError as e:
        raise _denied(e, what, who) or HelperError(
            f"{what} failed: {_code(e)}: {e.response.get('Error', {}).get('Message', '')}"
        ) from None
    except botocore.exceptions.BotoCoreError as e:
        raise HelperError(f"{what} failed: {e}") from None


def ensure_role(iam: Any, account: str, who: str, role_name: str, duration: int, update: bool) -> tuple[str, str]:
    """The role's ARN and what was done ("created", "unchanged", "updated: ..."). Checks before changing."""
    import botocore.exceptions

    try:
        role = iam.get_role(RoleName=role_name)["Role"]
    except botocore.exceptions.ClientError as e:
        if _code(e) != "NoSuchEntity":
            raise _denied(e, "iam:GetRole", who) or HelperError(f"iam:GetRole failed: {_code(e)}") from None
        role = None
    if role is None:
        max_session = max(DEFAULT_DURATION, duration)
        created = _call(
            "iam:CreateRole",
            who,
            iam.create_role,
            RoleName=role_name,
            AssumeRolePolicyDocument=json.dumps(trust_policy(account, who)),
            MaxSessionDuration=max_session,
            Description="Temporary credentials for installing the DRS failback client",
        )["Role"]
        try:
            _call(
                "iam:AttachRolePolicy",
                who,
                iam.attach_role_policy,
                RoleName=role_name,
                PolicyArn=INSTALLATION_POLICY_ARN,
            )
        except HelperError:
            iam.delete_role(RoleName=role_name)  # change nothing: no role without its policy
            raise
        return created["Arn"], "created"
    attached = [
        p["PolicyArn"]
        for p in _call("iam:ListAttachedRolePolicies", who, iam.list_attached_role_policies, RoleName=role_name)[
            "AttachedPolicies"
        ]
    ]
    inline = _call("iam:ListRolePolicies", who, iam.list_role_policies, RoleName=role_name)["PolicyNames"]
    others = [a.rsplit("/", 1)[-1] for a in attached if a != INSTALLATION_POLICY_ARN] + [
        f"{n} (inline)" for n in inline
    ]
    missing = INSTALLATION_POLICY_ARN not in attached
    short = int(role.get("MaxSessionDuration", 3600)) < duration
    if not (others or missing or short):
        return role["Arn"], "unchanged"
    problems = []
    if others:
        problems.append(f"has other policies: {', '.join(others)}")
    if missing:
        problems.append("lacks AWSElasticDisasterRecoveryFailbackInstallationPolicy")
    if short:
        problems.append(
            f"allows sessions of at most {role.get('MaxSessionDuration', 3600)} s, not --duration {duration}"
        )
    if not update:
        raise HelperError(
            f"role {role_name} exists but {'; '.join(problems)}: --update makes it carry only "
            "the installation policy" + (" and allow the duration" if short else "") + ", or choose another --role-name"
        )
    for arn in attached:
        if arn != INSTALLATION_POLICY_ARN:
            _call("iam:DetachRolePolicy", who, iam.detach_role_policy, RoleName=role_name, PolicyArn=arn)
    for name in inline:
        _call("iam:DeleteRolePolicy", who, iam.delete_role_policy, RoleName=role_name, PolicyName=name)
    if missing:
        _call(
            "iam:AttachRolePolicy", who, iam.attach_role_policy, RoleName=role_name, PolicyArn=INSTALLATION_POLICY_ARN
        )
    if short:
        _call("iam:UpdateRole", who, iam.update_role, RoleName=role_name, MaxSessionDuration=duration)
    return role["Arn"], "updated: " + "; ".join(problems)


def issue(session: Any, *, role_name: str, duration: int, update: bool, region: str) -> tuple[Issued, str]:
    sts, iam = session.client("sts"), session.client("iam")
    me = _call("sts:GetCallerIdentity", "these credentials", sts.get_caller_identity)
    who = me["Arn"]
    role_arn, done = ensure_role(iam, me["Account"], who, role_name, duration, update)
    session_name = f"failback-installation-{me['Arn'].rsplit('/', 1)[-1]}"[:64]
    # A role IAM has just created can be refused for some seconds (IAM is eventually consistent).
    for attempt in range(NEW_ROLE_TRIES if done == "created" else 1):
        try:
            out = _call(
                "sts:AssumeRole",
                who,
                sts.assume_role,
                RoleArn=role_arn,
                DurationSeconds=duration,
                RoleSessionName=session_name,
            )
            break
        except HelperError:
            if attempt + 1 >= (NEW_ROLE_TRIES if done == "created" else 1):
                raise
            time.sleep(NEW_ROLE_WAIT_S)
    c = out["Credentials"]
    expiration = c["Expiration"]
    return Issued(
        c["AccessKeyId"],
        c["SecretAccessKey"],
        c["SessionToken"],
        expiration.isoformat() if hasattr(expiration, "isoformat") else str(expiration),
        role_arn,
        region,
    ), done


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="failback-client credentials",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[0],
        epilog="Uses the usual AWS configuration (--profile or AWS_PROFILE, ~/.aws). The credentials it prints "
        "only install the failback client; they carry AWSElasticDisasterRecoveryFailbackInstallationPolicy "
        "and expire after --duration.",
    )
    p.add_argument("--profile", help="AWS profile to use (default: the usual chain)")
    p.add_argument("--region", help="the DRS Region the failback client will use (default: the profile's)")
    p.add_argument("--role-name", default=DEFAULT_ROLE, help=f"IAM role to create or use (default {DEFAULT_ROLE})")
    p.add_argument(
        "--duration",
        type=int,
        default=DEFAULT_DURATION,
        metavar="SECONDS",
        help=f"how long the credentials live, {MIN_DURATION}-{MAX_DURATION} s (default {DEFAULT_DURATION})",
    )
    p.add_argument(
        "--update",
        action="store_true",
        help="make an existing role carry only the installation policy and allow --duration",
    )
    p.add_argument("--show", action="store_true", help="print the secret key and session token (hidden otherwise)")
    out = p.add_mutually_exclusive_group()
    out.add_argument(
        "--seed-image",
        type=Path,
        metavar="PATH",
        help="write a seed volume (label FBSEED, mode 0600) holding the values, as `inv seed` does",
    )
    out.add_argument(
        "--seed-file",
        type=Path,
        metavar="PATH",
        help="write failback-seed.env (mode 0600), for `inv seed --file` or a seed volume",
    )
    p.add_argument("--seed-format", choices=("fat", "iso"), default="fat", help="--seed-image kind (default fat)")
    return p


def _write_seed_file(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if not MIN_DURATION <= args.duration <= MAX_DURATION:
            raise HelperError(f"--duration {args.duration}: STS AssumeRole takes {MIN_DURATION} to {MAX_DURATION} s")
        if args.seed_image:
            try:  # `inv seed`'s writer, in the project's checkout (the workstation that builds the ISO)
                from image.release.seedimage import build_seed_image
            except ImportError:
                raise HelperError(
                    "--seed-image needs the project's checkout (image/release/seedimage.py): "
                    "run from it, or "
                    "use --seed-file and `inv seed --file`"
                ) from None
        import boto3
        import botocore.exceptions

        try:
            session = boto3.Session(profile_name=args.profile)
        except botocore.exceptions.ProfileNotFound as e:
            raise HelperError(f"{e}: check --profile / AWS_PROFILE") from None
        region = args.region or session.region_name
        if not region:
            raise HelperError("no Region: pass --region (the DRS Region of the recovery instance)")
        session = boto3.Session(profile_name=args.profile, region_name=region)
        if session.get_credentials() is None:
            raise HelperError("no AWS credentials found: configure a profile (aws configure) or pass --profile")
        issued, done = issue(
            session, role_name=args.role_name, duration=args.duration, update=args.update, region=region
        )
    except HelperError as e:
        print(f"failback-client credentials: {e}", file=sys.stderr)
        return 1
    print(f"# role {issued.role_arn} ({done}); credentials expire {issued.expiration}", file=sys.stderr)
    values = issued.launcher_variables(show=True)
    if args.seed_image:
        try:
            result = build_seed_image(args.seed_image, sets=values, kind=args.seed_format)
        except Exception as e:  # SeedImageError, CommandError: the message names the bad part
            print(f"failback-client credentials: writing the seed volume failed: {e}", file=sys.stderr)
            return 1
        print(f"seed volume: {result.describe()}")
    elif args.seed_file:
        _write_seed_file(args.seed_file, values)
        print(f"seed file: {args.seed_file} (mode 0600): " + ", ".join(v.split("=", 1)[0] for v in values))
    else:
        for line in issued.launcher_variables(show=args.show):
            print(line)
    return 0
