"""Who may call what, as IAM decides it for DRS: each credential carries a policy; a call is allowed when a
statement of it names the action and a resource pattern that matches every resource the request touches.

The two managed policies the failback client meets are data (data/managed-policies.json, with where they
were published). Two more are ours: `operator` (a console user: the public DRS operations, plus the
installation policy so one demo key also installs the client) and `admin` (drs:*, the test fixtures' key).
"""

from __future__ import annotations

import fnmatch
import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from botocore.model import ServiceModel

POLICY_NAMES = ("installation", "failback", "operator", "admin")


@dataclass(frozen=True)
class Statement:
    actions: frozenset[str]  # operation names without "drs:"; "*" = every action
    resource: str  # an ARN pattern ("*" wildcards, as IAM matches them)

    def allows(self, action: str, resource: str) -> bool:
        return ("*" in self.actions or action in self.actions) and fnmatch.fnmatchcase(resource, self.resource)


@dataclass(frozen=True)
class Policy:
    name: str  # what AccessDenied messages and the request record show
    statements: tuple[Statement, ...]
    source: str = ""

    def allows(self, action: str, resource: str) -> bool:
        return any(s.allows(action, resource) for s in self.statements)

    @property
    def actions(self) -> frozenset[str]:
        return frozenset().union(*(s.actions for s in self.statements))


@functools.cache
def _managed_data() -> dict[str, Any]:
    text = resources.files("drs_controlplane").joinpath("data", "managed-policies.json").read_text(encoding="utf-8")
    return json.loads(text)["policies"]


def managed(kind: str) -> Policy:
    """`installation` or `failback`: the AWS managed policy, from the data file."""
    data = _managed_data()[kind]
    return Policy(
        name=data["name"],
        source=data["source"],
        statements=tuple(Statement(frozenset(s["actions"]), s["resource"]) for s in data["statements"]),
    )


def public_operations(model: ServiceModel) -> frozenset[str]:
    """Operations of botocore's public drs model (ours end in ForDrs)."""
    return frozenset(name for name in model.operation_names if not name.endswith("ForDrs"))


def policy_named(kind: str, model: ServiceModel) -> Policy:
    if kind in ("installation", "failback"):
        return managed(kind)
    if kind == "operator":
        installation = managed("installation")
        return Policy(
            name="operator (console actions + installation)",
            statements=(Statement(public_operations(model), "*"), *installation.statements),
        )
    if kind == "admin":
        return Policy(name="admin (drs:*)", statements=(Statement(frozenset({"*"}), "*"),))
    raise ValueError(f"unknown policy {kind!r}: one of {', '.join(POLICY_NAMES)}")


def instance_arn(region: str, account: str, instance_id: str) -> str:
    return f"arn:aws:drs:{region}:{account}:recovery-instance/{instance_id}"


def request_resources(params: dict[str, Any], region: str, account: str) -> list[str]:
    """The resources a request acts on, as ARNs; ["*"] for calls not about one resource (DescribeX)."""
    ids: Iterable[str] = []
    if isinstance(params.get("recoveryInstanceID"), str):
        ids = [params["recoveryInstanceID"]]
    elif isinstance(params.get("recoveryInstanceIDs"), list):
        ids = [i for i in params["recoveryInstanceIDs"] if isinstance(i, str)]
    arns = [instance_arn(region, account, i) for i in ids]
    if isinstance(params.get("resourceArn"), str):
        arns.append(params["resourceArn"])
    return arns or ["*"]
