"""template.yaml: what a security reviewer checks that the linters do not."""

from __future__ import annotations

from typing import Any

import pytest

from s3rollup.contract import CONTRACTS, INCOMING, PARTIALS, QUARANTINE, RESULTS
from s3rollup.local import load_template

TEMPLATE = load_template()
RESOURCES: dict[str, Any] = TEMPLATE["Resources"]
KEY_ARN = {"Fn::GetAtt": ["DataKey", "Arn"]}


def _of_type(kind: str) -> dict[str, Any]:
    return {k: v["Properties"] for k, v in RESOURCES.items() if v["Type"] == kind}


def _identity_statements() -> list[tuple[str, dict[str, Any]]]:
    """Every statement of every identity policy: inline role policies and SAM Policies."""
    out = []
    for name, props in _of_type("AWS::IAM::Role").items():
        for policy in props.get("Policies", []):
            out += [(name, s) for s in policy["PolicyDocument"]["Statement"]]
    for name, props in _of_type("AWS::Serverless::Function").items():
        for policy in props.get("Policies", []):
            assert isinstance(policy, dict), f"{name}: only inline policy documents are allowed"
            out += [(name, s) for s in policy["Statement"]]
    return out


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def test_no_identity_policy_grants_a_wildcard_action_or_resource() -> None:
    statements = _identity_statements()
    assert len(statements) >= 10
    for owner, st in statements:
        for action in _as_list(st["Action"]):
            assert action != "*" and not action.endswith(":*"), f"{owner}: {action}"
        for resource in _as_list(st["Resource"]):
            assert resource != "*", f"{owner}: {st.get('Sid')} has Resource '*'"


def test_only_the_key_policy_names_resource_star_and_only_for_this_key() -> None:
    # In a key policy, Resource "*" means "this key"; everywhere else it is refused above.
    key_policy = _of_type("AWS::KMS::Key")["DataKey"]["KeyPolicy"]
    assert _of_type("AWS::KMS::Key")["DataKey"]["EnableKeyRotation"] is True
    sids = {s["Sid"] for s in key_policy["Statement"]}
    assert {"AccountAdministers", "AccountRolesUseThroughServices", "CloudWatchLogs"} <= sids
    use = next(s for s in key_policy["Statement"] if s["Sid"] == "AccountRolesUseThroughServices")
    assert "kms:ViaService" in use["Condition"]["StringEquals"]


def test_the_worker_task_is_hardened() -> None:
    td = _of_type("AWS::ECS::TaskDefinition")["WorkerTaskDefinition"]
    assert td["RequiresCompatibilities"] == ["FARGATE"] and td["NetworkMode"] == "awsvpc"
    assert td["TaskRoleArn"] != td["ExecutionRoleArn"]
    (container,) = td["ContainerDefinitions"]
    assert container["ReadonlyRootFilesystem"] is True
    assert not str(container["User"]).startswith("0")
    assert container["LogConfiguration"]["LogDriver"] == "awslogs"
    assert any(m["ContainerPath"] == "/tmp" for m in container["MountPoints"])
    cluster = _of_type("AWS::ECS::Cluster")["WorkerCluster"]
    assert {"Name": "containerInsights", "Value": "enabled"} in cluster["ClusterSettings"]


def test_only_incoming_triggers_and_nothing_the_pipeline_writes_is_under_it() -> None:
    bucket = _of_type("AWS::S3::Bucket")["DataBucket"]
    configs = bucket["NotificationConfiguration"]["QueueConfigurations"]
    prefixes = {r["Value"] for c in configs for r in c["Filter"]["S3Key"]["Rules"] if r["Name"] == "prefix"}
    assert prefixes == {INCOMING}
    for written in (QUARANTINE, PARTIALS, RESULTS, CONTRACTS):
        assert not written.startswith(INCOMING) and not INCOMING.startswith(written)


@pytest.mark.parametrize("name", sorted(_of_type("AWS::S3::Bucket")))
def test_every_bucket_is_kms_encrypted_private_and_versioned(name: str) -> None:
    props = _of_type("AWS::S3::Bucket")[name]
    (rule,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"] == {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": KEY_ARN}
    assert all(props["PublicAccessBlockConfiguration"].values())
    assert props["VersioningConfiguration"]["Status"] == "Enabled"


def test_every_table_queue_topic_and_log_group_uses_the_stack_key() -> None:
    for name, props in _of_type("AWS::DynamoDB::Table").items():
        assert props["SSESpecification"] == {
            "SSEEnabled": True,
            "SSEType": "KMS",
            "KMSMasterKeyId": KEY_ARN,
        }, name
        assert props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
        assert RESOURCES[name]["DeletionPolicy"] == "Retain"
    for name, props in _of_type("AWS::SQS::Queue").items():
        assert props["KmsMasterKeyId"] == {"Ref": "DataKey"}, name
    for name, props in _of_type("AWS::SNS::Topic").items():
        assert props["KmsMasterKeyId"] == {"Ref": "DataKey"}, name
    for name, props in _of_type("AWS::Logs::LogGroup").items():
        assert props["KmsKeyId"] == KEY_ARN and props["RetentionInDays"], name


def test_the_ingest_queue_outlives_six_function_timeouts_and_redrives() -> None:
    queue = _of_type("AWS::SQS::Queue")["IngestQueue"]
    timeout = TEMPLATE["Globals"]["Function"]["Timeout"]
    assert queue["VisibilityTimeout"] >= 6 * timeout
    assert queue["RedrivePolicy"]["maxReceiveCount"] >= 1
    fn = _of_type("AWS::Serverless::Function")["IngestFunction"]
    assert fn["Events"]["Ingest"]["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert TEMPLATE["Globals"]["Function"]["Runtime"] == "python3.12"
