"""The job's reading of stored partials: in order, checked, and never all at once."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import threading
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from s3rollup import job as job_module
from s3rollup.contract import DEFAULT_CONTRACT as C
from s3rollup.contract import parse_part_key, partial_key
from s3rollup.errors import S3RollupError
from s3rollup.job import Job
from s3rollup.state import AGGREGATED, Part
from s3rollup.stats import frame_bytes, frame_to_parquet, partial_from_frame

DATASET = "sales"


class PartialStore:
    """get_object over stored partials, counting the GETs made."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, str]] = {}
        self.gets = 0
        self._lock = threading.Lock()

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        with self._lock:
            self.gets += 1
        data, version = self.objects[Key]
        return {"Body": io.BytesIO(data), "Metadata": {"source-version-id": version}}


def _job(store: PartialStore) -> Job:
    job = Job.__new__(Job)  # only what _load_partials reads
    job.aws = SimpleNamespace(s3=store)  # type: ignore[assignment]
    job.settings = SimpleNamespace(bucket="bucket")  # type: ignore[assignment]
    job.dataset = DATASET
    return job


def _parts(store: PartialStore, n: int) -> tuple[list[Part], list[pd.DataFrame]]:
    parts, frames = [], []
    for i in range(n):
        key = f"incoming/{DATASET}/part-{i:04d}.csv"
        frame = partial_from_frame(
            pd.DataFrame(
                {"id": [i], "value1": [float(i)], "value2": [1.0], "value3": [np.nan], "category": [i % 7]}
            ),
            C,
        )
        data = frame_to_parquet(frame)
        store.objects[partial_key(DATASET, parse_part_key(key).part_id)] = (data, f"v{i}")
        parts.append(
            Part(
                DATASET,
                key,
                f"v{i}",
                "etag",
                1,
                AGGREGATED,
                partial_version=f"v{i}",
                partial_sha256=hashlib.sha256(data).hexdigest(),
            )
        )
        frames.append(frame)
    return parts, frames


def test_partials_come_in_order_and_are_fetched_only_ahead_of_the_merge_by_a_bound() -> None:
    store = PartialStore()
    parts, frames = _parts(store, 100)
    loading = _job(store)._load_partials(parts)
    first = next(loading)
    pd.testing.assert_frame_equal(first, frames[0])
    # One taken: at most _FETCH_AHEAD more fetched, not all 100.
    assert store.gets <= job_module._FETCH_AHEAD + 1
    rest = list(loading)
    assert store.gets == 100
    for got, want in zip([first, *rest], frames, strict=True):
        pd.testing.assert_frame_equal(got, want)


def test_a_partial_that_does_not_match_its_registry_entry_stops_the_merge() -> None:
    store = PartialStore()
    parts, _ = _parts(store, 40)
    # e.g. an object overwritten behind the job's back
    parts[25] = dataclasses.replace(parts[25], partial_sha256="0" * 64)
    loading = _job(store)._load_partials(parts)
    assert len([next(loading) for _ in range(25)]) == 25
    with pytest.raises(S3RollupError) as err:
        next(loading)
    assert err.value.code == "STALE_PARTIAL"


def test_part_result_reports_checksums_rows_and_the_partial_it_encoded() -> None:
    from s3rollup.demo import generate_part, to_csv_bytes
    from s3rollup.stats import frame_from_parquet

    frame = generate_part(0, 500, 42)
    body = to_csv_bytes(frame)
    # WHEN a task makes its result of a part's stream
    result, data = job_module.part_result(io.BytesIO(body), len(body), "part-0.csv", C)
    # THEN it reports the body's and the partial's SHA-256, the rows and where its time went
    assert data is not None
    assert result["sha256"] == hashlib.sha256(body).hexdigest()
    assert result["partial_sha256"] == hashlib.sha256(data).hexdigest()
    assert result["rows"] == 500 and "error" not in result
    assert set(result["seconds"]) == {"read", "aggregate", "encode"}
    pd.testing.assert_frame_equal(frame_from_parquet(data), partial_from_frame(frame, C), check_exact=True)


def test_part_result_of_a_rejected_part_names_the_problem_and_has_no_partial() -> None:
    body = b"id,value1,value2,value3,category\n1,2.0,x,4.0,5\n"
    result, data = job_module.part_result(io.BytesIO(body), len(body), "part-0.csv", C)
    assert data is None
    assert result["sha256"] == hashlib.sha256(body).hexdigest()
    assert (result["error"]["code"], result["error"]["line"]) == ("BAD_VALUE", 2)
    assert "rows" not in result and "partial_sha256" not in result


def test_fetching_ahead_is_bounded_by_bytes_once_the_partials_size_is_known(monkeypatch) -> None:
    # GIVEN partials far larger than the fetch budget (here: a budget of 1.5 partials)
    store = PartialStore()
    parts, frames = _parts(store, 12)
    monkeypatch.setattr(job_module, "_FETCH_BYTES", frame_bytes(frames[0]) * 3 // 2)
    loading = _job(store)._load_partials(parts)
    # WHEN the merge takes them one by one
    got = []
    for i in range(12):
        got.append(next(loading))
        # THEN no more than one partial beyond the one taken was ever fetched
        assert store.gets <= i + 2, (i, store.gets)
    assert list(loading) == [] and store.gets == 12
    for a, b in zip(got, frames, strict=True):
        pd.testing.assert_frame_equal(a, b)
