"""Helpers shared by the integration tests."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from s3rollup.audit import exactly_once_problems
from s3rollup.aws import Aws
from s3rollup.config import Settings
from s3rollup.contract import result_key
from s3rollup.demo import compare, generate_part, to_csv_bytes, wait_for_manifest
from s3rollup.events import records, sqs_record
from s3rollup.ops import read_manifest, s3_notification
from s3rollup.reference import complex_operation


def put_part(stack: Any, dataset: str, name: str, body: bytes | pd.DataFrame, **extra: str) -> str:
    """Upload a part as a producer would (SSE-KMS under the stack's key); return its key."""
    key = f"incoming/{dataset}/{name}"
    put_version(stack, key, body, **extra)
    return key


def manifest(stack: Any, dataset: str) -> dict[str, Any] | None:
    """The dataset's published manifest, or None."""
    return read_manifest(stack.aws, stack.info.outputs["DataBucketName"], dataset)


def wait_manifest(stack: Any, dataset: str, keys: set[str], timeout: float = 120) -> dict[str, Any]:
    """Wait until the manifest lists exactly these keys (the demo's wait, as a test failure)."""
    try:
        return wait_for_manifest(stack.aws, stack.info.outputs["DataBucketName"], dataset, keys, timeout)
    except TimeoutError:
        raise AssertionError(
            f"manifest never listed {sorted(keys)}; last: {manifest(stack, dataset)}"
        ) from None


def result_frame(stack: Any, dataset: str) -> pd.DataFrame:
    """The published aggregate.parquet."""
    raw = stack.aws.s3.get_object(
        Bucket=stack.info.outputs["DataBucketName"], Key=result_key(dataset, "aggregate.parquet")
    )["Body"].read()
    return pd.read_parquet(io.BytesIO(raw))


def audit_records(stack: Any, dataset: str) -> list[dict[str, Any]]:
    """Every audit record of a dataset's chain."""
    from s3rollup.audit import AuditLog

    log = AuditLog(stack.aws.dynamodb, stack.info.outputs["AuditTableName"])
    return [{k: v for k, v in r.items() if k != "_seq_key"} for r in log.records(dataset)]


@contextlib.contextmanager
def silent(stack: Any) -> Iterator[None]:
    """Uploads inside send no S3 event (as if S3 dropped them): the test delivers its own."""
    s3, bucket = stack.aws.s3, stack.info.outputs["DataBucketName"]
    config = s3.get_bucket_notification_configuration(Bucket=bucket)
    config.pop("ResponseMetadata", None)
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={})
    try:
        yield
    finally:
        s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration=config)


def user_env(stack: Any, persona: str = "operator") -> dict[str, str]:
    """What a user's other terminal has: the endpoint and the credentials of a role with the
    template's policies for that persona (producer, reader, operator), no names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3ROLLUP_"))}
    env["AWS_ENDPOINT_URL"] = stack.info.endpoint_url
    env["S3ROLLUP_STACK"] = stack.info.stack_name
    env.update(stack.credentials(persona))
    return env


def task_aws(stack: Any) -> Aws:
    """Clients with the worker task role's credentials, as a job on Fargate has them."""
    from s3rollup.local import component_role

    return stack.aws_as(component_role(stack.aws, stack.info.stack_name, "worker"))


def persona_aws(stack: Any, persona: str) -> Aws:
    """Clients with a persona's credentials (one set per persona and stack)."""
    cache = stack.__dict__.setdefault("_persona_aws", {})
    if persona not in cache:
        cache[persona] = stack.aws_as(stack.info.persona_roles[persona])
    return cache[persona]


def run_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `s3rollup ARGS` as a subprocess (stdout and stderr are pipes, not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "s3rollup.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def queue_like_the_stacks(stack: Any, name: str, max_receives: int) -> str:
    """A queue of a test's own (1 s visibility timeout, a DLQ, name + "-dlq", after
    max_receives receives) that the function consumes as it does the ingest queue. Its role
    names that queue only, so this one admits the role in its own policy."""
    sqs = stack.aws.client("sqs")
    dlq = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receives)})
    queue = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "1", "RedrivePolicy": redrive})
    arn = sqs.get_queue_attributes(QueueUrl=queue["QueueUrl"], AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "TheFunctionConsumes",
                "Effect": "Allow",
                "Principal": {"AWS": stack.info.function_role_arn},
                "Action": [
                    "sqs:ReceiveMessage",
                    "sqs:DeleteMessage",
                    "sqs:GetQueueAttributes",
                    "sqs:ChangeMessageVisibility",
                ],
                "Resource": arn,
            }
        ],
    }
    sqs.set_queue_attributes(QueueUrl=queue["QueueUrl"], Attributes={"Policy": json.dumps(policy)})
    stack.policies.set_resource_policy(arn, policy)  # the endpoint's IAM reads the template's
    return str(queue["QueueUrl"])


def notification(bucket: str, key: str, event_name: str = "ObjectCreated:Put") -> dict[str, Any]:
    """The S3 notification for one key, as S3 sends it (key URL-encoded, no version id)."""
    body = s3_notification(bucket, key)
    body["Records"][0]["eventName"] = event_name
    return body


def sqs_event(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """The SQS event Lambda passes for a batch of message bodies."""
    return records(
        [
            sqs_record(
                json.dumps(b),
                queue_arn="arn:aws:sqs:us-east-1:123456789012:q",
                region="us-east-1",
                message_id=f"m-{i}",
                receipt_handle=f"r-{i}",
                attributes={"ApproximateReceiveCount": "1"},
                md5_of_body="",
            )
            for i, b in enumerate(bodies)
        ]
    )


def wait_published(
    stack: Any, dataset: str, versions: dict[str, str], timeout: float = 120
) -> dict[str, Any]:
    """Wait until the manifest lists exactly these keys at exactly these versions."""
    from tests.conftest import wait_for

    def published() -> dict[str, Any] | None:
        m = manifest(stack, dataset)
        if m and {p["key"]: p["version_id"] for p in m["parts"]} == versions:
            return m
        return None

    result: dict[str, Any] = wait_for(published, timeout=timeout)
    return result


@contextlib.contextmanager
def dask_processes(tmp_path: Path, workers: int) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """A `dask scheduler` and `workers` single-thread `dask worker` processes on 127.0.0.1;
    yields the scheduler address and the worker processes."""
    bin_dir = Path(sys.executable).parent
    sched_file = tmp_path / "scheduler.json"
    quiet: dict[str, Any] = {"env": dict(os.environ), "stdout": subprocess.DEVNULL}
    quiet["stderr"] = subprocess.DEVNULL
    dask, on = str(bin_dir / "dask"), ["--scheduler-file", str(sched_file), "--no-dashboard"]
    from tests.conftest import wait_for

    scheduler = subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", *on], **quiet)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        wait_for(sched_file.exists, timeout=60, interval=0.2)
        procs += [
            subprocess.Popen([dask, "worker", "--host", "127.0.0.1", "--nthreads", "1", *on], **quiet)
            for _ in range(workers)
        ]
        yield json.loads(sched_file.read_text())["address"], procs
    finally:
        for p in [*procs, scheduler]:
            p.terminate()
        for p in [*procs, scheduler]:
            p.wait(timeout=30)


def put_version(stack: Any, key: str, body: bytes | pd.DataFrame, **extra: str) -> str:
    """Upload as a producer does (SSE-KMS under the stack's key; ``extra``: more PutObject
    arguments, e.g. ChecksumAlgorithm); return the new version id."""
    s3 = persona_aws(stack, "producer").s3 if key.startswith("incoming/") else stack.aws.s3
    put = s3.put_object(
        Bucket=stack.info.outputs["DataBucketName"],
        Key=key,
        Body=to_csv_bytes(body) if isinstance(body, pd.DataFrame) else body,
        ServerSideEncryption="aws:kms",
        SSEKMSKeyId=stack.info.outputs["DataKeyArn"],
        **extra,
    )
    return str(put["VersionId"])


def register_quietly(stack: Any, dataset: str) -> None:
    """Decide on what incoming/<dataset>/ holds, as the scheduled reconcile does (under the
    function's role), starting no job: the test runs its own. Jobs find parts in the
    registry, never in a listing."""
    from s3rollup.ingest import Ingest
    from s3rollup.local import component_role

    settings = Settings.from_env(stack.info.function_env)
    aws = stack.aws_as(component_role(stack.aws, stack.info.stack_name, "function"))
    Ingest(settings, aws.s3, aws.dynamodb, launcher=None).reconcile(dataset, actor="test:reconcile")


def upload_silently(
    stack: Any, dataset: str, parts: int, rows: int, seed: int
) -> dict[str, tuple[str, pd.DataFrame]]:
    """Upload generated parts with no S3 event; return key -> (version id, frame)."""
    final = {}
    with silent(stack):
        for i in range(parts):
            frame = generate_part(i, rows, seed=seed)
            key = f"incoming/{dataset}/p{i:02d}.csv"
            final[key] = (put_version(stack, key, frame), frame)
    register_quietly(stack, dataset)
    return final


def assert_equals_reference(stack: Any, dataset: str, frames: list[pd.DataFrame]) -> None:
    """The published aggregate equals pandas' complex_operation over these rows."""
    expected = complex_operation(pd.concat(frames, ignore_index=True))
    problems = compare(result_frame(stack, dataset), expected)
    assert problems == [], problems


def assert_result_is(
    stack: Any,
    dataset: str,
    final: dict[str, tuple[str, pd.DataFrame]],
    timeout: float = 120,
    crashed: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The manifest names exactly these versions, the aggregate equals pandas over their rows,
    and no part version was accepted or aggregated twice."""
    published = wait_published(stack, dataset, {k: v for k, (v, _) in final.items()}, timeout)
    assert_equals_reference(stack, dataset, [f for _, f in final.values()])
    assert published["rows"] == sum(len(f) for _, f in final.values())
    problems = exactly_once_problems(audit_records(stack, dataset), crashed)
    assert problems == [], problems
    return published


def readme_shell_block(marker: str) -> str:
    """The shell block between the README's <!-- marker --> and <!-- /marker --> comments."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = text.split(f"<!-- {marker} -->", 1)[1].split(f"<!-- /{marker} -->", 1)[0]
    return block.strip().removeprefix("```sh").removesuffix("```").strip() + "\n"
