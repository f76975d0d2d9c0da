"""Launching the worker: the same RunTask request for ECS Fargate and for this machine."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest

from s3rollup.config import Settings
from s3rollup.launch import EcsLauncher, LocalLauncher, run_task_request
from s3rollup.local import FakeContext

pytestmark = pytest.mark.integration


def _settings(stack: Any) -> Settings:
    return Settings.from_env(stack.info.function_env)


def test_run_task_request_is_fargate_private_and_idempotent(stack: Any) -> None:
    settings = _settings(stack)
    req = run_task_request(settings, "sales", "job-123")
    net = req["networkConfiguration"]["awsvpcConfiguration"]
    assert req["launchType"] == "FARGATE" and req["clientToken"] == "job-123"
    assert net["assignPublicIp"] == "DISABLED"
    assert net["subnets"] == list(settings.subnets) and len(net["subnets"]) == 2
    assert net["securityGroups"] == list(settings.security_groups)
    env = {e["name"]: e["value"] for e in req["overrides"]["containerOverrides"][0]["environment"]}
    assert env == {"S3ROLLUP_DATASET": "sales", "S3ROLLUP_JOB_ID": "job-123"}


def test_ecs_launcher_starts_one_fargate_task_in_the_stack_cluster(stack: Any) -> None:
    settings = _settings(stack)
    ecs = stack.aws.client("ecs")
    arn = EcsLauncher(settings, ecs).launch("sales", "job-ecs-1")
    task = ecs.describe_tasks(cluster=settings.ecs_cluster, tasks=[arn])["tasks"][0]
    assert task["launchType"] == "FARGATE"
    assert task["taskDefinitionArn"] == settings.task_definition
    overrides = task["overrides"]["containerOverrides"][0]
    assert {"name": "S3ROLLUP_DATASET", "value": "sales"} in overrides["environment"]


def test_ecs_launcher_retries_capacity_failures_then_gives_up(stack: Any) -> None:
    from s3rollup.errors import LaunchError

    class Flaky:
        calls = 0

        def run_task(self, **kwargs: Any) -> dict[str, Any]:
            Flaky.calls += 1
            return {"tasks": [], "failures": [{"reason": "Capacity is unavailable at this time"}]}

    with pytest.raises(LaunchError) as err:
        EcsLauncher(_settings(stack), Flaky(), attempts=3, base_delay=0.001).launch("sales", "job-x")
    assert Flaky.calls == 3 and err.value.code == "RUN_TASK_EXHAUSTED"


def test_local_launcher_uses_the_deployed_task_definition_environment(stack: Any) -> None:
    launcher = LocalLauncher(_settings(stack).with_(launcher="local"), stack.aws.client("ecs"))
    env = launcher.task_environment("sales", "job-local-1")
    outputs = stack.info.outputs
    assert env["S3ROLLUP_BUCKET"] == outputs["DataBucketName"]
    assert env["S3ROLLUP_AUDIT_TABLE"] == outputs["AuditTableName"]
    assert env["S3ROLLUP_KMS_KEY_ARN"] == outputs["DataKeyArn"]
    assert (env["S3ROLLUP_DATASET"], env["S3ROLLUP_JOB_ID"]) == ("sales", "job-local-1")


def test_the_embedded_bucket_has_the_template_s_protections(stack: Any) -> None:
    s3, bucket = stack.aws.s3, stack.info.outputs["DataBucketName"]
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert all(block.values()) and len(block) == 4
    rule = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert rule["ApplyServerSideEncryptionByDefault"]["KMSMasterKeyID"] == stack.info.outputs["DataKeyArn"]
    rules = s3.get_bucket_notification_configuration(Bucket=bucket)["QueueConfigurations"]
    assert {r["Filter"]["Key"]["FilterRules"][0]["Value"] for r in rules} == {"incoming/"}


def test_ecs_launcher_retries_throttling_with_the_same_client_token(stack: Any) -> None:
    from botocore.exceptions import ClientError

    tokens: list[str] = []

    class Throttled:
        def run_task(self, **kwargs: Any) -> dict[str, Any]:
            tokens.append(kwargs["clientToken"])
            if len(tokens) < 3:
                raise ClientError(
                    {"Error": {"Code": "ThrottlingException", "Message": "slow down"}}, "RunTask"
                )
            return {"tasks": [{"taskArn": "arn:aws:ecs:us-east-1:123456789012:task/c/1"}], "failures": []}

    arn = EcsLauncher(_settings(stack), Throttled(), attempts=5, base_delay=0.001).launch("sales", "job-t")
    assert arn.endswith("task/c/1") and tokens == ["job-t"] * 3


def test_a_failed_launch_returns_the_message_and_the_redelivery_launches(
    stack: Any, lambda_app: Any, dataset: str
) -> None:
    from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError

    from s3rollup.errors import LaunchError
    from s3rollup.state import State
    from tests.helpers import audit_records, put_part, silent

    class Down:
        def launch(self, dataset: str, job_id: str) -> str:
            raise LaunchError("RunTask kept failing: capacity", "RUN_TASK_EXHAUSTED")

    class Up:
        launched: ClassVar[list[str]] = []

        def launch(self, dataset: str, job_id: str) -> str:
            Up.launched.append(job_id)
            return "arn:aws:ecs:us-east-1:123456789012:task/c/2"

    service = lambda_app.service()
    state = State(stack.aws.dynamodb, stack.info.outputs["StateTableName"])
    with silent(stack):
        key = put_part(stack, dataset, "p.csv", b"id,value1,value2,value3,category\n1,1,2,3,4\n")
    body = {
        "Records": [
            {
                "eventSource": "aws:s3",
                "eventName": "ObjectCreated:Put",
                "s3": {"bucket": {"name": stack.info.outputs["DataBucketName"]}, "object": {"key": key}},
            }
        ]
    }
    event = {
        "Records": [
            {
                "messageId": "m1",
                "receiptHandle": "r1",
                "body": json.dumps(body),
                "attributes": {},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q",
                "awsRegion": "us-east-1",
            }
        ]
    }

    original = service.launcher
    try:
        service.launcher = Down()
        # WHEN the launch fails: the invocation fails (powertools raises when every record
        # of a batch failed), so the message returns to the queue; the part stays
        # registered and the lease is given back
        with pytest.raises(BatchProcessingError):
            lambda_app.handler(event, FakeContext("IngestFunction"))
        assert state.get_part(dataset, key).status == "PENDING" and state.lease(dataset) is None
        # THEN the redelivery launches the job
        service.launcher = Up()
        assert lambda_app.handler(event, FakeContext("IngestFunction")) == {"batchItemFailures": []}
    finally:
        service.launcher = original
    assert len(Up.launched) == 1
    # ... and the failed delivery is on the record with its reason, not only in a log
    events = [(r["event"], r.get("reason")) for r in audit_records(stack, dataset)]
    assert events == [
        ("PART_ACCEPTED", "OK"),
        ("INGEST_FAILED", "RUN_TASK_EXHAUSTED"),
        ("JOB_LAUNCHED", None),
    ]
