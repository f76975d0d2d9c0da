"""Load: many parts uploaded at once into one dataset, and many datasets at once, through the
whole embedded stack (S3 events, dispatcher, handler, local workers). Every part is counted
exactly once, one job at a time per dataset, every result equals pandas."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd
import pytest

from s3rollup.demo import generate_part
from tests.helpers import assert_result_is, put_version

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]


def _upload_concurrently(
    stack: Any, parts: list[tuple[str, pd.DataFrame]], threads: int = 16
) -> dict[str, tuple[str, pd.DataFrame]]:
    """PUT every (key, frame) from a thread pool, as many producers would; key -> (version, frame)."""
    with ThreadPoolExecutor(threads) as pool:
        versions = list(pool.map(lambda kf: put_version(stack, kf[0], kf[1]), parts))
    return {key: (v, frame) for (key, frame), v in zip(parts, versions, strict=True)}


def _report(what: str, parts: int, t0: float, t_up: float, t_pub: float) -> None:
    print(
        f"\n{what}: {parts} parts, uploaded in {t_up - t0:.1f}s, all published after"
        f" {t_pub - t0:.1f}s: {parts / (t_pub - t0):.1f} parts/s, upload->published lag"
        f" {t_pub - t_up:.1f}s"
    )


def test_100_parts_uploaded_at_once_into_one_dataset(stack: Any, dataset: str) -> None:
    parts = [(f"incoming/{dataset}/p{i:03d}.csv", generate_part(i, 2000, seed=41)) for i in range(100)]
    t0 = time.perf_counter()
    final = _upload_concurrently(stack, parts)
    t_up = time.perf_counter()
    assert_result_is(stack, dataset, final, timeout=300)
    _report("one dataset", len(parts), t0, t_up, time.perf_counter())


def test_10_datasets_at_once(stack: Any, dataset: str) -> None:
    datasets = [f"{dataset}-{d}" for d in range(10)]
    parts = [
        (f"incoming/{ds}/p{i:02d}.csv", generate_part(d * 10 + i, 1000, seed=43))
        for d, ds in enumerate(datasets)
        for i in range(10)
    ]
    t0 = time.perf_counter()
    final = _upload_concurrently(stack, parts)
    t_up = time.perf_counter()
    for ds in datasets:
        assert_result_is(stack, ds, {k: v for k, v in final.items() if k.startswith(f"incoming/{ds}/")}, 300)
    _report("10 datasets", len(parts), t0, t_up, time.perf_counter())
