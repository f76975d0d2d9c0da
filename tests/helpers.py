"""Helpers shared by the integration tests."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pandas as pd

from s3rollup.contract import result_key
from s3rollup.demo import to_csv_bytes, wait_for_manifest
from s3rollup.ops import read_manifest


def put_part(stack: Any, dataset: str, name: str, body: bytes | pd.DataFrame) -> str:
    """Upload a part as a producer would (SSE-KMS under the stack's key); return its key."""
    data = to_csv_bytes(body) if isinstance(body, pd.DataFrame) else body
    key = f"incoming/{dataset}/{name}"
    stack.aws.s3.put_object(
        Bucket=stack.info.outputs["DataBucketName"],
        Key=key,
        Body=data,
        ServerSideEncryption="aws:kms",
        SSEKMSKeyId=stack.info.outputs["DataKeyArn"],
    )
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


def user_env(stack: Any) -> dict[str, str]:
    """What a user's other terminal has: only the endpoint (no credentials, no names)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3ROLLUP_"))}
    env["AWS_ENDPOINT_URL"] = stack.info.endpoint_url
    env["S3ROLLUP_STACK"] = stack.info.stack_name
    return env


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
