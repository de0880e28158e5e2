"""The workflow's DRS calls over one boto3 client (failback_client.drs_model), with errors as one sentence."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import botocore.exceptions

from failback_client.errors import ClientError as FailbackError
from failback_client.errors import CredentialsError, ServiceError
from failback_client.settings import Settings

log = logging.getLogger(__name__)

POLICY = "AWSElasticDisasterRecoveryFailbackInstallationPolicy"


def explain(error: Exception, settings: Settings, action: str, *, installed: bool = False) -> FailbackError:
    """One clear sentence for a botocore failure (no traceback); credential problems get CredentialsError.
    `installed`: the call went out on the credentials DRS issued this client, not on the ones the admin typed in,
    so advice about the installation policy or new STS credentials would send the admin the wrong way."""
    key = settings.access_key_id or "?"
    region = settings.region or "?"
    endpoint = settings.endpoint_url if settings.region else "?"
    if isinstance(error, botocore.exceptions.ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        message = error.response.get("Error", {}).get("Message", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("InvalidSignatureException", "SignatureDoesNotMatch") and "expired" in message.lower():
            return CredentialsError(
                f"AWS refused the request signature as expired while {action}: this machine's clock is more than "
                "5 minutes off; set it to the correct UTC time (the hardware clock must keep UTC, not local time)"
            )
        signature = code in ("InvalidSignatureException", "SignatureDoesNotMatch", "IncompleteSignature")
        if signature and "not yet current" in message.lower():
            return CredentialsError(
                f"AWS refused the request signature as dated in the future while {action}: this machine's clock "
                "is more than 5 minutes ahead; set it to the correct UTC time"
            )
        if signature and "scoped to a valid region" in message.lower():
            return CredentialsError(
                f"The endpoint {endpoint} is not in region {region} (while {action}): AWS answered "
                f'"{message.strip()}". Give the region the endpoint belongs to, or the endpoint of the region '
                "(--region, --endpoint)"
            )
        if signature and "scoped to correct service" in message.lower():
            return CredentialsError(
                f"The endpoint {endpoint} is not an Elastic Disaster Recovery endpoint (while {action}): AWS "
                f'answered "{message.strip()}"; check --endpoint'
            )
        if signature:
            return CredentialsError(
                f"AWS refused the request signature while {action}: the AWS Secret Access Key does not match "
                f'access key {key}; check it for a typo (AWS answered "{message.strip()[:200]}")'
            )
        if installed and code in (
            "AccessDeniedException",
            "AccessDenied",
            "ExpiredTokenException",
            "ExpiredToken",
            "UnrecognizedClientException",
            "InvalidClientTokenId",
        ):
            return CredentialsError(
                f"Elastic Disaster Recovery refused the credentials it issued this failback client while {action} "
                f'({code}: "{message.strip()[:300]}"). The credentials entered at installation are not the cause '
                f"and are not used any more. Check in the DRS console that the recovery instance still exists and "
                f"its failback was not stopped, then start the failback client again"
            )
        if code in ("ExpiredTokenException", "ExpiredToken"):
            return CredentialsError(
                f"The AWS Session Token has expired (while {action}): create new temporary credentials with "
                "AWS STS AssumeRole and start again"
            )
        if code in ("RequestExpired", "RequestTimeTooSkewed"):
            return CredentialsError(
                f"AWS refused the request as too old or too new while {action}: this machine's clock is off; "
                "set it to the correct UTC time"
            )
        if code in ("UnrecognizedClientException", "InvalidClientTokenId", "InvalidAccessKeyId"):
            what = (
                f"the access key ID {key} or the AWS Session Token"
                if settings.session_token
                else f"the access key ID {key}"
            )
            return CredentialsError(
                f"AWS does not recognise {what} (while {action}): check for a typo, or that the credentials "
                f"belong to the account of region {region}"
            )
        if code in ("AccessDeniedException", "AccessDenied"):
            return CredentialsError(
                f"The credentials are valid but not allowed to {action}: attach the {POLICY} policy "
                "to the role or user they belong to"
            )
        if code == "UninitializedAccountException":
            return CredentialsError(
                f"Elastic Disaster Recovery is not initialized in {region} for this account: check the region"
            )
        if code in ("ThrottlingException", "TooManyRequestsException"):
            return ServiceError(
                f"DRS kept throttling the requests while {action} even after retries; wait a minute and start again"
            )
        detail = f": {message}" if message else ""
        return ServiceError(f"DRS refused {action} ({code or status}){detail}")
    if isinstance(error, botocore.exceptions.SSLError):
        return CredentialsError(
            f"TLS to {endpoint} failed while {action}: a proxy that inspects TLS, or a wrong endpoint name"
        )
    if isinstance(error, botocore.exceptions.ProxyConnectionError):
        return CredentialsError(f"The HTTPS proxy refused the connection to {endpoint} while {action}")
    if isinstance(error, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)):
        return CredentialsError(
            f"Cannot reach the DRS endpoint {endpoint} while {action}: check the network, DNS, the route or "
            "proxy to it, and the region/endpoint you gave"
        )
    if isinstance(error, botocore.exceptions.ReadTimeoutError):
        return ServiceError(f"The DRS endpoint {endpoint} did not answer in time while {action}")
    if isinstance(error, botocore.exceptions.ParamValidationError):
        return ServiceError(f"Refused to send an invalid request while {action}: {error}")
    if isinstance(error, botocore.exceptions.BotoCoreError):
        return ServiceError(f"DRS call failed while {action}: {error}")
    raise error


@contextlib.contextmanager
def calling(
    settings: Settings, action: str, logger: logging.Logger = log, *, installed: bool = False
) -> Iterator[None]:
    """Around one DRS call: a botocore error becomes the one-sentence ClientError of `explain`."""
    try:
        yield
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        logger.info("%s failed: %s", action, e)
        raise explain(e, settings, action, installed=installed) from None


def all_items(method: Callable[..., dict[str, Any]], **kwargs: Any) -> list[dict[str, Any]]:
    """Every page of a DRS Describe* call, following nextToken."""
    items: list[dict[str, Any]] = []
    while True:
        page = method(**kwargs)
        items.extend(page.get("items", []))
        token = page.get("nextToken")
        if not token:
            return items
        kwargs["nextToken"] = token


class DrsApi:
    """The calls the failback workflow makes, named for what they do."""

    def __init__(self, settings: Settings, client: Any | None = None) -> None:
        self.settings = settings
        if client is None:
            from failback_client.drs_model import make_drs_client

            client = make_drs_client(
                region=settings.region or "",
                endpoint_url=settings.endpoint_url,
                access_key=settings.access_key_id or "",
                secret_key=settings.secret_access_key or "",
                session_token=settings.session_token,
            )
        self.client = client
        # Set by drs_credentials.switch_to_drs_credentials: from then on the client works on credentials DRS
        # issued it (AWSElasticDisasterRecoveryFailbackPolicy), which name some calls differently.
        self.installed = False

    @property
    def update_replication(self) -> Any:
        """UpdateAgentReplicationInfoForDrs while installing; UpdateAgentReplicationProcessStateForDrs after
        (the same request: each policy allows only its own name)."""
        if self.installed:
            return self.client.update_agent_replication_process_state_for_drs
        return self.client.update_agent_replication_info_for_drs

    def _calling(self, action: str) -> contextlib.AbstractContextManager[None]:
        return calling(self.settings, action, installed=self.installed)

    def check_credentials(self) -> None:
        """A real, cheap, read-only call: bad key, secret, token or region fail here, at once."""
        with self._calling("checking the credentials (DescribeRecoveryInstances)"):
            self.client.describe_recovery_instances(maxResults=1)

    def recovery_instances(self, ids: list[str] | None = None) -> list[dict[str, Any]]:
        with self._calling("listing recovery instances"):
            return all_items(
                self.client.describe_recovery_instances, filters={"recoveryInstanceIDs": ids} if ids else {}
            )

    def source_servers_by_hardware_id(self, hardware_id: str) -> list[dict[str, Any]]:
        return self._source_servers(
            {"hardwareId": hardware_id}, f"looking up source servers by hardware id {hardware_id}"
        )

    def source_servers(self) -> list[dict[str, Any]]:
        """Every source server of the region (to say what identification could have matched)."""
        return self._source_servers({}, "listing source servers")

    def _source_servers(self, filters: dict[str, Any], action: str) -> list[dict[str, Any]]:
        with self._calling(action):
            return all_items(self.client.describe_source_servers, filters=filters)

    def associate(
        self, recovery_instance_id: str, identification: dict[str, Any], local_disks: list[dict[str, Any]], version: str
    ) -> dict[str, Any]:
        with self._calling(f"linking this failback client with {recovery_instance_id}"):
            return self.client.associate_failback_client_to_recovery_instance_for_drs(
                recoveryInstanceID=recovery_instance_id,
                failbackClientVersion=version,
                identification=identification,
                localDisks=local_disks,
            )

    def suggested_mapping(
        self, client_id: str, recovery_instance_id: str, local_disks: list[dict[str, Any]]
    ) -> dict[str, Any]:
        with self._calling("asking DRS for the suggested volume mapping"):
            return self.client.get_suggested_failback_client_device_mapping_for_drs(
                failbackClientID=client_id, recoveryInstanceID=recovery_instance_id, localDisks=local_disks
            )

    def update_mapping(
        self, client_id: str, recovery_instance_id: str, mapping: list[dict[str, str]]
    ) -> dict[str, Any]:
        with self._calling("sending the volume mapping to DRS"):
            return self.client.update_failback_client_device_mapping_for_drs(
                failbackClientID=client_id, recoveryInstanceID=recovery_instance_id, deviceMapping=mapping
            )

    def report_steps(self, client_id: str, recovery_instance_id: str, steps: list[dict[str, str]]) -> None:
        with self._calling("reporting the initiation steps to DRS"):
            self.update_replication(
                failbackClientID=client_id,
                recoveryInstanceID=recovery_instance_id,
                dataReplicationState="INITIATING",
                initiationSteps=steps,
            )

    def seen(self, client_id: str, recovery_instance_id: str) -> None:
        with self._calling("telling DRS this failback client is alive"):
            self.client.update_failback_client_last_seen_for_drs(
                failbackClientID=client_id, recoveryInstanceID=recovery_instance_id
            )
