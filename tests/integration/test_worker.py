"""The worker job: formats, contracts, group-size floor, and a real Dask scheduler."""

from __future__ import annotations

import gzip
import io
import json
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from s3rollup.aws import Aws
from s3rollup.config import Settings
from s3rollup.contract import load_contract
from s3rollup.demo import compare, generate_part, to_csv_bytes
from s3rollup.job import Job
from s3rollup.reference import complex_operation, reference_for
from s3rollup.stats import to_reference_shape
from tests.helpers import dask_processes, put_part, result_frame, silent, wait_manifest

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
    expected = complex_operation(pd.concat(frames, ignore_index=True))
    assert compare(result_frame(stack, dataset), expected) == []


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
    env_settings = Settings.from_env(stack.dispatcher.env).with_(dask_scheduler=dask_scheduler)
    job = Job(env_settings, Aws(), dataset, uuid.uuid4().hex, actor="test:scheduler")
    assert job.run() == 0
    manifest = wait_manifest(stack, dataset, keys, timeout=5)
    assert manifest["rows"] == 1500
    assert (
        compare(result_frame(stack, dataset), complex_operation(pd.concat(frames, ignore_index=True))) == []
    )
