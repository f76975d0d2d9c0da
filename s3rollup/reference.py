"""The reference analysis s3rollup started from, and its generalisation to any contract.

These run pandas over all rows at once: they are the correctness oracle for the
incremental path in ``s3rollup.stats``, not the way results are produced.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from s3rollup.contract import Contract


def complex_operation(df: pd.DataFrame) -> pd.DataFrame:
    """The seed analysis: per category mean/std/min/max of value1..3 plus ``combined``."""
    result = df.groupby("category").agg(
        {
            "value1": ["mean", "std", "min", "max"],
            "value2": ["mean", "std", "min", "max"],
            "value3": ["mean", "std", "min", "max"],
        }
    )
    # The seed wrote result['combined']; pandas 3 deprecates that partial key on
    # MultiIndex columns. The full key ('combined', '') is the same column.
    result[("combined", "")] = (
        result[("value1", "mean")] * result[("value2", "std")]
        + result[("value3", "max")]
        - result[("value1", "min")]
    )
    return result


def reference_for(df: pd.DataFrame, contract: Contract) -> pd.DataFrame:
    """The seed analysis for any contract, in the seed's shape (pandas over all rows)."""
    keys = list(contract.group_by)
    grouper: str | list[str] = keys[0] if len(keys) == 1 else keys
    result = df.groupby(grouper).agg({v: list(contract.statistics) for v in contract.values})
    for d in contract.derived:
        result[(d.name, "")] = d.evaluate(lambda f: result[f])
    return result


def compare_frames(got: pd.DataFrame, expected: pd.DataFrame, rtol: float = 1e-9) -> list[str]:
    """Differences between two results in the reference shape: groups, NaN positions, and
    values beyond rtol (relative, no absolute slack). Empty when they agree."""
    if list(got.index) != list(expected.index):
        missing = len(set(expected.index) - set(got.index))
        extra = len(set(got.index) - set(expected.index))
        return [f"groups differ: {missing} missing, {extra} unexpected"]
    problems = []
    for col in expected.columns:
        name = "/".join(str(c) for c in (col if isinstance(col, tuple) else (col,)) if c)
        if col not in got.columns:
            problems.append(f"{name}: missing")
            continue
        a = got[col].to_numpy(dtype=float)
        b = expected[col].to_numpy(dtype=float)
        nan_a, nan_b = np.isnan(a), np.isnan(b)
        if (nan_a != nan_b).any():
            problems.append(f"{name}: NaN in different groups")
            continue
        ok = np.isclose(a[~nan_a], b[~nan_b], rtol=rtol, atol=0.0)
        if not ok.all():
            rel = np.max(np.abs(a[~nan_a] - b[~nan_b]) / np.maximum(np.abs(b[~nan_b]), 1e-300))
            problems.append(f"{name}: {int((~ok).sum())} groups differ beyond {rtol:g} (max rel {rel:.1e})")
    return problems
