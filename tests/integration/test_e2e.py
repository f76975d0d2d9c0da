"""The walking skeleton end to end: parts dropped into the embedded S3 come out as a
correct, encrypted, audited result."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pytest

from s3rollup.audit import AuditLog
from s3rollup.demo import compare, generate_part, wait_until_idle
from s3rollup.reference import complex_operation
from s3rollup.state import State
from tests.helpers import audit_records, put_part, result_frame, wait_manifest

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

HEADER_ONLY = b"id,value1,value2,value3,category\n"


def _parts() -> list[pd.DataFrame]:
    a, b = generate_part(0, 3000, seed=7), generate_part(1, 2000, seed=7)
    a.loc[3, "value1"] = np.nan  # a NaN cell
    a.loc[5, ["value1", "value2", "value3"]] = np.nan  # a whole NaN row
    single = pd.DataFrame(  # a group with a single row (std is NaN, as in pandas)
        {"id": [99_999], "value1": [0.5], "value2": [1.5], "value3": [-2.5], "category": [5000]}
    )
    return [a, b, single]


@pytest.fixture(scope="module")
def flow(stack: Any) -> dict[str, Any]:
    """GIVEN three good parts, an empty (header-only) part and a part with a wrong header."""
    dataset = "e2e-walking-skeleton"
    frames = _parts()
    keys = {put_part(stack, dataset, f"part-{i}.csv", f) for i, f in enumerate(frames)}
    keys.add(put_part(stack, dataset, "empty.csv", HEADER_ONLY))
    bad_key = put_part(stack, dataset, "bad-header.csv", b"id,value1,value2,wrong,category\n1,1,2,3,4\n")
    # WHEN the pipeline runs (dispatcher → handler → local worker)
    manifest = wait_manifest(stack, dataset, keys)
    # ... and every job it started has given the dataset's lease back.
    state = State(stack.aws.dynamodb, stack.info.outputs["StateTableName"])
    assert wait_until_idle(state, AuditLog(stack.aws.dynamodb, stack.info.outputs["AuditTableName"]), dataset)
    return {
        "dataset": dataset,
        "frames": frames,
        "keys": keys,
        "bad_key": bad_key,
        "manifest": manifest,
    }


def test_result_equals_pandas_complex_operation(stack: Any, flow: dict[str, Any]) -> None:
    expected = complex_operation(pd.concat(flow["frames"], ignore_index=True))
    result = result_frame(stack, flow["dataset"])
    assert compare(result, expected) == []
    assert len(result) == len(expected)
    assert np.isnan(result.set_index("category").loc[5000, "value1_std"])


def test_parquet_result_prefix_holds_parquet_only(stack: Any, flow: dict[str, Any]) -> None:
    # Query engines given a location (Athena, Glue, Spark) read every object under it.
    listed = stack.aws.s3.list_objects_v2(
        Bucket=stack.info.outputs["DataBucketName"], Prefix=f"results/{flow['dataset']}/parquet/"
    )
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert keys == [f"results/{flow['dataset']}/parquet/aggregate.parquet"]
    assert flow["manifest"]["objects"]["aggregate.parquet"]["key"] == keys[0]


def test_manifest_lists_every_accepted_part_with_rows_and_versions(flow: dict[str, Any]) -> None:
    parts = {p["key"]: p for p in flow["manifest"]["parts"]}
    assert set(parts) == flow["keys"]
    assert parts[f"incoming/{flow['dataset']}/empty.csv"]["rows"] == 0
    assert sum(p["rows"] for p in parts.values()) == sum(len(f) for f in flow["frames"])
    assert all(p["version_id"] and p["etag"] and len(p["sha256"]) == 64 for p in parts.values())


def test_every_object_the_pipeline_writes_is_sse_kms_under_the_stack_key(
    stack: Any, flow: dict[str, Any]
) -> None:
    s3, bucket = stack.aws.s3, stack.info.outputs["DataBucketName"]
    key_arn = stack.info.outputs["DataKeyArn"]
    written = []
    for prefix in ("partials/", "results/", "quarantine/"):
        listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}{flow['dataset']}/")
        written += [o["Key"] for o in listing.get("Contents", [])]
    assert any(k.startswith("results/") for k in written)
    assert any(k.startswith("partials/") for k in written)
    assert any(k.startswith("quarantine/") for k in written)
    for key in written:
        head = s3.head_object(Bucket=bucket, Key=key)
        assert head["ServerSideEncryption"] == "aws:kms", key
        assert head["SSEKMSKeyId"] == key_arn, key


def test_bad_header_is_not_aggregated_and_is_audited_with_its_reason(
    stack: Any, flow: dict[str, Any]
) -> None:
    assert flow["bad_key"] not in {p["key"] for p in flow["manifest"]["parts"]}
    rejected = [r for r in audit_records(stack, flow["dataset"]) if r["event"] == "PART_REJECTED"]
    assert [(r["key"], r["reason"]) for r in rejected] == [(flow["bad_key"], "MISSING_COLUMN")]
    s3, bucket = stack.aws.s3, stack.info.outputs["DataBucketName"]
    reason = s3.get_object(Bucket=bucket, Key=f"quarantine/{flow['dataset']}/bad-header.csv.reason.json")
    assert b"MISSING_COLUMN" in reason["Body"].read()


def test_one_audit_record_per_accepted_part_and_per_job(stack: Any, flow: dict[str, Any]) -> None:
    records = audit_records(stack, flow["dataset"])
    accepted = Counter(r["key"] for r in records if r["event"] == "PART_ACCEPTED")
    assert accepted == Counter(flow["keys"])
    started = [r["job_id"] for r in records if r["event"] == "JOB_STARTED"]
    finished = [r["job_id"] for r in records if r["event"] == "JOB_FINISHED"]
    launched = [r["job_id"] for r in records if r["event"] == "JOB_LAUNCHED"]
    assert started and len(set(started)) == len(started)
    assert sorted(started) == sorted(finished)
    assert set(started) <= set(launched)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
