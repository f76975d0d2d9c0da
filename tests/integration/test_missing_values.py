"""Parts that spell missing values as R, SQL exports and spreadsheets do (NA, null, N/A):
accepted by the Lambda and aggregated as pandas, the reference, reads them."""

from __future__ import annotations

import io
import json
from typing import Any

import pandas as pd
import pytest

from s3rollup.demo import compare, generate_part, to_csv_bytes
from s3rollup.reference import complex_operation
from tests.conftest import wait_for
from tests.helpers import audit_records, put_part, result_frame, wait_manifest

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def _spelled(index: int, rows: int, spellings: list[str]) -> bytes:
    """A seed part whose every 7th row has one value cell, and every 50th row its group key,
    spelled as one of ``spellings`` in turn."""
    lines = to_csv_bytes(generate_part(index, rows, seed=11)).decode().splitlines()
    for i in range(1, len(lines)):
        cells = lines[i].split(",")
        if i % 7 == 0:
            cells[1 + i % 3] = spellings[i % len(spellings)]
        if i % 50 == 0:
            cells[4] = spellings[i // 50 % len(spellings)]
        lines[i] = ",".join(cells)
    return ("\n".join(lines) + "\n").encode()


def test_a_part_with_na_null_and_n_a_cells_is_accepted_and_equals_pandas(stack: Any, dataset: str) -> None:
    # GIVEN two parts whose missing values are spelled NA, null and N/A (keys included)
    bodies = [_spelled(0, 3000, ["NA", "null", "N/A"]), _spelled(1, 2000, ["N/A", "NA", "null"])]
    # WHEN they are uploaded
    keys = {put_part(stack, dataset, f"part-{i}.csv", body) for i, body in enumerate(bodies)}
    # THEN both are accepted and aggregated (none quarantined) ...
    manifest = wait_manifest(stack, dataset, keys)
    assert not [r for r in audit_records(stack, dataset) if r["event"] == "PART_REJECTED"]
    # ... and the result is pandas' read_csv + complex_operation over the same bytes: the
    # spellings are NaN, and rows whose key is missing are in no group
    frames = [pd.read_csv(io.BytesIO(b)) for b in bodies]
    assert all(f["category"].isna().sum() == len(f) // 50 for f in frames)
    expected = complex_operation(pd.concat(frames, ignore_index=True))
    assert compare(result_frame(stack, dataset), expected, rtol=1e-9) == []
    assert manifest["rows"] == sum(int(f["category"].notna().sum()) for f in frames)
    # ... and the rows left out are never silent: each part's audit record counts them
    aggregated = {r["key"]: r for r in audit_records(stack, dataset) if r["event"] == "PART_AGGREGATED"}
    assert set(aggregated) == keys
    for i, f in enumerate(frames):
        record = aggregated[next(k for k in keys if k.endswith(f"part-{i}.csv"))]
        assert record["detail"] == {"rows_without_key": len(f) // 50}
        assert record["rows"] == int(f["category"].notna().sum())


def test_a_contract_without_a_spelling_has_its_parts_quarantined(stack: Any, dataset: str) -> None:
    # GIVEN a contract for which only an empty cell is a missing value
    contract = {
        "columns": {
            "id": "int64",
            "value1": "float64",
            "value2": "float64",
            "value3": "float64",
            "category": "int64",
        },
        "group_by": ["category"],
        "values": ["value1", "value2", "value3"],
        "na_values": [""],
        "keep_default_na": False,
    }
    bucket = stack.info.outputs["DataBucketName"]
    stack.aws.s3.put_object(
        Bucket=bucket, Key=f"contracts/{dataset}.json", Body=json.dumps(contract).encode()
    )
    # WHEN a part spelling one as NA arrives, next to a clean one
    good = put_part(stack, dataset, "good.csv", to_csv_bytes(generate_part(0, 500, seed=11)))
    put_part(stack, dataset, "na.csv", _spelled(1, 500, ["NA"]))
    # THEN it is quarantined with BAD_VALUE, and the clean part is published alone
    wait_manifest(stack, dataset, {good})

    def rejected() -> list[tuple[str, str]]:
        return [
            (r["key"], r["reason"]) for r in audit_records(stack, dataset) if r["event"] == "PART_REJECTED"
        ]

    assert wait_for(rejected) == [(f"incoming/{dataset}/na.csv", "BAD_VALUE")]
