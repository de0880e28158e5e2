"""The DRS API as the failback client sees it: botocore's public `drs` model plus our own operations.

The failback client's operations (AssociateFailbackClientToRecoveryInstanceForDrs, ...) are not in
botocore. They are defined in `data/drs-failback-extension-2020-02-26.json` in the same rest-json
`POST /<Operation>` style and merged into the `drs` model by a botocore Loader subclass, so one boto3
client signs, serializes, validates and retries them exactly like the public calls.
"""

from __future__ import annotations

import copy
import functools
import json
from enum import StrEnum
from importlib import resources
from typing import Any

import boto3
import botocore
import botocore.loaders
import botocore.session
from botocore.client import BaseClient
from botocore.config import Config
from botocore.model import ServiceModel

from failback_client import __version__

SERVICE_NAME = "drs"
API_VERSION = "2020-02-26"
EXTENSION_RESOURCE = "drs-failback-extension-2020-02-26.json"
RETRY_MODES = ("standard", "adaptive", "legacy")

# The failback initiation steps, in the order the console shows them (enum values of botocore's model).
FAILBACK_INITIATION_STEPS = (
    "LINK_FAILBACK_CLIENT_WITH_RECOVERY_INSTANCE",
    "COMPLETE_VOLUME_MAPPING",
    "ESTABLISH_RECOVERY_INSTANCE_COMMUNICATION",
    "DOWNLOAD_REPLICATION_SOFTWARE_TO_FAILBACK_CLIENT",
    "CONFIGURE_REPLICATION_SOFTWARE",
    "PAIR_AGENT_WITH_REPLICATION_SOFTWARE",
    "ESTABLISH_AGENT_REPLICATOR_SOFTWARE_COMMUNICATION",
)


class FailbackCommand(StrEnum):
    """GetFailbackCommandForDrs's answer (shape FailbackCommand)."""

    CONTINUE = "CONTINUE"  # keep replicating
    FINAL_SYNC = "FINAL_SYNC"  # Failback pressed: finish the last sync, then NotifyConsistencyAttained(finalSync)
    STOP = "STOP"  # StopFailback, or another failback client took over the recovery instance
    COMPLETE = "COMPLETE"  # failback finished: the client says so, ejects the medium and reboots


class ModelMergeError(RuntimeError):
    """Our extension does not fit botocore's drs model (name clash or unknown shape reference)."""


@functools.cache
def extension_model() -> dict[str, Any]:
    """Our operations and shapes, as shipped in the package (read once)."""
    text = resources.files("failback_client").joinpath("data", EXTENSION_RESOURCE).read_text(encoding="utf-8")
    return json.loads(text)


def extension_operation_names() -> tuple[str, ...]:
    return tuple(extension_model()["operations"])


def merge_models(public: dict[str, Any], extension: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of the public drs model with our operations and shapes added.

    Refuses name clashes (a future botocore might publish one of our names: we'd want to know, not
    silently override it) and references to shapes that exist in neither model.
    """
    if public["metadata"].get("apiVersion") != extension["metadata"]["apiVersion"]:
        raise ModelMergeError(
            f"botocore's drs model has apiVersion {public['metadata'].get('apiVersion')}, "
            f"our extension was written for {extension['metadata']['apiVersion']}"
        )
    merged = copy.deepcopy(public)
    for kind in ("operations", "shapes"):
        clash = sorted(set(merged[kind]) & set(extension[kind]))
        if clash:
            raise ModelMergeError(f"{kind} defined both by botocore's drs model and by ours: {', '.join(clash)}")
        merged[kind].update(copy.deepcopy(extension[kind]))
    missing = sorted(_shape_refs(extension) - set(merged["shapes"]))
    if missing:
        raise ModelMergeError(f"our drs extension refers to shapes that do not exist: {', '.join(missing)}")
    return merged


def _shape_refs(node: Any) -> set[str]:
    refs: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("shape"), str):
            refs.add(node["shape"])
        for value in node.values():
            refs |= _shape_refs(value)
    elif isinstance(node, list):
        for value in node:
            refs |= _shape_refs(value)
    return refs


class _UniqueList(list):
    def append(self, item: Any) -> None:
        if item not in self:
            super().append(item)


class DrsExtendedLoader(botocore.loaders.Loader):
    """botocore data loader that serves the merged drs model in place of botocore's own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._merged: dict[str | None, dict[str, Any]] = {}
        # Shared by many sessions, and every boto3 Session appends its data path: keep each path once.
        self._search_paths = _UniqueList(self._search_paths)  # type: ignore[has-type]  # set by botocore's untyped Loader.__init__

    def load_service_model(self, service_name: str, type_name: str, api_version: str | None = None) -> Any:
        model = super().load_service_model(service_name, type_name, api_version)
        if service_name != SERVICE_NAME or type_name != "service-2":
            return model
        # The base loader caches and hands out the same dict: merge once into a copy, per api version.
        if api_version not in self._merged:
            self._merged[api_version] = merge_models(model, extension_model())
        return self._merged[api_version]


@functools.cache
def _shared_loader() -> DrsExtendedLoader:
    # One loader for every session: it only caches model files, so clients after the first are quick.
    base = botocore.session.Session().get_component("data_loader")
    return DrsExtendedLoader(extra_search_paths=base.search_paths, include_default_search_paths=False)


def botocore_session() -> botocore.session.Session:
    """A botocore session whose `drs` service has our operations too."""
    session = botocore.session.Session()
    session.register_component("data_loader", _shared_loader())
    return session


@functools.cache
def drs_service_model() -> ServiceModel:
    """The merged model (public drs + ours); the control plane validates requests and responses with it."""
    session = botocore_session()
    raw = session.get_component("data_loader").load_service_model(SERVICE_NAME, "service-2")
    return ServiceModel(raw, service_name=SERVICE_NAME)


def make_drs_client(
    *,
    region: str,
    endpoint_url: str | None,
    access_key: str | None = None,
    secret_key: str | None = None,
    session_token: str | None = None,
    credential_provider: Any | None = None,
    unsigned: bool = False,
    retries_mode: str = "standard",
    max_attempts: int = 8,
    proxies: dict[str, str] | None = None,
    connect_timeout: float = 10,
    read_timeout: float = 60,
) -> BaseClient:
    """A boto3 `drs` client with the public and the failback client's operations.

    `endpoint_url=None` means the default `https://drs.{region}.amazonaws.com`. Throttling (429) and
    5xx are retried by botocore's standard/adaptive retry mode with up to `max_attempts` attempts.
    Credentials: the key pair given, or a botocore CredentialProvider (refreshable credentials), or
    `unsigned=True` for calls that prove identity otherwise (GetFailbackClientCredentialsForDrs).
    """
    if retries_mode not in RETRY_MODES:
        raise ValueError(f"retries_mode must be one of {', '.join(RETRY_MODES)}, not {retries_mode!r}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
    config = Config(
        region_name=region,
        # total_max_attempts counts the first attempt too (botocore's "max_attempts" would not).
        retries={"mode": retries_mode, "total_max_attempts": max_attempts},
        proxies=proxies,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        user_agent_appid=f"failback-client-{__version__}",
        **({"signature_version": botocore.UNSIGNED} if unsigned else {}),
    )
    core = botocore_session()
    if credential_provider is not None or unsigned:
        from botocore.credentials import CredentialResolver

        # Only this provider (never the environment's or a profile's keys).
        core.register_component(
            "credential_provider", CredentialResolver([credential_provider] if credential_provider else [])
        )
        return boto3.session.Session(botocore_session=core).client(
            SERVICE_NAME, region_name=region, endpoint_url=endpoint_url or None, config=config
        )
    session = boto3.session.Session(botocore_session=core)
    return session.client(
        SERVICE_NAME,
        region_name=region,
        endpoint_url=endpoint_url or None,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        aws_session_token=session_token or None,
        config=config,
    )
