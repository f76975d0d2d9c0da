"""Ingest: quarantine with reason codes, exactly-once registration and launch, overwrites,
leases, and bounded reads."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from s3rollup.config import Settings
from s3rollup.demo import generate_part, to_csv_bytes
from s3rollup.ingest import Ingest, S3Event
from s3rollup.launch import EcsLauncher
from s3rollup.local import FakeContext
from s3rollup.reference import complex_operation
from s3rollup.state import State
from tests.conftest import ROOT
from tests.helpers import (
    audit_records,
    notification,
    put_part,
    result_frame,
    silent,
    sqs_event,
    wait_manifest,
)

pytestmark = pytest.mark.integration

CORPUS = ROOT / "tests" / "corpus"


def _hold_lease(stack: Any, dataset: str) -> State:
    state = State(stack.aws.dynamodb, stack.info.outputs["StateTableName"])
    state.acquire_lease(dataset, "test-holds-lease", 600)
    return state


def test_bad_input_corpus_is_quarantined_with_its_own_reason_and_audited(
    stack: Any, lambda_app: Any, dataset: str
) -> None:
    _hold_lease(stack, dataset)
    bucket = stack.info.outputs["DataBucketName"]
    expected = json.loads((CORPUS / "bad" / "EXPECTED.json").read_text())
    with silent(stack):
        keys = {
            name: put_part(stack, dataset, name, (CORPUS / "bad" / name).read_bytes()) for name in expected
        }
    bodies = [notification(bucket, key) for key in keys.values()]
    for i in range(0, len(bodies), 10):  # the function's batch size
        assert lambda_app.handler(sqs_event(bodies[i : i + 10]), FakeContext("IngestFunction")) == {
            "batchItemFailures": []
        }
    rejected = {r["key"]: r["reason"] for r in audit_records(stack, dataset) if r["event"] == "PART_REJECTED"}
    assert rejected == {keys[name]: code for name, code in expected.items()}
    assert len(set(expected.values())) >= 20
    for name, code in expected.items():
        if code == "EMPTY_OBJECT":
            continue
        sidecar = stack.aws.s3.get_object(Bucket=bucket, Key=f"quarantine/{dataset}/{name}.reason.json")
        reason = json.loads(sidecar["Body"].read())
        assert reason["code"] == code and reason["key"] == keys[name]
        copy = stack.aws.s3.get_object(Bucket=bucket, Key=f"quarantine/{dataset}/{name}")["Body"].read()
        assert copy == (CORPUS / "bad" / name).read_bytes()


def test_good_corpus_is_accepted(stack: Any, lambda_app: Any, dataset: str) -> None:
    _hold_lease(stack, dataset)
    bucket = stack.info.outputs["DataBucketName"]
    with silent(stack):
        keys = [put_part(stack, dataset, p.name, p.read_bytes()) for p in sorted((CORPUS / "good").iterdir())]
    for key in keys:
        lambda_app.handler(notification(bucket, key), FakeContext("IngestFunction"))
    accepted = [r["key"] for r in audit_records(stack, dataset) if r["event"] == "PART_ACCEPTED"]
    assert sorted(accepted) == sorted(keys)


class CountingEcs:
    """The embedded ECS, counting RunTask calls."""

    def __init__(self, ecs: Any) -> None:
        self._ecs, self.run_task_calls = ecs, 0

    def run_task(self, **kwargs: Any) -> Any:
        self.run_task_calls += 1
        return self._ecs.run_task(**kwargs)


def test_five_deliveries_register_once_and_launch_at_most_once(stack: Any, dataset: str) -> None:
    settings = Settings.from_env(stack.info.function_env)  # launcher: ecs, as in AWS
    ecs = CountingEcs(stack.aws.client("ecs"))
    ingest = Ingest(settings, stack.aws.s3, stack.aws.dynamodb, EcsLauncher(settings, ecs))
    with silent(stack):
        key = put_part(stack, dataset, "part.csv", generate_part(0, 10, seed=1))
    event = S3Event("ObjectCreated:Put", settings.bucket, key)
    outcomes = [ingest.handle(event, actor="test") for _ in range(5)]
    assert [o.decision for o in outcomes] == ["ACCEPTED"] + ["DUPLICATE"] * 4
    assert ecs.run_task_calls == 1
    events = [r["event"] for r in audit_records(stack, dataset)]
    assert events == ["PART_ACCEPTED", "JOB_LAUNCHED"]


def test_an_older_event_never_undoes_a_newer_version(stack: Any, lambda_app: Any, dataset: str) -> None:
    state = _hold_lease(stack, dataset)
    bucket = stack.info.outputs["DataBucketName"]
    with silent(stack):
        key = put_part(stack, dataset, "part.csv", generate_part(0, 10, seed=1))
    first = stack.aws.s3.head_object(Bucket=bucket, Key=key)["VersionId"]
    lambda_app.handler(notification(bucket, key), FakeContext("IngestFunction"))
    with silent(stack):
        put_part(stack, dataset, "part.csv", generate_part(0, 20, seed=2))
    second = stack.aws.s3.head_object(Bucket=bucket, Key=key)["VersionId"]
    lambda_app.handler(notification(bucket, key), FakeContext("IngestFunction"))  # the new version's event
    lambda_app.handler(notification(bucket, key), FakeContext("IngestFunction"))  # the first event, late
    part = state.get_part(dataset, key)
    assert part is not None and first != second and part.version_id == second
    accepted = [r["version_id"] for r in audit_records(stack, dataset) if r["event"] == "PART_ACCEPTED"]
    assert accepted == [first, second]


def test_an_overwritten_part_replaces_its_contribution(stack: Any, dataset: str) -> None:
    key = put_part(stack, dataset, "part.csv", generate_part(0, 300, seed=1))
    other = put_part(stack, dataset, "other.csv", generate_part(1, 200, seed=1))
    wait_manifest(stack, dataset, {key, other})
    replacement = generate_part(0, 120, seed=9)
    put_part(stack, dataset, "part.csv", replacement)
    version = stack.aws.s3.head_object(Bucket=stack.info.outputs["DataBucketName"], Key=key)["VersionId"]

    def replaced() -> bool:
        from tests.helpers import manifest

        m = manifest(stack, dataset)
        return bool(m) and any(p["key"] == key and p["version_id"] == version for p in m["parts"])

    from tests.conftest import wait_for

    wait_for(replaced)
    import pandas as pd

    from s3rollup.demo import compare

    expected = complex_operation(pd.concat([replacement, generate_part(1, 200, seed=1)], ignore_index=True))
    assert compare(result_frame(stack, dataset), expected) == []


def test_an_expired_lease_can_be_taken_over(stack: Any, dataset: str) -> None:
    state = State(stack.aws.dynamodb, stack.info.outputs["StateTableName"])
    assert state.acquire_lease(dataset, "job-a", 1)
    assert not state.acquire_lease(dataset, "job-b", 60)
    time.sleep(2.1)
    assert state.acquire_lease(dataset, "job-b", 60)
    assert not state.release_lease(dataset, "job-a")
    assert state.lease(dataset)["job_id"] == "job-b"


class VirtualS3:
    """A 1 GiB part that exists only as the bytes ranged GETs ask for (counted)."""

    def __init__(self, bucket: str, key: str, size: int) -> None:
        self.bucket, self.key, self.size = bucket, key, size
        self.served = 0
        row = b"12345,0.25,-1.5,2.75,7\n"
        header = b"id,value1,value2,value3,category\n"
        self._head = header + row * ((2 << 20) // len(row))

    def head_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        return {"VersionId": "v1", "ETag": '"e"', "ContentLength": self.size}

    def get_object(self, Bucket: str, Key: str, Range: str = "", VersionId: str = "") -> dict[str, Any]:
        if Key != self.key:
            raise ClientError({"Error": {"Code": "NoSuchKey", "Message": ""}}, "GetObject")
        start, end = (int(x) for x in Range.removeprefix("bytes=").split("-"))
        data = self._head[start : end + 1] if end < len(self._head) else b"0" * (end - start + 1)
        self.served += len(data)

        class Body:
            def read(self) -> bytes:
                return data

        return {"Body": Body()}


def test_a_1_gib_part_is_decided_with_at_most_1_mib_read(stack: Any, dataset: str) -> None:
    settings = Settings.from_env(stack.info.function_env)
    key = f"incoming/{dataset}/huge.csv"
    s3 = VirtualS3(settings.bucket, key, 1 << 30)
    _hold_lease(stack, dataset)
    ingest = Ingest(settings, s3, stack.aws.dynamodb, launcher=None)  # type: ignore[arg-type]
    outcome = ingest.handle(S3Event("ObjectCreated:Put", settings.bucket, key), actor="test")
    assert outcome.decision == "ACCEPTED"
    assert 0 < s3.served <= 1 << 20 and ingest.bytes_read <= 1 << 20


def test_the_handler_loads_without_pandas_numpy_pyarrow_or_dask() -> None:
    # The same check `make template` runs on the built artifact, here on the source tree.
    done = subprocess.run(
        [sys.executable, "tests/check_lambda_artifact.py", "functions/ingest"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "lambda artifact ok" in done.stdout


def test_every_event_file_is_handled(stack: Any, lambda_app: Any, dataset: str) -> None:
    _hold_lease(stack, dataset)
    bucket = stack.info.outputs["DataBucketName"]
    with silent(stack):
        put_part(stack, dataset, "part-00000.csv", to_csv_bytes(generate_part(0, 5, seed=1)))
    for path in sorted(Path(ROOT / "events").glob("*.json")):
        text = path.read_text().replace("s3rollup-data-123456789012-us-east-1", bucket)
        event = json.loads(text.replace("incoming/sales/", f"incoming/{dataset}/"))
        # S3 and SQS events answer with the batch's failures; the reconcile schedule with its run.
        expected = {"reconciled": True} if event.get("source") == "aws.events" else {"batchItemFailures": []}
        assert lambda_app.handler(event, FakeContext("IngestFunction")) == expected, path.name
