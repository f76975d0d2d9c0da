"""A round on a Dask cluster of tasks: the embedded ECS runs the stack's scheduler and worker
task definitions as real `dask scheduler` / `dask worker` processes (local.DaskTasks), and
the job starts them with dask-cloudprovider's FargateCluster, exactly as on AWS."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest

from s3rollup import local_iam
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
    dask = stack.tasks.dask
    before = set(dask.processes)
    # WHEN one worker task dies mid-round (every call of the job's role recorded)
    with local_iam.captured(role) as calls:
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
    # and its audit records and lease are those of the same parts rolled up by a local round
    local = dataset + "l"
    upload_silently(stack, local, parts=20, rows=5_000, seed=20)
    assert run_job(stack, local, "job-local", {}) == 0
    assert comparable(audit_records(stack, dataset)) == comparable(audit_records(stack, local))
    assert state(stack).lease(dataset) is None and state(stack).lease(local) is None


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
