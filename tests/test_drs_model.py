"""The merged drs service model and the boto3 client built on it (no network)."""

from __future__ import annotations

import copy
import json

import botocore.session
import pytest
from botocore.exceptions import ParamValidationError
from failback_client.drs_model import (
    FAILBACK_INITIATION_STEPS,
    FailbackCommand,
    ModelMergeError,
    drs_service_model,
    extension_model,
    extension_operation_names,
    make_drs_client,
    merge_models,
)

OURS = {
    "AssociateFailbackClientToRecoveryInstanceForDrs",
    "GetSuggestedFailbackClientDeviceMappingForDrs",
    "UpdateFailbackClientDeviceMappingForDrs",
    "IssueAgentCertificateForDrs",
    "UpdateAgentReplicationInfoForDrs",
    "UpdateAgentReplicationProcessStateForDrs",
    "GetFailbackClientCredentialsForDrs",
    "UpdateFailbackClientLastSeenForDrs",
    "GetFailbackCommandForDrs",
    "GetFailbackLaunchRequestedForDrs",
    "NotifyAgentConnectedForDrs",
    "NotifyAgentDisconnectedForDrs",
    "NotifyAgentReplicationProgressForDrs",
    "NotifyConsistencyAttainedForDrs",
    "SendClientLogsForDrs",
    "SendClientMetricsForDrs",
}
PUBLIC = {
    "DescribeRecoveryInstances",
    "DescribeSourceServers",
    "StartFailbackLaunch",
    "StopFailback",
    "GetFailbackReplicationConfiguration",
    "UpdateFailbackReplicationConfiguration",
}
RI = "i-0123456789abcdef0"
FBC = "fbc-0123456789abcdefg"


@pytest.fixture(scope="module")
def client():
    return make_drs_client(
        region="eu-west-1", endpoint_url=None, access_key="AKIAEXAMPLEEXAMPLE00", secret_key="not-a-real-secret"
    )


def _public_raw() -> dict:
    return botocore.session.get_session().get_component("data_loader").load_service_model("drs", "service-2")


def test_client_has_public_and_our_operations(client):
    names = set(client.meta.service_model.operation_names)
    assert names >= OURS | PUBLIC
    assert set(extension_operation_names()) == OURS
    # Every public operation stays: ours are added, nothing replaced.
    assert set(_public_raw()["operations"]) <= names
    assert client.meta.endpoint_url == "https://drs.eu-west-1.amazonaws.com"
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 8}


def test_our_operations_use_the_drs_protocol():
    model = drs_service_model()
    assert model.protocol == "rest-json"
    assert model.signing_name == "drs"
    assert model.api_version == "2020-02-26"
    for name in OURS:
        op = model.operation_model(name)
        assert op.http == {"method": "POST", "requestUri": f"/{name}", "responseCode": 200}
        assert op.output_shape is not None
        assert "ThrottlingException" in {e.name for e in op.error_shapes}


def test_shared_shapes_are_the_public_ones():
    """Enums we reuse (replication state, step names, errors) come from botocore's model, not copies."""
    model = drs_service_model()
    request = model.operation_model("UpdateAgentReplicationInfoForDrs").input_shape
    steps = request.members["initiationSteps"].member.members["name"]
    assert "PAIR_AGENT_WITH_REPLICATION_SOFTWARE" in steps.enum
    assert request.members["dataReplicationState"].name == "RecoveryInstanceDataReplicationState"


def test_constants_match_the_model():
    model = drs_service_model()
    steps = model.shape_for("RecoveryInstanceDataReplicationInitiationStepName").enum
    assert set(FAILBACK_INITIATION_STEPS) <= set(steps)
    assert [s for s in steps if s in FAILBACK_INITIATION_STEPS] == list(FAILBACK_INITIATION_STEPS)
    assert model.shape_for("FailbackCommand").enum == [c.value for c in FailbackCommand]


def test_serializes_like_a_public_call(client):
    """boto3 builds POST /<Operation> with a JSON body, as for public DRS calls."""
    captured = {}

    def capture(request, **_kwargs):
        captured["url"] = request.url
        captured["method"] = request.method
        captured["body"] = json.loads(request.body)
        captured["auth"] = request.headers["Authorization"].decode()
        raise RuntimeError("stop before sending")

    client.meta.events.register_first("before-send.drs.UpdateFailbackClientDeviceMappingForDrs", capture)
    mapping = [{"recoveryInstanceDeviceName": "/dev/nvme0n1", "failbackClientDeviceName": "/dev/sda"}]
    with pytest.raises(RuntimeError, match="stop before sending"):
        client.update_failback_client_device_mapping_for_drs(
            failbackClientID=FBC, recoveryInstanceID=RI, deviceMapping=mapping
        )
    assert captured["method"] == "POST"
    assert captured["url"] == "https://drs.eu-west-1.amazonaws.com/UpdateFailbackClientDeviceMappingForDrs"
    assert captured["body"] == {"failbackClientID": FBC, "recoveryInstanceID": RI, "deviceMapping": mapping}
    assert "/eu-west-1/drs/aws4_request" in captured["auth"]
    assert "not-a-real-secret" not in json.dumps(captured)


@pytest.mark.parametrize(
    ("operation", "params", "complaint"),
    [
        ("get_failback_command_for_drs", {"recoveryInstanceID": RI}, 'Missing required parameter.*"failbackClientID"'),
        ("get_failback_command_for_drs", {"recoveryInstanceID": "i-1", "failbackClientID": FBC}, "Invalid length"),
        (
            "update_failback_client_device_mapping_for_drs",
            {"recoveryInstanceID": RI, "failbackClientID": FBC, "deviceMapping": []},
            "Invalid length",
        ),
        ("send_client_metrics_for_drs", {"metrics": [{"name": "x", "value": "fast"}]}, "Invalid type"),
        (
            "update_agent_replication_info_for_drs",
            {"recoveryInstanceID": RI, "failbackClientID": FBC, "lagSeconds": -1},
            "Invalid value",
        ),
        ("describe_recovery_instances", {"maxResults": 0}, "Invalid value"),
    ],
)
def test_bad_input_is_refused_before_sending(client, operation, params, complaint):
    with pytest.raises(ParamValidationError, match=complaint):
        getattr(client, operation)(**params)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="retries_mode must be one of"):
        make_drs_client(region="us-east-1", endpoint_url=None, access_key="a", secret_key="b", retries_mode="fast")
    with pytest.raises(ValueError, match="max_attempts"):
        make_drs_client(region="us-east-1", endpoint_url=None, access_key="a", secret_key="b", max_attempts=0)


def test_merge_refuses_clashes_and_dangling_references():
    public, ours = _public_raw(), extension_model()
    clashing = copy.deepcopy(ours)
    clashing["shapes"]["RecoveryInstanceID"] = {"type": "string"}
    with pytest.raises(ModelMergeError, match="RecoveryInstanceID"):
        merge_models(public, clashing)
    dangling = copy.deepcopy(ours)
    dangling["shapes"]["FailbackClientDeviceMapping"]["members"]["extra"] = {"shape": "NoSuchShape"}
    with pytest.raises(ModelMergeError, match="NoSuchShape"):
        merge_models(public, dangling)
    # botocore's cached model is untouched by merging.
    assert "GetFailbackCommandForDrs" not in public["operations"]
