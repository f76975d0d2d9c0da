"""The reference analysis s3rollup started from, and its generalisation to any contract.

These run pandas over all rows at once: they are the correctness oracle for the
incremental path in ``s3rollup.stats``, not the way results are produced.
"""

from __future__ import annotations

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
