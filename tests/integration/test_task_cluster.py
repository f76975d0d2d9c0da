"""A round on a Dask cluster of tasks: the embedded ECS runs the stack's scheduler and worker
task definitions as real `dask scheduler` / `dask worker` processes (local.DaskTasks), and
the job starts them with dask-cloudprovider's FargateCluster, exactly as on AWS."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest

from s3rollup import local_iam, member
from s3rollup.aws import Aws, assume_role, credentials_env
from s3rollup.config import Settings
from s3rollup.launch import LocalLauncher
from s3rollup.local import component_role
from s3rollup.state import State
from tests.conftest import wait_for
from tests.helpers import assert_result_is, audit_records, upload_silently

pytestmark = pytest.mark.integration

# A stack deployed with DaskThresholdBytes=1 and DaskWorkers=2: every round is a cluster round.
CLUSTER = {
    "S3ROLLUP_FARGATE_THRESHOLD_BYTES": "1",
    "S3ROLLUP_FARGATE_WORKERS": "2",
    "S3ROLLUP_FARGATE_WORKER_CPU": "1024",
    "S3ROLLUP_FARGATE_WORKER_MEM": "2048",
}


def start_job(stack: Any, dataset: str, job_id: str, extra: dict[str, str]) -> subprocess.Popen[bytes]:
    """The job's process as the embedded ECS starts it for a RunTask of the worker task
    definition (its environment, the task role's credentials, this endpoint), with ``extra``
    in its environment as a stack deployed with those parameters would give it."""
    launcher = LocalLauncher(
        Settings.from_env(stack.dispatcher.env),
        stack.aws.client("ecs"),
        extra_env={"AWS_ENDPOINT_URL": stack.info.endpoint_url, **extra},
        agent=stack.aws,
    )
    launcher.launch(dataset, job_id)
    return launcher.processes[-1]


def run_job(stack: Any, dataset: str, job_id: str, extra: dict[str, str], timeout: float = 240) -> int:
    """Run the job to its end; its exit code."""
    return start_job(stack, dataset, job_id, extra).wait(timeout=timeout)


def job_role(stack: Any) -> str:
    """The job task role's principal, as the endpoint records it (role/<name>)."""
    return "role/" + component_role(stack.aws, stack.info.stack_name, "worker").rsplit("/", 1)[-1]


def dask_role_arns(stack: Any) -> tuple[str, str]:
    """The task roles of the scheduler's and the workers' task definitions."""
    ecs, name = stack.aws.client("ecs"), stack.info.stack_name
    scheduler, worker = (
        ecs.describe_task_definition(taskDefinition=f"{name}-dask-{member}")["taskDefinition"]["taskRoleArn"]
        for member in ("scheduler", "worker")
    )
    return str(scheduler), str(worker)


def as_role(stack: Any, role_arn: str) -> Aws:
    """Clients of this endpoint with a role's credentials, as a task of that role has them."""
    creds = assume_role(stack.aws, role_arn, "test")
    return Aws(stack.info.region, stack.info.endpoint_url, credentials=creds)


def direct_kms(calls: list[local_iam.Record]) -> list[tuple[str, str | None, bool]]:
    """The KMS requests a principal made to KMS itself (not through S3, SQS or DynamoDB):
    action, the purpose of the encryption context, allowed."""
    return [
        (r.action, r.context.get("kms:EncryptionContext:s3rollup:purpose"), r.allowed)
        for r in calls
        if r.action.startswith("kms:") and "kms:ViaService" not in r.context
    ]


def comparable(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Audit records without what differs between any two jobs (ids, times, hashes)."""
    keep = ("event", "decision", "reason", "rows", "parts")
    return [tuple(str(r.get(k)) for k in keep) for r in records]


def state(stack: Any) -> State:
    return State(stack.aws.dynamodb, stack.info.outputs["StateTableName"])


def test_a_cluster_round_survives_a_killed_worker_equals_pandas_and_calls_only_what_is_granted(
    stack: Any, dataset: str
) -> None:
    # GIVEN 20 parts, and a job rolling them up on a task cluster of 2 workers
    final = upload_silently(stack, dataset, parts=20, rows=5_000, seed=20)
    role = job_role(stack)
    scheduler_role, worker_role = (f"role/{arn.rsplit('/', 1)[-1]}" for arn in dask_role_arns(stack))
    dask = stack.tasks.dask
    before = set(dask.processes)
    # WHEN one worker task dies mid-round (every call of the job's and the members' roles recorded)
    with (
        local_iam.captured(role) as calls,
        local_iam.captured(scheduler_role) as scheduler_calls,
        local_iam.captured(worker_role) as worker_calls,
    ):
        job = start_job(stack, dataset, "job-cluster", CLUSTER)
        _kill_a_worker_mid_round(stack, dataset, job, before, len(final))
    # THEN the round still ends, with the result of pandas at 1e-9
    assert_result_is(stack, dataset, final, timeout=10)
    # and the scheduler and both workers (each a process of its own) are stopped
    assert dask.running() == []
    # and the job's role called exactly these for the cluster, each allowed by the policy the
    # template gives it, none creating or registering anything
    assert calls and all(r.allowed for r in calls), [r for r in calls if not r.allowed]
    cluster_calls = sorted(
        {(r.action, r.resource) for r in calls if not r.action.startswith(("s3:", "dynamodb:", "kms:"))}
    )
    print("\n".join(f"{role} {action} {resource}" for action, resource in cluster_calls))
    assert {action for action, _ in cluster_calls} == {
        "ecs:ListAccountSettings",
        "ecs:DescribeClusters",
        "ecs:RunTask",
        "ecs:TagResource",
        "iam:PassRole",
        "ecs:DescribeTasks",
        "ec2:DescribeNetworkInterfaces",
        "ecs:StopTask",
    }
    creating = re.compile(r"^[a-z0-9]+:(Create|Register|Put|Delete|Deregister|Authorize|Attach)")
    assert not [action for action, _ in cluster_calls if creating.match(action)]
    # and the cluster's TLS went sealed: the job encrypted it once, under the purpose's
    # context; the scheduler (which calls nothing else) and each worker decrypted it
    assert direct_kms(calls) == [("kms:Encrypt", "dask-cluster-tls", True)]
    assert [(r.action, r.allowed) for r in scheduler_calls] == [("kms:Decrypt", True)]
    assert direct_kms(scheduler_calls) == [("kms:Decrypt", "dask-cluster-tls", True)]
    # (the killed worker may die before it gets that far: the other one computed partials)
    opened = direct_kms(worker_calls)
    assert set(opened) == {("kms:Decrypt", "dask-cluster-tls", True)} and len(opened) in (1, 2)
    assert worker_calls and all(r.allowed for r in worker_calls)
    # and no RunTask request carried the key or the certificate
    _no_secret_in_the_overrides(stack, set(dask.processes) - before)
    # and its audit records and lease are those of the same parts rolled up by a local round
    local = dataset + "l"
    upload_silently(stack, local, parts=20, rows=5_000, seed=20)
    assert run_job(stack, local, "job-local", {}) == 0
    assert comparable(audit_records(stack, dataset)) == comparable(audit_records(stack, local))
    assert state(stack).lease(dataset) is None and state(stack).lease(local) is None


def _no_secret_in_the_overrides(stack: Any, tasks: set[str]) -> None:
    """The overrides of the cluster's RunTask requests, as the endpoint received them and as
    DescribeTasks returns them, hold no PEM; their sealed TLS opens (as the scheduler's role)
    to the cluster's certificate and key, and those are nowhere in them."""
    from moto.ecs.models import ecs_backends

    cluster = Settings.from_env(stack.dispatcher.env).ecs_cluster
    described = stack.aws.client("ecs").describe_tasks(cluster=cluster, tasks=sorted(tasks))["tasks"]
    received = ecs_backends[local_iam.ACCOUNT][stack.info.region].tasks[cluster.rsplit("/", 1)[-1]]
    assert len(described) == 3
    kms = as_role(stack, dask_role_arns(stack)[0]).client("kms")
    for task in described:
        for overrides in (task["overrides"], received[task["taskArn"]].overrides):
            text = json.dumps(overrides)
            assert "PRIVATE KEY" not in text and "BEGIN" not in text
            assert len(text) < 8192  # RunTask's limit for all overrides
            (container,) = overrides["containerOverrides"]
            env = {e["name"]: e["value"] for e in container["environment"]}
            # opened as the scheduler's role opens it: the key, which is in no override
            key = member.open_tls(kms, env)["DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY"]
            assert "PRIVATE KEY" in key
            assert not [line for line in key.strip().splitlines()[1:-1] if line in text]


def _kill_a_worker_mid_round(stack: Any, dataset: str, job: Any, before: set[str], parts: int) -> None:
    """One worker task dies (SIGKILL, as a reclaimed Spot task would) once the round has computed
    its first partial; the round still ends, with every part aggregated once."""
    bucket, s3, dask = stack.info.outputs["DataBucketName"], stack.aws.s3, stack.tasks.dask

    def partials() -> int:
        listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"partials/{dataset}/")
        return int(listing.get("KeyCount", 0))

    wait_for(lambda: partials() > 0 or job.poll() is not None, timeout=180, interval=0.05)
    started = {arn: p for arn, p in dask.processes.items() if arn not in before}
    workers = [p for p in started.values() if "dask-worker" in p.args and p.poll() is None]
    done_before_kill = partials()
    assert len(started) == 3 and len(workers) == 2 and job.poll() is None
    workers[0].kill()
    assert job.wait(timeout=240) == 0
    assert done_before_kill < parts, "the kill came after the round"


def test_a_scheduler_task_that_never_comes_up_fails_the_job_and_leaves_nothing(
    stack: Any, dataset: str
) -> None:
    # GIVEN a part, and a scheduler task that will never run (its image cannot be pulled)
    upload_silently(stack, dataset, parts=1, rows=50, seed=22)
    dask = stack.tasks.dask
    before = set(dask.processes)
    dask.fail_next.add("dask-scheduler")
    # WHEN the job starts its task cluster
    code = run_job(stack, dataset, "job-no-scheduler", CLUSTER)
    # THEN it fails with a reason code and gives the lease back
    assert code == 1
    last = audit_records(stack, dataset)[-1]
    assert (last["event"], last["reason"]) == ("JOB_FAILED", "CLUSTER_START_FAILED")
    assert state(stack).lease(dataset) is None
    # and no Dask process was started or is left
    assert set(dask.processes) == before and dask.running() == []
    assert "dask-scheduler" not in dask.fail_next


def _member(stack: Any, role_arn: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A Dask member task started as the embedded ECS starts it (the role's credentials,
    this endpoint), with ``env`` as its overrides; stopped after 60 s if it starts."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3ROLLUP_", "DASK_"))}
    base.update(credentials_env(assume_role(stack.aws, role_arn, "test-member")))
    base.update(AWS_ENDPOINT_URL=stack.info.endpoint_url, AWS_REGION=stack.info.region, **env)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "s3rollup.member",
            "dask-scheduler",
            "--protocol",
            "tls",
            "--host",
            "127.0.0.1",
        ],
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_member_given_a_ciphertext_of_another_context_fails_clearly_and_only_the_purpose_opens(
    stack: Any,
) -> None:
    # GIVEN a cluster's TLS sealed by the job's role, as a job seals it
    scheduler_arn, _ = dask_role_arns(stack)
    key_arn = Settings.from_env(stack.dispatcher.env).kms_key_arn
    job = as_role(stack, component_role(stack.aws, stack.info.stack_name, "worker"))
    pem_key = "-----BEGIN PRIVATE KEY-----\nTESTKEY\n-----END PRIVATE KEY-----\n"
    sealed = member.seal_tls(job.client("kms"), key_arn, "cluster-a", "CERT", pem_key)
    # WHEN a scheduler task gets it under another cluster's id
    done = _member(stack, scheduler_arn, {**sealed, member.CLUSTER_ID: "cluster-b"})
    # THEN it starts nothing and says why, with no secret
    assert done.returncode == member.NO_TLS, done.stderr
    assert "cluster cluster-b" in done.stderr and "InvalidCiphertextException" in done.stderr
    assert "TESTKEY" not in done.stderr + done.stdout and sealed[member.SEALED_TLS] not in done.stderr
    # and a ciphertext that is not one fails as clearly
    done = _member(stack, scheduler_arn, {**sealed, member.SEALED_TLS: base64.b64encode(b"x" * 80).decode()})
    assert done.returncode == member.NO_TLS and "KMS Decrypt refused" in done.stderr
    # and under its own context it opens, for the scheduler's role
    scheduler = as_role(stack, scheduler_arn)
    assert (
        member.open_tls(scheduler.client("kms"), sealed)["DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__KEY"]
        == pem_key
    )
    # and neither role may use the key directly for another purpose (the policies' condition)
    other = {"s3rollup:purpose": "other", "s3rollup:cluster": "cluster-a"}
    blob = base64.b64decode(sealed[member.SEALED_TLS])
    refusals = [
        (
            f"role/{scheduler_arn.rsplit('/', 1)[-1]}",
            "kms:Decrypt",
            lambda: scheduler.client("kms").decrypt(
                CiphertextBlob=blob, KeyId=key_arn, EncryptionContext=other
            ),
        ),
        (
            job_role(stack),
            "kms:Encrypt",
            lambda: job.client("kms").encrypt(KeyId=key_arn, Plaintext=b"x", EncryptionContext=other),
        ),
        # and the job's role may not open what it sealed
        (job_role(stack), "kms:Decrypt", lambda: member.open_tls(job.client("kms"), sealed)),
    ]
    for principal, action, call in refusals:
        with local_iam.expected_denial(principal, action), pytest.raises(Exception, match="AccessDenied"):
            call()
