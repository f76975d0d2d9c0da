"""The native kernels: built here, exact number conversion, and the same parts accepted and
the same partials as pyarrow's reader and pandas' kernels."""

from __future__ import annotations

import dataclasses
import gzip
import io
import itertools
import os
import random
import struct
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s3rollup import native, parse, stats
from s3rollup.contract import DEFAULT_CONTRACT, Contract
from s3rollup.parse import PartError, csv_groups, read_body, read_part
from s3rollup.stats import part_partial, partial_from_frame

C = DEFAULT_CONTRACT
HEADER = "id,value1,value2,value3,category\n"

needs_native = pytest.mark.skipif(native.LIB is None, reason="librollup.so is not loaded")


def test_the_native_kernels_are_built_and_loaded() -> None:
    # `make` builds librollup.so; S3ROLLUP_NATIVE=0 is the only way to run without it.
    if os.environ.get("S3ROLLUP_NATIVE") == "0":
        assert native.kernels() == "pandas"
    else:
        assert native.LIBRARY.is_file(), "run make: s3rollup/native/librollup.so is missing"
        assert native.kernels() == "native"


# ---- numbers ----------------------------------------------------------------------------


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _numbers(rng: random.Random, n: int) -> list[str]:
    """Decimal texts of every shape a writer produces, and the hard cases of rounding."""
    out = [
        "0",
        "-0",
        "0.0",
        "-0.0",
        "1",
        "-1",
        "0.1",
        "1e22",
        "1e23",
        "9007199254740993",
        "9007199254740995",
        "18014398509481985",
        "1.7976931348623157e308",
        "2.2250738585072014e-308",
        "123456789012345678",
        "1234567890123456789",
        "12345678901234567890",
        "0.000000000000000000001",
        "5e-324",
        "1.",
        ".5",
        "-.5",
        "00012.50",
        "1E+05",
        "1e-05",
        "4.35",
        "0.30471707975443135",
    ]
    out = [t for t in out if t not in ("5e-324",)]  # subnormal: left to pyarrow (tested below)
    for _ in range(n):
        kind = rng.randrange(7)
        if kind == 0:  # what pandas and Python write: shortest repr
            out.append(repr(rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30)))
        elif kind == 1:  # 15-20 significant digits, point anywhere
            digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(15, 20)))
            cut = rng.randint(0, len(digits))
            out.append(("-" if rng.random() < 0.5 else "") + (digits[:cut] or "0") + "." + digits[cut:])
        elif kind == 2:  # mantissa and exponent
            m = str(rng.randint(1, 10**19 - 1))
            out.append(f"{m[0]}.{m[1:]}e{rng.randint(-40, 40)}")
        elif kind == 3:  # exact midpoints between two doubles, written out in full
            x = rng.uniform(1, 2) * 2.0 ** rng.randint(-60, 60)
            mid = (Decimal(x) + Decimal(np.nextafter(x, np.inf))) / 2
            out.append(format(mid, "f") if abs(mid.adjusted()) < 25 else format(mid, "e"))
        elif kind == 4:  # integers around 2^53 and 2^64
            out.append(str(rng.choice([2**53, 2**54, 2**63, 10**18]) + rng.randint(-3, 3)))
        elif kind == 5:  # a midpoint cut to 2-20 significant digits: just off the tie, either side
            x = rng.uniform(1, 2) * 2.0 ** rng.randint(-90, 90)
            mid = (Decimal(x) + Decimal(np.nextafter(x, np.inf))) / 2
            out.append(format(mid, f".{rng.randint(1, 19)}e"))
        else:  # odd m x 10^q where a tie between two doubles can be exact: round to even
            out.append(f"{rng.randint(1, 2**54) * 2 + 1}e{rng.randint(-4, 23)}")
    return out


@needs_native
def test_csv_numbers_convert_to_the_correctly_rounded_double() -> None:
    texts = _numbers(random.Random(7), 30_000)
    body = HEADER + "".join(f"{i},{t},{t},{t},{i}\n" for i, t in enumerate(texts))
    pieces = csv_groups(body.encode(), C)
    assert pieces is not None, "the native parser left plain numbers to pyarrow"
    (groups,) = pieces
    order = np.argsort(groups.keys)
    parsed = groups.min[order, 0]  # a one-row group: its min is the value, -0.0 kept
    wrong = [t for t, got in zip(texts, parsed, strict=True) if _bits(float(got)) != _bits(float(t))]
    assert wrong == []


def test_the_powers_of_five_table_is_what_its_comment_says() -> None:
    # The Eisel-Lemire table in rollup.c: 5^q to 128 bits, the top bit set; q >= 0 exact,
    # q < 0 rounded up. A wrong low word changes few results, so it is checked here.
    import re

    source = (native.LIBRARY.parent / "rollup.c").read_text()
    rows = re.findall(r"\{0x([0-9a-f]{16})ull, 0x([0-9a-f]{16})ull\}, /\* (-?\d+) \*/", source)
    table = {int(q): (int(hi, 16) << 64) | int(lo, 16) for hi, lo, q in rows}
    assert sorted(table) == list(range(-27, 28))
    for q, c in table.items():
        if q >= 0:
            expected = 5**q << (128 - (5**q).bit_length())
        else:
            z = (5**-q - 1).bit_length()
            expected = 2 ** (z + 127) // 5**-q + 1
        assert c == expected, q


@needs_native
@pytest.mark.parametrize(
    "cell", ["5e-324", "1e-310", "1e309", "-1e400", "inf", "+1", " 1", "1 ", "0x1", " NA", "na", '"NA"']
)
def test_cells_outside_the_plain_grammar_go_to_pyarrow(cell: str) -> None:
    body = f"{HEADER}0,{cell},1,1,7\n".encode()
    assert csv_groups(body, C) is None


_PANDAS_NA = sorted(DEFAULT_CONTRACT.na_values)


def test_the_default_missing_value_spellings_are_pandas_own() -> None:
    from pandas._libs.parsers import STR_NA_VALUES  # type: ignore[attr-defined]  # no stubs

    assert set(_PANDAS_NA) == set(STR_NA_VALUES)


@needs_native
@pytest.mark.parametrize("spelling", _PANDAS_NA)
def test_every_pandas_missing_value_spelling_is_nan_natively_as_in_pandas(spelling: str) -> None:
    # GIVEN a part whose value1 cell in the first row is the spelling, and whose key is it
    # in the last row
    body = f"{HEADER}0,{spelling},1,2,7\n1,0.5,1,2,7\n2,0.25,1,2,{spelling}\n".encode()
    # WHEN the native parser reads it THEN value1 is NaN there, the keyless row is in no
    # group, and pandas' read_csv + groupby says the same
    (groups,) = csv_groups(body, C) or pytest.fail("left to pyarrow")
    assert groups.keys.tolist() == [7] and groups.rows.tolist() == [2]
    assert groups.count[0].tolist() == [1, 2, 2] and groups.mean[0, 0] == 0.5
    expected = pd.read_csv(io.BytesIO(body)).groupby("category")["value1"].agg(["count", "mean"])
    assert expected.index.tolist() == [7.0] and expected.iloc[0].tolist() == [1, 0.5]


@needs_native
def test_a_contract_s_spellings_are_the_native_parser_s() -> None:
    narrow = dataclasses.replace(C, na_values=("", "NA"))
    body = f"{HEADER}0,NA,1,2,7\n1,null,1,2,7\n".encode()
    assert csv_groups(body, narrow) is None  # "null" is no missing value here: pyarrow rejects it
    with pytest.raises(PartError):
        part_partial(body, narrow, "csv")
    no_empty = dataclasses.replace(C, na_values=("NA",))
    assert csv_groups(f"{HEADER}0,,1,2,7\n".encode(), no_empty) is None
    extended = dataclasses.replace(C, na_values=(*C.na_values, "missing", "-999"))
    # A spelling that reads as a number would be a number to the native parser: pyarrow's.
    assert csv_groups(f"{HEADER}0,missing,1,2,7\n".encode(), extended) is None
    partial, rows = part_partial(f"{HEADER}0,missing,-999,2,7\n1,3,4,5,-999\n".encode(), extended, "csv")
    assert rows == 1 and partial.column("value1__count").to_pylist() == [0]
    assert partial.column("value2__count").to_pylist() == [0]


# ---- the native CSV path against pyarrow and pandas -------------------------------------


def _assert_same_partial(native_table: pa.Table, expected_table: pa.Table) -> None:
    native_partial, expected = native_table.to_pandas(), expected_table.to_pandas()
    assert list(native_partial.columns) == list(expected.columns)
    assert len(native_partial) == len(expected)
    for col in expected.columns:
        a, b = native_partial[col].to_numpy(), expected[col].to_numpy()
        if b.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=0, equal_nan=True, err_msg=col)
        else:
            assert a.tolist() == b.tolist(), col


_NUMBERS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64).map(repr),
    st.floats(-1e6, 1e6).map(lambda x: f"{x:.6f}"),
    st.integers(-(10**20), 10**20).map(str),
)
_ODD = st.sampled_from(
    [
        "",
        " ",
        "1.",
        ".5",
        "-.5",
        "-",
        "--1",
        "+1",
        "1e5",
        "1E+05",
        "1e",
        "e5",
        "nan",
        "NaN",
        "inf",
        "1 ",
        " 1",
        "1_0",
        "0x1f",
        '"1"',
        '1"',
        "00012",
        "-0",
        "1.5e-3",
        "1e99999",
        "é",
        "\t1",
        "1.0",
        "NA",
        "null",
        "N/A",
        "-1.#IND",
        "#N/A N/A",
        "None",
        "NaN",
        "-nan",
        "NAN",
        "N",
        "NA ",
    ]
)
_KEYS = st.one_of(st.integers(-5, 5).map(str), st.integers(-(10**19), 10**19).map(str))


def _mostly(usual: st.SearchStrategy[str], odd: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """One draw in ten from ``odd``: enough plain rows for whole parts to parse."""
    return st.integers(0, 9).flatmap(lambda i: odd if i == 0 else usual)


@st.composite
def _csv_bodies(draw: st.DrawFn) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        cells = [str(draw(st.integers(0, 10**6)))]  # id: not read, any text
        cells += [draw(_mostly(_NUMBERS, _ODD)) for _ in range(3)]
        cells.append(draw(_mostly(_KEYS, _ODD)))
        width = draw(_mostly(st.just(5), st.sampled_from([4, 6])))
        cells = [*cells, "1"][:width]
        lines.append(",".join(cells) + draw(_mostly(st.just("\n"), st.sampled_from(["\r\n", "\r", "\n\n"]))))
    body = HEADER + "".join(lines)
    if lines and draw(st.booleans()):
        body = body.rstrip("\r\n")
    return body.encode()


@needs_native
@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_csv_bodies())
def test_native_csv_accepts_only_what_pyarrow_accepts_with_the_same_partial(body: bytes) -> None:
    try:
        frame = read_part(body, C, "csv")
        expected: pa.Table | None = partial_from_frame(frame, C)
    except PartError:
        expected = None
    if csv_groups(body, C) is None:
        return  # left to pyarrow: part_partial then gives exactly read_part's answer
    assert expected is not None, "the native parser accepted a part that pyarrow rejects"
    partial, rows = part_partial(body, C, "csv")
    assert rows == len(frame)
    _assert_same_partial(partial, expected)


def _part(**columns: np.ndarray) -> pd.DataFrame:
    """A seed-schema part: ``id`` and the given value and key columns."""
    n = len(next(iter(columns.values())))
    return pd.DataFrame({"id": np.arange(n), **columns})


@needs_native
def test_a_seed_part_takes_the_native_path_and_equals_the_pyarrow_path() -> None:
    rng = np.random.default_rng(3)
    n = 20_000
    df = _part(
        value1=rng.standard_normal(n),
        value2=np.where(rng.random(n) < 0.1, np.nan, rng.standard_normal(n) * 1e6),
        value3=rng.standard_normal(n) * 1e-7,
        category=rng.integers(-500, 500, n),
    )
    body = df.to_csv(index=False).encode()
    assert csv_groups(body, C) is not None
    for data, fmt in [(body, "csv"), (gzip.compress(body), "csv.gz"), (body.replace(b"\n", b"\r\n"), "csv")]:
        partial, rows = part_partial(data, C, fmt)
        assert rows == n
        _assert_same_partial(partial, partial_from_frame(read_part(body, C), C))


@needs_native
@pytest.mark.parametrize("defer", [None, (0, 0), (4_096, 1 << 20)])
def test_many_groups_spread_over_int64_aggregate_as_pandas_does_on_every_native_path(
    monkeypatch, defer
) -> None:
    # GIVEN 30,001 rows (not a whole number of the kernels' batches) in about 12,000 groups
    # keyed over 0..2**40, so the hash table grows while a batch of rows is looked up: most
    # groups hold a few rows, some one; NaNs; a large offset; some rows without a key. Rows
    # never wait by partition (the library's default below 16,384 groups), or wait from the
    # first group on in the smallest buffers (taken in every few hundred rows), or from the
    # 4,096th group on.
    monkeypatch.setattr(native, "defer", defer)
    rng = np.random.default_rng(21)
    n = 30_001
    keys = rng.integers(0, 2**40, 12_000)[rng.integers(0, 12_000, n)]
    keys[-5:] = rng.integers(2**40, 2**41, 5)  # single-row groups, the last rows of the part
    category = pd.array(keys, dtype="Int64")
    category[rng.random(n) < 0.01] = pd.NA
    df = _part(
        value1=np.where(rng.random(n) < 0.3, np.nan, rng.standard_normal(n)),
        value2=rng.standard_normal(n) * 1e-3 + 1e6,
        value3=rng.standard_normal(n),
        category=category,
    )
    body = df.to_csv(index=False).encode()
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    assert csv_groups(body, C) is not None
    # WHEN the native CSV parser and the native key kernels (Parquet, in batches) aggregate it
    for data, fmt in [(body, "csv"), (buf.getvalue(), "parquet")]:
        monkeypatch.setattr(parse, "_PARQUET_BATCH_ROWS", 4_099)
        partial, rows = part_partial(data, C, fmt)
        # THEN the partial is pandas' kernels' over the same rows, keyless rows left out
        assert rows == n - int(pd.isna(category).sum())
        expected = partial_from_frame(read_part(body, C), C)
        assert len(expected) > 10_000 and (expected.column("__rows").to_numpy() == 1).any()
        _assert_same_partial(partial, expected)
        # ... with the same bits four values at a time and one at a time
        monkeypatch.setattr(native, "use_vector", False)
        lanes, _ = part_partial(data, C, fmt)
        monkeypatch.setattr(native, "use_vector", True)
        pd.testing.assert_frame_equal(lanes.to_pandas(), partial.to_pandas(), check_exact=True)


@needs_native
@pytest.mark.parametrize("batch_rows", [1 << 16, 999])
def test_parquet_parts_aggregate_on_the_key_column_as_the_frame_path_does(monkeypatch, batch_rows) -> None:
    monkeypatch.setattr(parse, "_PARQUET_BATCH_ROWS", batch_rows)  # 999: a part in 6 batches
    rng = np.random.default_rng(11)
    n = 5_000
    df = _part(
        value1=np.where(rng.random(n) < 0.2, np.nan, rng.standard_normal(n)),
        value2=rng.standard_normal(n),
        value3=np.full(n, 2.5),
        category=rng.integers(-3, 900, n).astype(np.int32),  # widened to int64
    )
    df.loc[4_000:, "category"] = 2_000_000_000  # from the fifth batch on, a span for the hash
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    body = memoryview(buf.getvalue())
    batches = list(parse.parquet_tables(body, C))
    assert [len(t) for t in batches] == [min(batch_rows, n - i) for i in range(0, n, batch_rows)]
    assert parse.table_groups(batches, C) is not None
    partial, rows = part_partial(body, C, "parquet")
    assert rows == n
    _assert_same_partial(partial, partial_from_frame(read_part(body, C, "parquet"), C))
    # Alone, the batches are decoded on another thread, in the same order: the same bits.
    alone, alone_rows = part_partial(body, C, "parquet", alone=True)
    assert alone_rows == n
    pd.testing.assert_frame_equal(alone.to_pandas(), partial.to_pandas(), check_exact=True)


@needs_native
@pytest.mark.parametrize("alone", [False, True])
def test_parquet_rows_with_a_null_key_are_left_out_in_every_batch(monkeypatch, alone) -> None:
    monkeypatch.setattr(parse, "_PARQUET_BATCH_ROWS", 100)
    keys = pd.array([i % 7 for i in range(1_000)], dtype="Int64")
    keys[[0, 99, 100, 733]] = pd.NA
    values = np.arange(1_000, dtype=np.float64)
    df = _part(value1=values, value2=values, value3=values, category=keys)
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    partial, rows = part_partial(buf.getvalue(), C, "parquet", alone)
    assert rows == 996
    kept = df.dropna(subset=["category"]).astype({"category": np.int64})
    _assert_same_partial(partial, partial_from_frame(kept, C))


@needs_native
@pytest.mark.parametrize("threads", [2, 3])
def test_a_part_computed_alone_is_parsed_in_pieces_that_merge_to_the_whole(monkeypatch, threads) -> None:
    rng = np.random.default_rng(5)
    n = 30_000
    lines = [
        f"{i},{rng.standard_normal()!r},{rng.standard_normal() * 1e3!r},,{rng.integers(0, 40)}"
        for i in range(n)
    ]
    body = (HEADER + "\n".join(lines) + "\n").encode()
    whole = partial_from_frame(read_part(body, C), C)
    monkeypatch.setattr(parse, "_PIECE_BYTES", 50_000)
    monkeypatch.setattr(stats, "available_cpus", lambda: threads)
    pieces = csv_groups(body, C, pieces=threads)
    assert pieces is not None and len(pieces) == threads
    assert sum(g.records for g in pieces) == n
    partial, rows = part_partial(body, C, "csv", alone=True)
    assert rows == n
    _assert_same_partial(partial, whole)
    # One record the fast parser leaves alone, in the last piece: the whole part falls back.
    odd = body[:-40] + body[-40:].replace(b",", b", ", 1)
    assert csv_groups(odd, C, pieces=threads) is None
    assert part_partial(odd, C, "csv", alone=True)[1] == n


@needs_native
def test_quoted_csv_falls_back_to_pyarrow_and_still_aggregates() -> None:
    body = (HEADER + '0,"1.5",2,3,7\n1,2.5,2,3,7\n').encode()
    assert csv_groups(body, C) is None
    partial, rows = part_partial(body, C, "csv")
    assert rows == 2
    assert partial.column("value1__mean").to_pylist() == [2.0]


@needs_native
def test_rejected_csv_still_names_its_line_through_part_partial() -> None:
    body = (HEADER + "0,1,2,3,7\n1,oops,2,3,7\n").encode()
    with pytest.raises(PartError) as err:
        part_partial(body, C, "csv")
    assert (err.value.code, err.value.line) == ("BAD_VALUE", 3)
    assert "oops" not in str(err.value)


@needs_native
def test_header_errors_are_the_same_on_the_native_path() -> None:
    body = b"id,value1,value2,category\n0,1,2,7\n"
    with pytest.raises(PartError) as native_err:
        csv_groups(body, C)
    with pytest.raises(PartError) as arrow_err:
        read_part(body, C)
    assert (native_err.value.code, str(native_err.value)) == (arrow_err.value.code, str(arrow_err.value))


def test_contracts_the_native_csv_path_does_not_cover_are_left_to_pyarrow() -> None:
    strings = Contract(columns={"region": "string", "x": "float64"}, group_by=("region",), values=("x",))
    assert csv_groups(b"region,x\nnorth,1\n", strings) is None
    ints = Contract(columns={"k": "int64", "x": "int64"}, group_by=("k",), values=("x",))
    assert csv_groups(b"k,x\n1,1\n", ints) is None


def _groups_bits(g: native.Groups) -> list[bytes]:
    # NaN moments (a group with no value) compare equal as bytes.
    return [a.tobytes() for a in _groups_fields(g)]


def _both_ways(monkeypatch: pytest.MonkeyPatch, rollup) -> native.Groups:
    """rollup() four values at a time (AVX2, where the CPU has it) and one at a time: the
    same bits."""
    vector = rollup()
    monkeypatch.setattr(native, "use_vector", False)
    lanes = rollup()
    monkeypatch.setattr(native, "use_vector", True)
    assert _groups_bits(vector) == _groups_bits(lanes)
    return vector


@needs_native
@pytest.mark.parametrize("nvalues", [1, 3, 4, 5, 9])
def test_rows_updated_four_values_at_a_time_give_the_bits_of_one_at_a_time(monkeypatch, nvalues) -> None:
    rng = np.random.default_rng(nvalues)
    n = 20_000
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 5e-324, 1.7976931348623157e308, -1e308])
    values = []
    for j in range(nvalues):
        col = rng.standard_normal(n) * 10.0 ** rng.integers(-5, 12, n)
        pick = rng.random(n) < 0.05
        col[pick] = rng.choice(special, pick.sum())
        if j == 2:
            col[:] = np.nan  # a column with no value anywhere
        values.append(col)
    keys = rng.integers(-50, 400, n) * 7919  # single-row groups too
    keys[:3] = [2**63 - 1, -(2**63), 0]
    g = _both_ways(monkeypatch, lambda: native.rollup_keys(keys, values))
    assert g.records == n
    assert g.count.sum() == sum(int(np.count_nonzero(~np.isnan(v))) for v in values)
    codes = rng.integers(-1, 60, n)  # -1: a null key, skipped
    g = _both_ways(monkeypatch, lambda: native.rollup_codes(codes, 60, values))
    assert g.records == np.count_nonzero(codes >= 0)
    # The CSV path: one int64 key and the value columns, in text.
    names = ["k", *(f"v{j}" for j in range(nvalues))]
    contract = Contract(
        columns={"k": "int64", **{f"v{j}": "float64" for j in range(nvalues)}},
        group_by=("k",),
        values=tuple(names[1:]),
    )
    # The plain grammar has no inf, nan or subnormal: those parts go to pyarrow.
    normal = [np.isfinite(v) & ((np.abs(v) >= np.finfo(float).tiny) | (v == 0)) for v in values]
    finite = [np.where(ok, v, 0.5) for v, ok in zip(values, normal, strict=True)]
    # (from row 3: the parser leaves 19-digit keys to pyarrow)
    lines = [",".join([str(keys[i]), *(repr(float(v[i])) for v in finite)]) for i in range(3, 2_003)]
    body = (",".join(names) + "\n" + "\n".join(lines) + "\n").encode()

    def csv() -> native.Groups:
        pieces = csv_groups(body, contract)
        assert pieces is not None
        return pieces[0]

    assert _both_ways(monkeypatch, csv).records == 2_000


@needs_native
@pytest.mark.parametrize("lo", [-(2**63), -5, 2**63 - 70_000])
@pytest.mark.parametrize("span", [1, 65_535, 65_536, 2**40])
def test_keys_group_alike_by_direct_index_or_by_hash(monkeypatch, lo, span) -> None:
    # Keys within a span below 2**16 are grouped by a direct table, others by hashing: the
    # groups come in first-seen order either way, extremes of int64 included.
    hi = min(lo + span, 2**63 - 1)
    keys = np.array([lo, hi, lo + 1, hi, lo, hi - 1], dtype=np.int64)
    values = [np.array([1.0, 2.0, 3.0, 4.0, np.nan, 6.0])]
    g = _both_ways(monkeypatch, lambda: native.rollup_keys(keys, values))
    first_seen = list(dict.fromkeys(keys.tolist()))
    assert g.keys.tolist() == first_seen
    assert g.rows.tolist() == [int((keys == k).sum()) for k in first_seen]
    assert g.count[:, 0].tolist() == [int(((keys == k) & ~np.isnan(values[0])).sum()) for k in first_seen]


@needs_native
def test_key_batches_group_as_one_batch_while_the_key_range_grows_and_then_spills(monkeypatch) -> None:
    # The direct table grows to the left and right, then keys too far apart move every group
    # into the hash; groups stay in first-seen order throughout.
    parts = [[5, 6, 5], [1, 2], [7_000, 3, 6], [10**15, 1, -(10**15)], [2, 10**15]]
    batches = [(np.array(k), [np.arange(len(k), dtype=float)]) for k in parts]
    whole = np.concatenate([k for k, _ in batches])
    values = [np.concatenate([v[0] for _, v in batches])]
    one = _both_ways(monkeypatch, lambda: native.rollup_keys(whole, values))
    batched = _both_ways(monkeypatch, lambda: native.rollup_key_batches(batches, 1))
    assert _groups_bits(batched) == _groups_bits(one)
    assert batched.keys.tolist() == list(dict.fromkeys(whole.tolist()))


@needs_native
@pytest.mark.parametrize("nvalues", [1, 3, 5, 9])
def test_rows_that_wait_by_partition_give_the_bits_of_rows_taken_as_they_come(monkeypatch, nvalues) -> None:
    # GIVEN 20,000 rows in about 5,000 groups keyed over int64 (single-row groups among them),
    # NaN values, read in batches
    rng = np.random.default_rng(40 + nvalues)
    n = 20_000
    keys = rng.integers(-(2**62), 2**62, 5_000)[rng.integers(0, 5_000, n)]
    keys[-7:] = rng.integers(2**62, 2**63 - 1, 7)
    values = [np.where(rng.random(n) < 0.2, np.nan, rng.standard_normal(n) * 10**j) for j in range(nvalues)]
    cuts = [0, 3, 4_099, 9_000, 15_555, n]
    batches = [(keys[a:b], [v[a:b] for v in values]) for a, b in itertools.pairwise(cuts)]

    def rollup(defer: tuple[int, int]) -> native.Groups:
        monkeypatch.setattr(native, "defer", defer)
        # the groups' order depends on when rows waited
        return _by_key(_both_ways(monkeypatch, lambda: native.rollup_key_batches(batches, nvalues)))

    # WHEN every row is taken as it comes, and when rows wait by partition from the first
    # group on in the smallest buffers (a flush every few hundred rows, mid-batch), or from
    # the 1,000th group on
    direct = rollup((2**62, 0))
    # THEN every group has the same rows and moments, bit for bit
    assert _groups_bits(rollup((0, 0))) == _groups_bits(direct)
    assert _groups_bits(rollup((1_000, 1 << 20))) == _groups_bits(direct)
    assert direct.records == n and len(direct.keys) == len(set(keys.tolist()))


@needs_native
def test_two_contexts_of_one_thread_with_rows_waiting_keep_their_rows_apart(monkeypatch) -> None:
    # GIVEN rows waiting by partition from the first group on, and a part whose batches are
    # produced by rolling up another part (two contexts of one thread waiting at once: the
    # second cannot borrow the thread's buffer and gets one of its own)
    monkeypatch.setattr(native, "defer", (0, 0))
    rng = np.random.default_rng(8)

    def part(n: int) -> list[native.KeyBatch]:
        keys = rng.integers(-(2**62), 2**62, 700)[rng.integers(0, 700, n)]
        values = [rng.standard_normal(n), np.where(rng.random(n) < 0.3, np.nan, rng.standard_normal(n))]
        return [(keys[a : a + 997], [v[a : a + 997] for v in values]) for a in range(0, n, 997)]

    outer, inner = part(9_000), part(7_000)
    inner_while_outer: list[native.Groups] = []

    def outer_batches() -> Iterator[native.KeyBatch]:
        for i, batch in enumerate(outer):
            if i == 3:
                inner_while_outer.append(native.rollup_key_batches(inner, 2))
            yield batch

    # WHEN the outer part is rolled up, the inner one in the middle of it
    got = native.rollup_key_batches(outer_batches(), 2)
    # THEN each equals its own roll-up alone, bit for bit
    assert _groups_bits(_by_key(got)) == _groups_bits(_by_key(native.rollup_key_batches(outer, 2)))
    assert _groups_bits(_by_key(inner_while_outer[0])) == _groups_bits(
        _by_key(native.rollup_key_batches(inner, 2))
    )


@needs_native
def test_a_context_on_storage_a_larger_one_left_gives_the_bits_of_fresh_storage(monkeypatch) -> None:
    # GIVEN a thread that rolled up 30,000 groups with NaN, infinite and huge values (it keeps
    # their storage for its next context), and a small part
    rng = np.random.default_rng(12)
    big_keys = rng.integers(-(2**62), 2**62, 30_000)
    big = [np.where(rng.random(30_000) < 0.1, np.inf, rng.standard_normal(30_000) * 1e300) for _ in range(3)]
    keys = rng.integers(0, 2**40, 600)[rng.integers(0, 600, 5_000)]
    values = [np.where(rng.random(5_000) < 0.2, np.nan, rng.standard_normal(5_000)) for _ in range(3)]
    fresh: list[native.Groups] = []
    t = threading.Thread(target=lambda: fresh.append(native.rollup_keys(keys, values)))
    t.start()
    t.join()
    # WHEN the thread's next context rolls up the small part (on that storage)
    native.rollup_keys(big_keys, big)
    reused = native.rollup_keys(keys, values)
    # THEN it has the moments a thread's first context has, bit for bit
    assert _groups_bits(_by_key(reused)) == _groups_bits(_by_key(fresh[0]))


@needs_native
def test_threads_that_end_free_the_memory_they_kept_for_their_next_parts(monkeypatch) -> None:
    # GIVEN rows waiting by partition (each thread takes a wait buffer) and 4 threads that
    # each roll up parts of 20,000 groups (each keeps their storage)
    monkeypatch.setattr(native, "defer", (0, 1 << 20))
    rng = np.random.default_rng(5)
    keys = rng.integers(-(2**62), 2**62, 20_000)
    values = [rng.standard_normal(20_000)]
    before = native.thread_bytes()
    kept: list[int] = []

    def work() -> None:
        for _ in range(2):
            native.rollup_keys(keys, values)
        kept.append(native.thread_bytes())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # WHEN the threads have ended (a thread's memory goes as the thread does: just after
    # join returns)
    deadline = time.monotonic() + 10
    while native.thread_bytes() != before and time.monotonic() < deadline:
        time.sleep(0.01)
    # THEN each had kept its buffer and storage while it ran, and none of it is kept now
    assert min(kept) >= before + (1 << 20) + 20_000 * 8 * 2
    assert native.thread_bytes() == before


def _by_key(g: native.Groups) -> native.Groups:
    order = np.argsort(g.keys)
    return native.Groups(*(a[order] for a in _groups_fields(g)), keyless=g.keyless)


def _groups_fields(g: native.Groups) -> list[Any]:
    return [g.keys, g.rows, g.count, g.mean, g.m2, g.min, g.max]


@needs_native
def test_a_group_code_out_of_range_is_an_error_not_a_write() -> None:
    with pytest.raises(ValueError, match="out of range"):
        native.rollup_codes(np.array([0, 3]), 2, [np.array([1.0, 2.0])])


@needs_native
def test_the_native_merge_gives_the_numpy_merges_bits(monkeypatch) -> None:
    # GIVEN partials of parts with NaN cells, all-NaN groups, single-row groups, a large
    # offset, infinities, an empty part, and a row without a key (another tool's partial)
    rng = np.random.default_rng(5)
    frames = []
    for i in range(7):
        n = 300
        df = _part(
            value1=rng.standard_normal(n) + 1e9 * (i % 2),
            value2=np.where(np.arange(n) % 5 == 0, np.nan, rng.standard_normal(n) * 10 + 3),
            value3=rng.standard_normal(n),
            category=rng.integers(0, 50, n),
        )
        df.loc[df["category"] == 3, "value3"] = np.nan
        frames.append(df)
    frames[2] = frames[2].iloc[:1]
    frames[3] = frames[3].iloc[0:0]
    frames[4].loc[frames[4].index[:3], "value1"] = [np.inf, -np.inf, np.inf]
    partials = [partial_from_frame(df, C) for df in frames]
    rows = partials[5].to_pylist()
    partials[5] = pa.Table.from_pylist([*rows, {**rows[0], "category": None}], schema=partials[5].schema)
    # WHEN they are merged natively and by NumPy
    got = stats.merge_partials(partials, C)
    monkeypatch.setattr(native, "LIB", None)
    want = stats.merge_partials(partials, C)
    # THEN every column is the same, bit for bit (NaN where NaN)
    assert got.schema == want.schema
    for name in got.column_names:
        a, b = got.column(name).to_numpy(), want.column(name).to_numpy()
        assert a.dtype == b.dtype and np.array_equal(a.view(np.int64), b.view(np.int64)), name


def _partial_fields(rows: list[float], count: list[float], mean: list[float], m2: list[float]) -> list[Any]:
    """A one-value partial's fields as sr_merge takes them (min and max: the mean)."""
    return [np.array(x, dtype=np.float64) for x in (rows, count, mean, m2, mean, mean)]


@needs_native
def test_the_merge_skips_rows_without_a_group_and_rejects_codes_out_of_range() -> None:
    # GIVEN two partials of one value column: group 0 in both, a row in no group (-1), and a
    # group whose only row has no value (count 0, NaN moments)
    a = _partial_fields([2, 5], [2, 5], [1.0, 7.0], [2.0, 0.0])
    b = _partial_fields([1, 3], [1, 0], [4.0, np.nan], [0.0, np.nan])
    # WHEN they are merged into 2 groups
    rows, n, mean, m2, mn, mx = native.merge(np.array([0, -1, 0, 1]), 2, 1, [a, b])
    # THEN group 0 is Chan's combination of (2, 1.0, 2.0) and (1, 4.0, 0.0); group 1 has
    # rows but no value: NaN moments; the row in no group counts nowhere
    assert list(rows) == [3.0, 3.0] and list(n) == [3.0, 0.0]
    assert mean[0] == 2.0 and m2[0] == 2.0 + 2 * 1.0**2 + 1 * 2.0**2
    assert (mn[0], mx[0]) == (1.0, 4.0)
    assert all(np.isnan(x[1]) for x in (mean, m2, mn, mx))
    with pytest.raises(ValueError, match="out of range"):
        native.merge(np.array([0, 2, 0, 1]), 2, 1, [a, b])
    with pytest.raises(ValueError, match="differ in length"):
        native.merge(np.array([0, 1, 0]), 2, 1, [a, b])


# ---- reading a body ---------------------------------------------------------------------


def test_read_body_reads_every_byte_across_chunks_and_reuses_its_buffer(monkeypatch) -> None:
    monkeypatch.setattr(parse, "_READ_CHUNK", 7)
    monkeypatch.setattr(parse, "_buffers", type(parse._buffers)())
    data = bytes(range(256)) * 5
    assert bytes(read_body(io.BytesIO(data))) == data  # no size: grows as it goes
    first = parse._buffers.body
    assert bytes(read_body(io.BytesIO(data[:100]), size=100)) == data[:100]
    assert parse._buffers.body is first  # big enough: reused, not reallocated
    assert bytes(read_body(io.BytesIO(b""), size=0)) == b""
    bigger = data * 3
    assert bytes(read_body(io.BytesIO(bigger), size=len(bigger))) == bigger
    assert parse._buffers.body is not first
    monkeypatch.setattr(parse, "_KEEP_BYTES", 1000)
    view = read_body(io.BytesIO(bigger), size=len(bigger))
    assert parse._buffers.body is None  # above the cap: not kept for the next part
    assert bytes(view) == bigger


class ShortReads(io.BytesIO):
    """A network stream: each readinto returns fewer bytes than asked for."""

    def readinto(self, buffer) -> int:  # type: ignore[override]
        return super().readinto(buffer[:5])


def test_read_body_checksums_the_bytes_as_they_arrive(monkeypatch) -> None:
    import hashlib

    monkeypatch.setattr(parse, "_READ_CHUNK", 7)
    monkeypatch.setattr(parse, "_buffers", type(parse._buffers)())
    data = bytes(range(256)) * 5
    for stream, size in ((ShortReads(data), len(data)), (io.BytesIO(data), None), (io.BytesIO(b""), 0)):
        expected = data if size != 0 else b""
        digest = hashlib.sha256()
        # short reads, a buffer that grows while reading, an empty body
        assert bytes(read_body(stream, size=size, digest=digest)) == expected
        assert digest.hexdigest() == hashlib.sha256(expected).hexdigest()
