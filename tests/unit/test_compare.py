"""The oracle check itself: it must report what differs, not just run."""

from __future__ import annotations

import numpy as np
import pandas as pd

from s3rollup.demo import generate_part
from s3rollup.reference import compare_frames, complex_operation


def _reference() -> pd.DataFrame:
    return complex_operation(generate_part(0, 2000, seed=3))


def test_identical_results_agree() -> None:
    assert compare_frames(_reference(), _reference()) == []


def test_a_value_off_by_more_than_1e9_relative_is_reported() -> None:
    got = _reference()
    got.iloc[5, 0] *= 1 + 2e-9
    assert compare_frames(got, _reference()) == [
        "value1/mean: 1 groups differ beyond 1e-09 (max rel 2.0e-09)"
    ]


def test_a_moved_nan_a_missing_group_and_a_missing_column_are_reported() -> None:
    got = _reference()
    got.iloc[0, 1] = np.nan  # group 0 has several rows: its std is a number
    assert compare_frames(got, _reference()) == ["value1/std: NaN in different groups"]
    assert compare_frames(_reference().iloc[1:], _reference())[0].startswith("groups differ: 1 missing")
    assert compare_frames(_reference().drop(columns=[("combined", "")]), _reference()) == [
        "combined: missing"
    ]
