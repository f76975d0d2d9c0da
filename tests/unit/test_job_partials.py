"""The job's reading of stored partials: in order, checked, and never all at once."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import re
import threading
import zlib
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from s3rollup import job as job_module
from s3rollup import parse as parse_module
from s3rollup.contract import DEFAULT_CONTRACT as C
from s3rollup.contract import parse_part_key, partial_key
from s3rollup.errors import S3RollupError
from s3rollup.job import Job
from s3rollup.state import AGGREGATED, Part
from s3rollup.stats import partial_from_frame, table_bytes, table_to_parquet

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


def _loading(store: PartialStore, parts: list[Part]) -> Any:
    """The job's loading of the parts' stored partials for the manifest's tree."""
    job = Job.__new__(Job)  # only what the tree's partial loading reads
    job.aws = SimpleNamespace(s3=store)  # type: ignore[assignment]
    job.settings = SimpleNamespace(bucket="bucket")  # type: ignore[assignment]
    job.dataset = DATASET
    return job_module._PartialMerger(job, C).parts([job_module._entry(p) for p in parts])


def _parts(store: PartialStore, n: int) -> tuple[list[Part], list[pa.Table]]:
    parts, frames = [], []
    for i in range(n):
        key = f"incoming/{DATASET}/part-{i:04d}.csv"
        frame = partial_from_frame(
            pd.DataFrame(
                {"id": [i], "value1": [float(i)], "value2": [1.0], "value3": [np.nan], "category": [i % 7]}
            ),
            C,
        )
        data = table_to_parquet(frame)
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
    loading = _loading(store, parts)
    first = next(loading)
    pd.testing.assert_frame_equal(first.to_pandas(), frames[0].to_pandas())
    # One taken: at most _FETCH_AHEAD more fetched, not all 100.
    assert store.gets <= job_module._FETCH_AHEAD + 1
    rest = list(loading)
    assert store.gets == 100
    for got, want in zip([first, *rest], frames, strict=True):
        pd.testing.assert_frame_equal(got.to_pandas(), want.to_pandas())


def test_a_partial_that_does_not_match_its_registry_entry_stops_the_merge() -> None:
    store = PartialStore()
    parts, _ = _parts(store, 40)
    # e.g. an object overwritten behind the job's back
    parts[25] = dataclasses.replace(parts[25], partial_sha256="0" * 64)
    loading = _loading(store, parts)
    assert len([next(loading) for _ in range(25)]) == 25
    with pytest.raises(S3RollupError) as err:
        next(loading)
    assert err.value.code == "STALE_PARTIAL"


def test_part_result_reports_checksums_rows_and_the_partial_it_encoded() -> None:
    from s3rollup.demo import generate_part, to_csv_bytes
    from s3rollup.stats import table_from_parquet

    frame = generate_part(0, 500, 42)
    body = to_csv_bytes(frame)
    # WHEN a task makes its result of a part's stream
    result, data, table = job_module.part_result(io.BytesIO(body), len(body), "part-0.csv", C)
    # THEN it reports the body's and the partial's SHA-256, the rows and where its time went
    assert data is not None
    assert result["sha256"] == hashlib.sha256(body).hexdigest()
    assert result["partial_sha256"] == hashlib.sha256(data).hexdigest()
    assert result["rows"] == 500 and result["rows_without_key"] == 0 and "error" not in result
    assert set(result["seconds"]) == {"read", "aggregate", "encode"}
    pd.testing.assert_frame_equal(
        table_from_parquet(data).to_pandas(), partial_from_frame(frame, C).to_pandas(), check_exact=True
    )
    # AND the table it returns is the one it encoded
    assert table is not None and table.equals(table_from_parquet(data))


def _keyless_part(fmt: str) -> tuple[bytes, int, int]:
    """A 900-row part of the seed's schema whose every 9th row has no group key (spelled NA
    in CSV, a null in Parquet): (body, rows in a group, rows without a key)."""
    from s3rollup.demo import generate_part

    frame = generate_part(3, 900, 42)
    frame["category"] = frame["category"].astype("Int64")
    frame.loc[frame.index % 9 == 4, "category"] = pd.NA
    missing = int(frame["category"].isna().sum())
    if fmt == "parquet":
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        return buf.getvalue(), len(frame) - missing, missing
    text = frame.to_csv(index=False, na_rep="NA").encode()
    if fmt == "csv-quoted":  # a quoted id: not for the native parser; pyarrow reads it
        header, first_id, rest = re.split(rb"\n([0-9]+),", text, maxsplit=1)
        text = header + b'\n"' + first_id + b'",' + rest
    if fmt == "csv.gz":
        return zlib.compress(text, wbits=31), len(frame) - missing, missing
    return text, len(frame) - missing, missing


@pytest.mark.parametrize("native", [True, False], ids=["native", "without-native"])
@pytest.mark.parametrize("alone", [False, True], ids=["among-others", "alone"])
@pytest.mark.parametrize("fmt", ["csv", "csv-quoted", "csv.gz", "parquet"])
def test_part_result_counts_the_rows_left_out_for_a_missing_group_key(
    monkeypatch, fmt, alone, native
) -> None:
    from s3rollup import native as native_module

    if not native:
        monkeypatch.setattr(native_module, "LIB", None)
    elif native_module.LIB is None:
        pytest.skip("librollup.so is not loaded")
    # GIVEN a part whose every 9th row has no group key
    body, grouped, missing = _keyless_part(fmt)
    assert missing == 100
    # WHEN a task makes its result of it, on every path that reads it
    result, data, _ = job_module.part_result(io.BytesIO(body), len(body), f"part.{fmt}", C, alone)
    # THEN the rows in a group and the rows left out add up to the part's, and say which
    assert data is not None, result
    assert (result["rows"], result["rows_without_key"]) == (grouped, missing)


def test_part_result_of_a_rejected_part_names_the_problem_and_has_no_partial() -> None:
    body = b"id,value1,value2,value3,category\n1,2.0,x,4.0,5\n"
    result, data, table = job_module.part_result(io.BytesIO(body), len(body), "part-0.csv", C)
    assert data is None and table is None
    assert result["sha256"] == hashlib.sha256(body).hexdigest()
    assert (result["error"]["code"], result["error"]["line"]) == ("BAD_VALUE", 2)
    assert "rows" not in result and "partial_sha256" not in result


def test_partials_kept_by_the_rounds_tasks_are_merged_without_fetching_them_again(monkeypatch) -> None:
    # GIVEN 6 stored partials, 3 of which this process's tasks kept as they stored them
    kept = job_module.KeptPartials(budget=1 << 20)
    monkeypatch.setattr(job_module, "kept_partials", kept)
    store = PartialStore()
    parts, frames = _parts(store, 6)
    for p, frame in zip(parts[:3], frames[:3], strict=True):
        assert kept.keep(p.version_id, p.partial_sha256, frame)
    # WHEN the publish loads the parts' partials
    loaded = list(_loading(store, parts))
    # THEN the kept ones come from memory (and are given up), the rest from the store
    assert store.gets == 3
    assert [t is f for t, f in zip(loaded, frames, strict=True)] == [True] * 3 + [False] * 3
    for got, want in zip(loaded, frames, strict=True):
        pd.testing.assert_frame_equal(got.to_pandas(), want.to_pandas())
    assert kept.take(parts[0].version_id, parts[0].partial_sha256) is None


def test_a_kept_partial_is_used_only_for_the_version_and_sha256_the_registry_names(monkeypatch) -> None:
    kept = job_module.KeptPartials(budget=1 << 20)
    monkeypatch.setattr(job_module, "kept_partials", kept)
    store = PartialStore()
    parts, frames = _parts(store, 2)
    # GIVEN kept tables whose part version or partial no longer match the registry's entry
    # (the part changed while its task ran: the registry records the newer partial)
    kept.keep("v-older", parts[0].partial_sha256, frames[1])
    kept.keep(parts[1].version_id, "0" * 64, frames[0])
    # WHEN the publish loads the partials THEN both come from the store, checked
    loaded = list(_loading(store, parts))
    assert store.gets == 2
    for got, want in zip(loaded, frames, strict=True):
        pd.testing.assert_frame_equal(got.to_pandas(), want.to_pandas())


def test_kept_partials_stay_within_their_budget_and_go_when_cleared() -> None:
    rows = {"id": range(100), "value1": 1.0, "value2": 2.0, "value3": 3.0, "category": range(100)}
    table = partial_from_frame(pd.DataFrame(rows), C)
    size = table_bytes(table)
    kept = job_module.KeptPartials(budget=2 * size)
    # GIVEN a budget of two tables: a third is not kept (its partial is fetched instead)
    assert kept.keep("v1", "a", table) and kept.keep("v2", "b", table)
    assert not kept.keep("v3", "c", table)
    # a table given up frees its share of the budget
    assert kept.take("v1", "a") is table
    assert kept.keep("v3", "c", table)
    # WHEN the round ends THEN nothing stays in memory
    kept.clear()
    assert kept.take("v2", "b") is None and kept.take("v3", "c") is None
    assert kept.keep("v4", "d", table) and kept.keep("v5", "e", table)


def test_fetching_ahead_is_bounded_by_bytes_once_the_partials_size_is_known(monkeypatch) -> None:
    # GIVEN partials far larger than the fetch budget (here: a budget of 1.5 partials)
    store = PartialStore()
    parts, frames = _parts(store, 12)
    monkeypatch.setattr(job_module, "_FETCH_BYTES", table_bytes(frames[0]) * 3 // 2)
    loading = _loading(store, parts)
    # WHEN the merge takes them one by one
    got = []
    for i in range(12):
        got.append(next(loading))
        # THEN no more than one partial beyond the one taken was ever fetched
        assert store.gets <= i + 2, (i, store.gets)
    assert list(loading) == [] and store.gets == 12
    for a, b in zip(got, frames, strict=True):
        pd.testing.assert_frame_equal(a.to_pandas(), b.to_pandas())


def _checked_get(body: bytes, checksum: str, algorithm: str = "sha256") -> dict[str, Any]:
    """A GetObject response as botocore gives it for an object with a full-object checksum
    (ChecksumMode ENABLED): a body that checks the bytes against ``checksum`` as read."""
    from botocore.httpchecksum import _CHECKSUM_CLS, StreamingChecksumBody

    stream = StreamingChecksumBody(io.BytesIO(body), len(body), _CHECKSUM_CLS[algorithm](), checksum)
    return {"Body": stream, "ContentLength": len(body), f"Checksum{algorithm.upper()}": checksum}


def _b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def test_a_full_object_sha256_that_botocore_checks_is_the_bodys_sha256() -> None:
    body = b"id,value1,value2,value3,category\n1,2.0,3.0,4.0,5\n"
    assert (
        job_module.verified_sha256(_checked_get(body, _b64_sha256(body))) == hashlib.sha256(body).hexdigest()
    )
    # Not the whole body's SHA-256, or nothing checks the bytes against it: None
    composite = _b64_sha256(body) + "-3"  # a multipart upload's checksum of checksums
    assert job_module.verified_sha256(_checked_get(body, composite)) is None
    assert job_module.verified_sha256(_checked_get(body, "AAAAAA==", "crc32")) is None
    unchecked = {"Body": io.BytesIO(body), "ChecksumSHA256": _b64_sha256(body)}
    assert job_module.verified_sha256(unchecked) is None
    assert job_module.verified_sha256({"Body": io.BytesIO(body)}) is None


class _PartStore:
    """get_object over one part version as botocore would return it; records the PUTs."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response
        self.gets: list[dict[str, Any]] = []
        self.puts: list[dict[str, Any]] = []

    def get_object(self, **kwargs: Any) -> dict[str, Any]:
        self.gets.append(kwargs)
        return self.response

    def put_object(self, **kwargs: Any) -> dict[str, Any]:
        self.puts.append(kwargs)
        return {}


def _compute(monkeypatch: pytest.MonkeyPatch, store: _PartStore) -> tuple[dict[str, Any], list[Any]]:
    """compute_partial of one part version from store; its result and the digests the
    task's read_body was given (None: the task took no SHA-256 of its own)."""
    digests: list[Any] = []
    real_read_body = parse_module.read_body

    def read_body(stream: Any, size: Any, digest: Any = None) -> Any:
        digests.append(digest)
        return real_read_body(stream, size, digest)

    monkeypatch.setattr(job_module, "_process_aws", SimpleNamespace(s3=store))
    monkeypatch.setattr(parse_module, "read_body", read_body)  # part_result imports it when it runs
    task = job_module.PartialTask("bucket", "key-arn", DATASET, f"incoming/{DATASET}/part-0.csv", "v1", C)
    return job_module.compute_partial(task), digests


def test_a_part_with_a_checked_sha256_is_hashed_once_and_recorded_with_it(monkeypatch) -> None:
    from s3rollup.demo import generate_part, to_csv_bytes

    body = to_csv_bytes(generate_part(0, 300, 42))
    # GIVEN a part whose GET checks the body against its full-object SHA-256
    store = _PartStore(_checked_get(body, _b64_sha256(body)))
    result, digests = _compute(monkeypatch, store)
    # THEN the GET asks for the checksum, botocore's check is the only hash of the body,
    # and the result and the stored partial are those of the body
    assert store.gets[0]["ChecksumMode"] == "ENABLED"
    assert digests == [None]
    assert result["sha256"] == hashlib.sha256(body).hexdigest()
    assert result["rows"] == 300 and len(store.puts) == 1


def test_a_part_without_a_checked_sha256_is_hashed_by_the_task(monkeypatch) -> None:
    from s3rollup.demo import generate_part, to_csv_bytes

    body = to_csv_bytes(generate_part(0, 300, 42))
    crc = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
    # GIVEN a part uploaded with the SDK's default checksum (CRC32), which botocore checks
    result, digests = _compute(monkeypatch, _PartStore(_checked_get(body, crc, "crc32")))
    # THEN the task takes the SHA-256 the audit records itself
    assert digests[0] is not None
    assert result["sha256"] == hashlib.sha256(body).hexdigest()


def test_a_body_that_differs_from_its_sha256_fails_the_task_and_stores_nothing(monkeypatch) -> None:
    from botocore.exceptions import FlexibleChecksumError

    from s3rollup.demo import generate_part, to_csv_bytes

    body = to_csv_bytes(generate_part(0, 300, 42))
    # GIVEN bytes that arrive other than S3's SHA-256 of the version says
    store = _PartStore(_checked_get(body, _b64_sha256(body + b"\n")))
    # THEN the task fails (the job retries it) and no partial is stored
    with pytest.raises(FlexibleChecksumError):
        _compute(monkeypatch, store)
    assert store.puts == []
