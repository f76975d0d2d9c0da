"""Partials, their merge and finalisation agree with the reference analysis (pandas)."""

from __future__ import annotations

import io
import itertools
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s3rollup import native, stats
from s3rollup.contract import DEFAULT_CONTRACT, Contract, parse_derived
from s3rollup.reference import complex_operation, reference_for
from s3rollup.stats import (
    ROWS,
    finalize,
    merge_partials,
    partial_columns,
    partial_from_frame,
    partial_to_parquet,
    table_from_parquet,
    table_to_parquet,
    to_reference_shape,
)

C = DEFAULT_CONTRACT


@pytest.fixture(autouse=True, params=["native", "native-lanes", "pandas"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs on each kernel: the native ones (four values at a time where the
    CPU has AVX2, and one at a time) and pandas' (their fallback)."""
    if request.param == "pandas":
        monkeypatch.setattr(native, "LIB", None)
    elif native.LIB is None:
        pytest.skip("librollup.so is not loaded")
    elif request.param == "native-lanes":
        monkeypatch.setattr(native, "use_vector", False)
    return str(request.param)


def seed_complex_operation(df: pd.DataFrame) -> pd.DataFrame:
    # The seed's code verbatim (pandas 3 warns about its partial column key).
    result = df.groupby("category").agg(
        {
            "value1": ["mean", "std", "min", "max"],
            "value2": ["mean", "std", "min", "max"],
            "value3": ["mean", "std", "min", "max"],
        }
    )
    result["combined"] = (
        result[("value1", "mean")] * result[("value2", "std")]
        + result[("value3", "max")]
        - result[("value1", "min")]
    )
    return result


def seed_frame(rng: np.random.Generator, n: int, groups: int = 50) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": np.arange(n),
            "value1": rng.standard_normal(n),
            "value2": rng.standard_normal(n) * 10 + 3,
            "value3": rng.standard_normal(n),
            "category": rng.integers(0, groups, n),
        }
    )


def split(df: pd.DataFrame, rng: np.random.Generator, parts: int) -> list[pd.DataFrame]:
    cuts = np.sort(rng.integers(0, len(df) + 1, parts - 1))
    bounds = [0, *cuts.tolist(), len(df)]
    return [df.iloc[a:b] for a, b in itertools.pairwise(bounds)]


def rollup(parts: list[pd.DataFrame], contract: Contract = C) -> pd.DataFrame:
    merged = merge_partials([partial_from_frame(p, contract) for p in parts], contract)
    return to_reference_shape(finalize(merged, contract), contract)


def assert_matches(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Same groups and columns; NaN exactly where expected; values within rtol 1e-9."""
    assert list(actual.columns) == list(expected.columns)
    pd.testing.assert_index_equal(actual.index, expected.index)
    a = actual.to_numpy(dtype=np.float64)
    e = expected.to_numpy(dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(e))
    nonzero = ~np.isnan(e) & (e != 0)
    np.testing.assert_allclose(a[nonzero], e[nonzero], rtol=1e-9, atol=0)
    # Where the reference is exactly zero a relative bound means nothing.
    np.testing.assert_allclose(a[e == 0], 0.0, rtol=0, atol=1e-12)


# ---- the reference ----------------------------------------------------------------------


def test_complex_operation_equals_the_seed_code() -> None:
    # GIVEN a seed-shaped frame
    df = seed_frame(np.random.default_rng(1), 2_000)
    # WHEN the module's reference and the seed's verbatim code run on it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = seed_complex_operation(df)
    # THEN they agree bit for bit
    pd.testing.assert_frame_equal(complex_operation(df), expected, check_exact=True)


def test_reference_for_default_contract_equals_complex_operation() -> None:
    df = seed_frame(np.random.default_rng(2), 2_000)
    pd.testing.assert_frame_equal(reference_for(df, C), complex_operation(df), check_exact=True)


def test_reference_for_evaluates_negative_and_multi_factor_terms() -> None:
    # GIVEN a derived column with a leading minus and a three-factor product
    contract = Contract(
        columns=C.columns,
        group_by=C.group_by,
        values=C.values,
        derived=(parse_derived("d", "-value1.max + value2.mean * value3.std * value1.min"),),
    )
    df = seed_frame(np.random.default_rng(3), 500)
    # WHEN the reference computes it
    got = reference_for(df, contract)[("d", "")]
    # THEN it is the expression evaluated left to right
    r = complex_operation(df)
    want = -r[("value1", "max")] + r[("value2", "mean")] * r[("value3", "std")] * r[("value1", "min")]
    np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())


# ---- partials ---------------------------------------------------------------------------


def test_partial_has_keys_rows_then_value_fields_with_fixed_dtypes() -> None:
    p = partial_from_frame(seed_frame(np.random.default_rng(4), 300), C)
    assert p.column_names == partial_columns(C)
    assert p.column_names[:2] == ["category", ROWS]
    assert p.schema.field("category").type == pa.int64() and p.schema.field(ROWS).type == pa.int64()
    assert p.schema.field("value1__count").type == pa.int64()
    assert all(p.schema.field(f"value2__{f}").type == pa.float64() for f in ("mean", "m2", "min", "max"))
    keys = p.column("category").to_numpy()
    assert (np.diff(keys) > 0).all()


def test_partial_of_empty_frame_is_empty_with_the_same_columns_and_types() -> None:
    full = partial_from_frame(seed_frame(np.random.default_rng(5), 10), C)
    empty = partial_from_frame(seed_frame(np.random.default_rng(5), 0), C)
    assert empty.num_rows == 0
    assert empty.schema == full.schema


def test_partial_counts_only_non_nan_values_and_all_rows() -> None:
    df = pd.DataFrame(
        {
            "id": [1, 2, 3],
            "value1": [1.0, np.nan, 3.0],
            "value2": [np.nan, np.nan, np.nan],
            "value3": [1.0, 2.0, 3.0],
            "category": [7, 7, 7],
        }
    )
    p = partial_from_frame(df, C).to_pandas().iloc[0]
    assert p[ROWS] == 3 and p["value1__count"] == 2 and p["value2__count"] == 0
    assert p["value1__mean"] == 2.0 and p["value1__m2"] == 2.0
    assert np.isnan(p["value2__mean"]) and np.isnan(p["value2__m2"]) and np.isnan(p["value2__min"])


def test_whole_frame_partial_finalizes_to_the_reference() -> None:
    df = seed_frame(np.random.default_rng(6), 20_000, groups=1000)
    assert_matches(rollup([df]), complex_operation(df))


# ---- merging ----------------------------------------------------------------------------


def test_merged_parts_match_reference_with_nan_cells() -> None:
    # GIVEN a frame where a fifth of the value cells are NaN, split into parts
    rng = np.random.default_rng(7)
    df = seed_frame(rng, 5_000)
    for v in C.values:
        df.loc[rng.random(len(df)) < 0.2, v] = np.nan
    # WHEN the parts' partials are merged and finalised
    got = rollup(split(df, rng, 7))
    # THEN the result is the reference over all rows
    assert_matches(got, complex_operation(df))


def test_merged_parts_match_reference_with_single_row_groups() -> None:
    # GIVEN groups of one row (std undefined) next to larger groups
    rng = np.random.default_rng(8)
    df = pd.concat([seed_frame(rng, 2_000), seed_frame(rng, 5).assign(category=[100 + i for i in range(5)])])
    expected = complex_operation(df)
    assert expected.loc[100:, ("value1", "std")].isna().all()
    # THEN merged partials agree, NaN std included
    assert_matches(rollup(split(df, rng, 4)), expected)


def test_merged_parts_match_reference_with_an_empty_part() -> None:
    rng = np.random.default_rng(9)
    df = seed_frame(rng, 3_000)
    parts = [df.iloc[:1000], df.iloc[0:0], df.iloc[1000:]]
    assert_matches(rollup(parts), complex_operation(df))


def test_merged_parts_match_reference_with_a_group_in_one_part_only() -> None:
    rng = np.random.default_rng(10)
    first = seed_frame(rng, 2_000)
    second = seed_frame(rng, 2_000).assign(category=lambda d: np.where(d.index % 3 == 0, 999, d.category))
    df = pd.concat([first, second], ignore_index=True)
    assert (first["category"] != 999).all()
    assert_matches(rollup([first, second]), complex_operation(df))


def test_merged_parts_match_reference_with_an_all_nan_column_in_a_group() -> None:
    # GIVEN a group whose value2 is NaN in every part
    rng = np.random.default_rng(11)
    df = seed_frame(rng, 3_000)
    df.loc[df["category"] == 4, "value2"] = np.nan
    expected = complex_operation(df)
    assert np.isnan(expected.loc[[4], "value2"].to_numpy(dtype=np.float64)).all()
    # THEN the merged result has the same NaN statistics and derived value
    assert_matches(rollup(split(df, rng, 5)), expected)


def test_merging_one_partial_returns_it_unchanged() -> None:
    p = partial_from_frame(seed_frame(np.random.default_rng(12), 5_000), C)
    pd.testing.assert_frame_equal(merge_partials([p], C).to_pandas(), p.to_pandas(), check_exact=True)


def test_merge_is_independent_of_partial_order() -> None:
    rng = np.random.default_rng(13)
    partials = [partial_from_frame(p, C) for p in split(seed_frame(rng, 4_000), rng, 6)]
    forward = finalize(merge_partials(partials, C), C)
    backward = finalize(merge_partials(partials[::-1], C), C)
    pd.testing.assert_frame_equal(forward.to_pandas(), backward.to_pandas(), check_exact=False, rtol=1e-12)


def test_merges_of_merges_equal_one_merge() -> None:
    rng = np.random.default_rng(14)
    partials = [partial_from_frame(p, C) for p in split(seed_frame(rng, 4_000), rng, 6)]
    nested = merge_partials([merge_partials(partials[:2], C), merge_partials(partials[2:], C)], C)
    pd.testing.assert_frame_equal(
        nested.to_pandas(), merge_partials(partials, C).to_pandas(), check_exact=False, rtol=1e-12
    )


def test_many_partials_merge_a_chunk_at_a_time_and_match_the_reference(monkeypatch) -> None:
    # GIVEN 40 parts (NaN cells, a group in one part only) as a generator of partials
    rng = np.random.default_rng(41)
    df = seed_frame(rng, 6_000, groups=60)
    df.loc[df.index % 11 == 0, "value2"] = np.nan
    df.loc[df.index[-1], "category"] = 999  # a single-row group, in the last part only
    parts = split(df, rng, 40)
    produced = 0

    def partials():
        nonlocal produced
        for p in parts:
            produced += 1
            yield partial_from_frame(p, C)

    sizes: list[tuple[int, int]] = []
    merge_frames = stats._merge_tables

    def recording(frames, contract):
        sizes.append((len(frames), produced))
        return merge_frames(frames, contract)

    monkeypatch.setattr(stats, "_merge_tables", recording)
    # WHEN they are merged
    merged = merge_partials(partials(), C)
    # THEN no merge holds more than one chunk and the merge so far, the generator is read
    # only as far as the merge has come, and the result is the reference's
    chunk = stats._MERGE_CHUNK
    assert len(sizes) == -(-40 // chunk)
    assert all(n <= chunk + 1 for n, _ in sizes)
    assert [seen for _, seen in sizes] == [min(40, chunk * (i + 1)) for i in range(len(sizes))]
    assert_matches(to_reference_shape(finalize(merged, C), C), complex_operation(df))


def test_merge_chunks_are_bounded_by_bytes_too(monkeypatch) -> None:
    # GIVEN partials each larger than the merge's byte budget
    df = seed_frame(np.random.default_rng(6), 2_000)
    parts = [partial_from_frame(df.iloc[i : i + 200], C) for i in range(0, 2_000, 200)]
    monkeypatch.setattr(stats, "_MERGE_BYTES", stats.table_bytes(parts[0]) // 2)
    sizes: list[int] = []
    merge_frames = stats._merge_tables

    def recording(frames, contract):
        sizes.append(len(frames))
        return merge_frames(frames, contract)

    monkeypatch.setattr(stats, "_merge_tables", recording)
    # WHEN they are merged
    merged = merge_partials(iter(parts), C)
    # THEN each merge takes one new partial onto the merge so far, and the result is the reference's
    assert sizes == [1] + [2] * 9
    assert_matches(to_reference_shape(finalize(merged, C), C), complex_operation(df))


def test_merge_of_zero_partials_is_an_empty_partial() -> None:
    merged = merge_partials([], C)
    assert merged.num_rows == 0 and merged.column_names == partial_columns(C)


def test_constant_group_has_exact_mean_and_zero_std() -> None:
    df = pd.DataFrame(
        {
            "id": range(3),
            "value1": [0.1] * 3,
            "value2": [0.1] * 3,
            "value3": [0.7] * 3,
            "category": [1] * 3,
        }
    )
    got = finalize(
        merge_partials([partial_from_frame(df.iloc[:1], C), partial_from_frame(df.iloc[1:], C)], C),
        C,
    ).to_pandas()
    assert got.loc[0, "value1_mean"] == 0.1 and got.loc[0, "value1_std"] == 0.0


def test_large_offsets_keep_full_precision() -> None:
    # Sum-of-squares shortcuts lose ~12 digits at a 1e6 offset; the two-pass M2 must not.
    # (At 1e9 even pandas, i.e. Welford, is off by ~1e-8 from the exact std.)
    rng = np.random.default_rng(15)
    df = seed_frame(rng, 10_000).assign(value1=lambda d: 1e6 + d.value1, value3=lambda d: -1e7 * d.value3)
    assert_matches(rollup(split(df, rng, 5)), complex_operation(df))


def test_infinite_values_follow_pandas() -> None:
    df = pd.DataFrame(
        {
            "id": range(6),
            "value1": [np.inf, 1.0, np.inf, -np.inf, np.nan, 2.0],
            "value2": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            "value3": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            "category": [1, 1, 2, 2, 3, 3],
        }
    )
    assert_matches(rollup([df.iloc[:3], df.iloc[3:]]), complex_operation(df))


# ---- keys ---------------------------------------------------------------------------------


def test_wide_sparse_integer_keys_match_reference() -> None:
    rng = np.random.default_rng(16)
    df = seed_frame(rng, 3_000).assign(category=lambda d: d.category * 10**12 - 5)
    assert_matches(rollup(split(df, rng, 3)), complex_operation(df))


def test_string_and_multiple_keys_match_reference_for() -> None:
    # GIVEN a contract grouping by a string and an integer key
    contract = Contract(
        columns={"region": "string", "year": "int64", "x": "float64", "y": "float64"},
        group_by=("region", "year"),
        values=("x", "y"),
        derived=(parse_derived("xy", "x.mean * y.max - y.min"),),
    )
    rng = np.random.default_rng(17)
    n = 3_000
    df = pd.DataFrame(
        {
            "region": pd.Series(rng.choice(["north", "south", "east", "Ä"], n), dtype="str"),
            "year": rng.integers(2019, 2025, n),
            "x": rng.standard_normal(n),
            "y": rng.standard_normal(n),
        }
    )
    # WHEN parts are rolled up
    got = rollup(split(df, rng, 4), contract)
    # THEN the result is the generalised reference
    assert_matches(got, reference_for(df, contract))


def test_rows_with_null_group_keys_are_dropped_like_pandas() -> None:
    contract = Contract(columns={"k": "string", "x": "float64"}, group_by=("k",), values=("x",))
    df = pd.DataFrame({"k": pd.Series(["a", None, "b", "a", None], dtype="str"), "x": [1.0, 2, 3, 4, 5]})
    got = rollup([df.iloc[:2], df.iloc[2:]], contract)
    assert_matches(got, reference_for(df, contract))


def test_a_merge_leaves_out_a_partial_row_without_a_key_in_every_column() -> None:
    # GIVEN partials with a string key, one of them carrying a row whose key is missing (as a
    # partial written by hand or by another tool could), and a part with no rows
    contract = Contract(columns={"k": "string", "x": "float64"}, group_by=("k",), values=("x",))
    df = pd.DataFrame({"k": pd.Series(["a", "b", "a", "c"], dtype="str"), "x": [1.0, np.nan, 4, 8]})
    good = [partial_from_frame(df.iloc[:2], contract), partial_from_frame(df.iloc[2:], contract)]
    with_stray = good[1].to_pandas()
    with_stray.loc[len(with_stray)] = [None, 99, 99, 1e9, 0.0, 1e9, 1e9]
    stray = pa.Table.from_pandas(with_stray, preserve_index=False)
    assert stray.column("k").null_count == 1
    empty = partial_from_frame(df.iloc[0:0], contract)
    # WHEN they are merged
    got = merge_partials([good[0], empty, stray], contract)
    # THEN the row without a key counts nowhere, in no column: as if it had never been there
    pd.testing.assert_frame_equal(
        got.to_pandas(), merge_partials(good, contract).to_pandas(), check_exact=True
    )
    assert_matches(to_reference_shape(finalize(got, contract), contract), reference_for(df, contract))


def test_a_merge_leaves_out_a_partial_row_without_an_integer_key_and_keeps_the_key_type() -> None:
    # GIVEN the seed's partials, one of them with a row whose integer key is null
    df = seed_frame(np.random.default_rng(21), 400)
    good = [partial_from_frame(df.iloc[:200], C), partial_from_frame(df.iloc[200:], C)]
    rows = good[1].to_pylist()
    stray = pa.Table.from_pylist([*rows, {**rows[0], "category": None, ROWS: 7}], schema=good[1].schema)
    # WHEN they are merged
    got = merge_partials([good[0], stray], C)
    # THEN the row counts nowhere and the key stays int64
    assert got.schema == good[0].schema
    pd.testing.assert_frame_equal(got.to_pandas(), merge_partials(good, C).to_pandas(), check_exact=True)


def test_integer_value_columns_keep_integer_min_and_max() -> None:
    contract = Contract(columns={"k": "int64", "n": "int64"}, group_by=("k",), values=("n",))
    df = pd.DataFrame({"k": [1, 1, 2], "n": [3, 5, 7]})
    got = rollup([df], contract)
    expected = reference_for(df, contract)
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-12)


def test_partials_and_results_round_trip_through_parquet_exactly() -> None:
    # GIVEN partials and results with string and integer keys, integer values, NaN cells
    # (a group whose x is all NaN) and no rows at all
    contract = Contract(
        columns={"region": "string", "year": "int64", "x": "float64", "n": "int64"},
        group_by=("region", "year"),
        values=("x", "n"),
    )
    df = pd.DataFrame(
        {
            "region": pd.Series(["north", "Ä", "north", "south"], dtype="str"),
            "year": [2024, 2025, 2024, 2025],
            "x": [0.1, np.nan, 1e300, np.nan],
            "n": [3, 5, 7, -(2**62)],
        }
    )
    partial = partial_from_frame(df, contract)
    empty = partial_from_frame(df.iloc[:0], contract)
    # WHEN partials are written as partials (LZ4, no column statistics: only s3rollup reads
    # them, whole) and results as results (Snappy and statistics, for users' readers)
    written = [
        (partial, partial_to_parquet(partial), "LZ4", False),
        (empty, partial_to_parquet(empty), "LZ4", False),
        (finalize(partial, contract), table_to_parquet(finalize(partial, contract)), "SNAPPY", True),
        (finalize(empty, contract), table_to_parquet(finalize(empty, contract)), "SNAPPY", True),
    ]
    for table, data, codec, statistics in written:
        # THEN the job reads back the very table it wrote, and a user's pandas reads its rows
        back = table_from_parquet(data)
        assert back.schema == table.schema
        pd.testing.assert_frame_equal(back.to_pandas(), table.to_pandas(), check_exact=True)
        pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(data)), table.to_pandas(), check_exact=True)
        meta = pq.ParquetFile(pa.BufferReader(data)).metadata
        chunks = [
            meta.row_group(g).column(c) for g in range(meta.num_row_groups) for c in range(meta.num_columns)
        ]
        assert {c.compression.replace("_RAW", "") for c in chunks} <= {codec}
        assert all(c.is_stats_set == statistics for c in chunks if c.num_values)


# ---- finalisation -----------------------------------------------------------------------


def test_finalize_lists_keys_rows_statistics_then_derived() -> None:
    final = finalize(partial_from_frame(seed_frame(np.random.default_rng(18), 500), C), C)
    stats_cols = [f"{v}_{s}" for v in C.values for s in C.statistics]
    assert final.column_names == ["category", "rows", *stats_cols, "combined"]
    assert final.schema.field("rows").type == pa.int64() and final.column("rows").to_numpy().sum() == 500


def test_min_group_size_drops_small_groups() -> None:
    # GIVEN a contract that publishes only groups of at least 5 rows
    contract = Contract(
        columns=C.columns, group_by=C.group_by, values=C.values, derived=C.derived, min_group_size=5
    )
    rng = np.random.default_rng(19)
    df = pd.concat([seed_frame(rng, 1_000, groups=10), seed_frame(rng, 4).assign(category=77)])
    # WHEN the parts are rolled up
    got = rollup(split(df, rng, 3), contract)
    # THEN the 4-row group is gone and the others are the reference
    expected = complex_operation(df)
    assert 77 in expected.index and 77 not in got.index
    assert_matches(got, expected.drop(index=77))


def test_finalize_on_zero_partials_is_an_empty_table_with_all_columns() -> None:
    final = finalize(merge_partials([], C), C)
    assert final.num_rows == 0
    assert final.column_names[:2] == ["category", "rows"] and "combined" in final.column_names
    shaped = to_reference_shape(final, C)
    assert len(shaped) == 0 and list(shaped.columns) == list(
        complex_operation(seed_frame(np.random.default_rng(0), 5)).columns
    )


def test_to_reference_shape_has_the_seed_columns_and_index() -> None:
    df = seed_frame(np.random.default_rng(20), 1_000)
    got = rollup([df])
    expected = complex_operation(df)
    assert got.columns.equals(expected.columns)
    assert got.index.equals(expected.index) and got.index.name == "category"


# ---- property -----------------------------------------------------------------------------

# Dyadic values (k/8) keep every partial sum exact, so any difference from pandas would
# be the algorithm's, not rounding noise amplified by cancellation.
_values = st.one_of(st.integers(-8_000, 8_000).map(lambda k: k / 8), st.just(float("nan")))


@st.composite
def frames_and_cuts(draw: st.DrawFn) -> tuple[pd.DataFrame, list[int]]:
    n = draw(st.integers(0, 60))
    cats = draw(st.lists(st.integers(-3, 5), min_size=n, max_size=n))
    cols = {v: draw(st.lists(_values, min_size=n, max_size=n)) for v in C.values}
    df = pd.DataFrame(
        {"id": np.arange(n), **{v: np.array(c, dtype=np.float64) for v, c in cols.items()}}
    ).assign(category=np.array(cats, dtype=np.int64))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=5)))
    return df, cuts


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(frames_and_cuts())
def test_property_merged_random_parts_finalize_to_reference(
    case: tuple[pd.DataFrame, list[int]],
) -> None:
    df, cuts = case
    bounds = [0, *cuts, len(df)]
    parts = [df.iloc[a:b] for a, b in itertools.pairwise(bounds)]
    got = rollup(parts)
    expected = complex_operation(df)
    if len(df) == 0:
        assert len(got) == 0
        return
    assert_matches(got, expected)


def test_table_bytes_counts_the_columns_buffers() -> None:
    # GIVEN a partial of the seed's contract: an int64 key, rows, and per value an int64
    # count and four float64 moments, none of them null
    partial = partial_from_frame(seed_frame(np.random.default_rng(7), 300), C)
    groups = partial.num_rows
    # THEN its size is 8 bytes a cell: what the merge's byte budget weighs
    assert stats.table_bytes(partial) == groups * 8 * (2 + 5 * len(C.values))
    assert stats.table_bytes(partial.slice(0, 0)) == 0
