"""The worker job: formats, contracts, group-size floor, and a real Dask scheduler."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from s3rollup.config import Settings
from s3rollup.contract import load_contract, merged_partial_key, parse_part_key, partial_key
from s3rollup.demo import generate_part, to_csv_bytes
from s3rollup.job import Job
from s3rollup.reference import reference_for
from s3rollup.stats import to_reference_shape
from tests.helpers import (
    assert_equals_reference,
    dask_processes,
    put_part,
    register_quietly,
    result_frame,
    silent,
    task_aws,
    wait_manifest,
    wait_published,
)

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def _parquet(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def test_csv_gz_and_parquet_parts_roll_up_with_csv(stack: Any, dataset: str) -> None:
    frames = [generate_part(i, 800, seed=21) for i in range(3)]
    keys = {
        put_part(stack, dataset, "a.csv", to_csv_bytes(frames[0])),
        put_part(stack, dataset, "b.csv.gz", gzip.compress(to_csv_bytes(frames[1]))),
        put_part(stack, dataset, "c.parquet", _parquet(frames[2])),
    }
    wait_manifest(stack, dataset, keys)
    assert_equals_reference(stack, dataset, frames)


def test_each_part_is_recorded_with_its_bodys_sha256_whether_or_not_s3_keeps_one(
    stack: Any, dataset: str
) -> None:
    # GIVEN a part uploaded with a SHA-256 checksum (S3 keeps it, and the worker's read is
    # checked against it) and a part uploaded with the SDK's default checksum (CRC32)
    frames = [generate_part(i, 600, seed=5) for i in range(2)]
    bodies = [to_csv_bytes(f) for f in frames]
    keys = [
        put_part(stack, dataset, "checked.csv", bodies[0], ChecksumAlgorithm="SHA256"),
        put_part(stack, dataset, "default.csv", bodies[1]),
    ]
    # WHEN they are rolled up
    manifest = wait_manifest(stack, dataset, set(keys))
    # THEN the manifest names each part with its body's SHA-256, and the result is pandas'
    recorded = {p["key"]: p["sha256"] for p in manifest["parts"]}
    assert recorded == {k: hashlib.sha256(b).hexdigest() for k, b in zip(keys, bodies, strict=True)}
    assert_equals_reference(stack, dataset, frames)


def test_contract_and_minimum_group_size_are_applied(stack: Any, dataset: str) -> None:
    contract = {
        "columns": {"region": "string", "amount": "float64", "qty": "int64"},
        "group_by": ["region"],
        "values": ["amount", "qty"],
        "statistics": ["mean", "max"],
        "derived": {"spread": "amount.max - amount.mean"},
        "min_group_size": 3,
    }
    bucket = stack.info.outputs["DataBucketName"]
    stack.aws.s3.put_object(
        Bucket=bucket, Key=f"contracts/{dataset}.json", Body=json.dumps(contract).encode()
    )
    rows = [("north", 1.5, 2), ("north", 2.5, 4), ("north", 4.0, 1), ("south", 9.0, 7), ("south", 1.0, 1)]
    frame = pd.DataFrame(rows, columns=["region", "amount", "qty"])
    key = put_part(stack, dataset, "sales.csv", frame.to_csv(index=False).encode())
    manifest = wait_manifest(stack, dataset, {key})
    result = result_frame(stack, dataset)
    # "south" has 2 rows, under the floor of 3: left out, and counted as suppressed
    assert list(result["region"]) == ["north"] and manifest["groups_suppressed"] == 1
    assert list(result.columns) == [
        "region",
        "rows",
        "amount_mean",
        "amount_max",
        "qty_mean",
        "qty_max",
        "spread",
    ]
    parsed = load_contract(json.dumps(contract).encode())
    expected = reference_for(frame[frame.region == "north"], parsed)
    got = to_reference_shape(result.drop(columns=["rows"]), parsed)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, check_names=False, rtol=1e-12)


@pytest.fixture()
def dask_scheduler(tmp_path: Path) -> Any:
    """A real `dask scheduler` and `dask worker` on 127.0.0.1 (separate processes)."""
    with dask_processes(tmp_path, workers=1) as (address, _):
        yield address


def test_a_job_runs_on_an_existing_dask_scheduler(stack: Any, dataset: str, dask_scheduler: str) -> None:
    from distributed import Client

    with Client(dask_scheduler, timeout="30s") as client:
        client.wait_for_workers(1, timeout=60)
    frames = [generate_part(i, 500, seed=31) for i in range(3)]
    with silent(stack):  # no event: this job is started by hand, not by ingest
        keys = {put_part(stack, dataset, f"p{i}.csv", f) for i, f in enumerate(frames)}
    register_quietly(stack, dataset)
    env_settings = Settings.from_env(stack.dispatcher.env).with_(dask_scheduler=dask_scheduler)
    job = Job(env_settings, task_aws(stack), dataset, uuid.uuid4().hex, actor="test:scheduler")
    assert job.run() == 0
    manifest = wait_manifest(stack, dataset, keys, timeout=5)
    assert manifest["rows"] == 1500
    assert_equals_reference(stack, dataset, frames)


def _spoil(stack: Any, key: str) -> None:
    """Replace the stored object with bytes no reader accepts."""
    stack.aws.s3.put_object(Bucket=stack.info.outputs["DataBucketName"], Key=key, Body=b"spoiled")


def test_a_new_part_is_merged_onto_the_last_published_merge(stack: Any, dataset: str) -> None:
    # GIVEN two parts published
    frames = [generate_part(i, 600, seed=31) for i in range(3)]
    first = {put_part(stack, dataset, f"p{i}.csv", frames[i]) for i in range(2)}
    published = wait_manifest(stack, dataset, first)
    assert published["merged_partial"]["key"] == merged_partial_key(dataset)
    # ... whose own stored partials are no longer readable
    for key in first:
        _spoil(stack, partial_key(dataset, parse_part_key(key).part_id))
    # WHEN a third part arrives
    third = put_part(stack, dataset, "p2.csv", frames[2])
    wait_manifest(stack, dataset, first | {third})
    # THEN only the new part's partial was read, and the result is still exactly pandas'
    assert_equals_reference(stack, dataset, frames)


def test_a_replaced_part_makes_the_job_merge_every_partial(stack: Any, dataset: str) -> None:
    # GIVEN two parts published, then one of them replaced by a new version
    a, b, a2 = (generate_part(i, 500, seed=32) for i in range(3))
    keys = {put_part(stack, dataset, "a.csv", a), put_part(stack, dataset, "b.csv", b)}
    wait_manifest(stack, dataset, keys)
    put_part(stack, dataset, "a.csv", a2)
    # WHEN the job publishes the new version
    bucket = stack.info.outputs["DataBucketName"]
    wait_published(
        stack, dataset, {k: stack.aws.s3.head_object(Bucket=bucket, Key=k)["VersionId"] for k in keys}
    )
    # THEN the old version's rows are gone from the result (the old merge was not built on)
    assert_equals_reference(stack, dataset, [a2, b])


def test_a_vanished_merged_partial_makes_the_job_merge_every_partial(stack: Any, dataset: str) -> None:
    # GIVEN a published result whose merged partial version is then deleted
    frames = [generate_part(i, 300, seed=33) for i in range(2)]
    first = put_part(stack, dataset, "p0.csv", frames[0])
    ref = wait_manifest(stack, dataset, {first})["merged_partial"]
    stack.aws.s3.delete_object(
        Bucket=stack.info.outputs["DataBucketName"], Key=ref["key"], VersionId=ref["version_id"]
    )
    # WHEN a new part arrives
    second = put_part(stack, dataset, "p1.csv", frames[1])
    wait_manifest(stack, dataset, {first, second})
    # THEN the job merged every stored partial instead, and the result is exact
    assert_equals_reference(stack, dataset, frames)
