"""Launching the worker: the same RunTask request for ECS Fargate and for this machine."""

from __future__ import annotations

from typing import Any

import pytest

from s3rollup.config import Settings
from s3rollup.launch import EcsLauncher, LocalLauncher, run_task_request

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
