"""Per-group partial aggregates: build them from rows, merge them, finalise them.

A *partial* is an Arrow table holding, per group and value column ``v``: ``v__count``
(non-NaN values), ``v__mean``, ``v__m2`` (sum of squared deviations from the group mean),
``v__min`` and ``v__max``, plus ``__rows`` (rows in the group), one row per group in key
order. Partials of disjoint row sets merge exactly (Chan et al.), so a dataset's result is
the merge of its parts' partials.

Pure functions, no I/O. Everything is vectorised over groups, on NumPy arrays: the hot
path is ``part_partial`` on a freshly read part. Partials, merges and results are stored
as Parquet: ``partial_to_parquet`` (partials and merges, which only s3rollup reads) and
``table_to_parquet`` (results) turn them into bytes, ``table_from_parquet`` back.

pandas is imported only where a key is not a single integer column (a string, a float or
several keys: its factorisation and sort) and where the native kernels are missing: a job
on the default contract's integer key never imports it (about a quarter of a second of
every job's process). ``to_reference_shape`` gives the reference's pandas shape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from s3rollup import native, parse
from s3rollup.config import available_cpus
from s3rollup.contract import Contract

if TYPE_CHECKING:
    import pandas as pd

ROWS = "__rows"
PARTIAL_FIELDS = ("count", "mean", "m2", "min", "max")

# An integer key whose range is at most this wide (or twice the row count) is used as
# its own group code; wider or sparse keys are sorted.
_DIRECT_SPAN = 1 << 20

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Codes = npt.NDArray[np.intp]
Moments = tuple[IntArray, IntArray, FloatArray, FloatArray, FloatArray, FloatArray]
# A key column's values: a NumPy array, or (partial_from_frame) the frame's own column.
KeyValues = Any


def table_to_parquet(table: pa.Table) -> bytes:
    """A result as Parquet bytes (snappy, column statistics: what users' readers expect).

    Without dictionary encoding: a table's columns are mostly distinct floats, which
    pyarrow would first try to fit in a dictionary per column and then write plain anyway
    (a 100,000-group partial: 70 ms to write, 13.2 MB, against 30 ms and 11.0 MB).
    """
    return _parquet(table, compression="snappy", write_statistics=True)


def partial_to_parquet(table: pa.Table) -> bytes:
    """A partial or a merge of partials as Parquet bytes, for s3rollup alone to read back
    whole (table_from_parquet): LZ4 and no column statistics, which nothing reads. A
    100,000-group partial (one per part of the bench's groups100k profile, written on
    every part's critical path): 16 ms to write and 2.6 ms to read, 11.4 MB, against 24 ms,
    6.8 ms and 11.0 MB as a result is written."""
    return _parquet(table, compression="lz4", write_statistics=False)


def _parquet(table: pa.Table, **options: Any) -> bytes:
    # Into Arrow's own buffer (its allocator keeps the memory for the next one), then once
    # into bytes: a BytesIO grows by reallocating, onto fresh memory each time.
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, use_dictionary=False, **options)
    return sink.getvalue().to_pybytes()


def table_from_parquet(data: bytes) -> pa.Table:
    """The table table_to_parquet wrote (or an earlier s3rollup wrote through pandas: its
    NaN are nulls there, and read back as NaN by every function here)."""
    return pq.ParquetFile(pa.BufferReader(data)).read()


def table_bytes(table: pa.Table) -> int:
    """A table's size in memory (its buffers)."""
    return int(table.nbytes)


def partial_columns(contract: Contract) -> list[str]:
    """The columns of a partial table, in order: group keys, ``__rows``, value fields."""
    cols = [*contract.group_by, ROWS]
    for v in contract.values:
        cols.extend(f"{v}__{f}" for f in PARTIAL_FIELDS)
    return cols


def _array(table: pa.Table, name: str) -> npt.NDArray[Any]:
    """A column as one NumPy array (nulls as NaN; strings as Python objects). Read-only
    where it shares the table's memory: nothing here writes into it."""
    return parse.numpy_column(table.column(name))


def _key_type(contract: Contract, col: str) -> pa.DataType:
    return parse.ARROW_TYPES[contract.columns.get(col, "string")]


def _key_array(values: npt.NDArray[Any], default: pa.DataType) -> pa.Array:
    """A key column of a partial: the values' own type (what the part's rows had), the
    contract's when there are none."""
    return parse.arrow_column(values, default if len(values) == 0 else None)


def _empty_partial(contract: Contract, key_types: dict[str, pa.DataType] | None = None) -> pa.Table:
    columns: dict[str, pa.Array] = {}
    for k in contract.group_by:
        columns[k] = pa.nulls(0, (key_types or {}).get(k) or _key_type(contract, k))
    columns[ROWS] = pa.nulls(0, pa.int64())
    for v in contract.values:
        columns[f"{v}__count"] = pa.nulls(0, pa.int64())
        for f in PARTIAL_FIELDS[1:]:
            columns[f"{v}__{f}"] = pa.nulls(0, pa.float64())
    return pa.Table.from_arrays(list(columns.values()), names=list(columns))


# ---- group codes ------------------------------------------------------------------------


def _group_codes(keys: Sequence[KeyValues]) -> tuple[Codes, list[npt.NDArray[Any]]]:
    """Dense group codes (-1 where a key is null) whose order is the sorted key order.

    Returns the codes and the distinct keys, one array per key column, one entry per code.
    One integer key is coded by NumPy; other keys by pandas' factorisation.
    """
    if len(keys) == 1 and isinstance(keys[0], np.ndarray) and keys[0].dtype.kind in "iu":
        arr = keys[0]
        if not len(arr):
            return np.empty(0, dtype=np.intp), [arr]
        direct = _direct_int_codes(arr)
        if direct is not None:
            return direct
        return _sorted_codes(arr)
    return _factorized_codes(keys)


def _sorted_codes(arr: IntArray) -> tuple[Codes, list[npt.NDArray[Any]]]:
    """np.unique's codes and uniques, by a stable sort: the keys a merge codes are its
    partials' keys, each partial already in key order, and a stable sort (Timsort) merges
    such runs in a fraction of the time np.unique's sort takes (16 partials of 100,000
    keys: 9 ms against 150 ms)."""
    order = np.argsort(arr, kind="stable")
    ordered = arr[order]
    first = np.empty(len(arr), dtype=bool)
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    codes = np.empty(len(arr), dtype=np.intp)
    codes[order] = np.cumsum(first) - 1
    return codes, [ordered[first]]


def _factorized_codes(keys: Sequence[KeyValues]) -> tuple[Codes, list[npt.NDArray[Any]]]:
    import pandas as pd

    if len(keys) == 1:
        codes, uniques = pd.factorize(keys[0], sort=True)
        return codes.astype(np.intp, copy=False), [np.asarray(uniques)]
    # Several keys: fold them in one at a time, re-factorising the combined code so it
    # stays dense (no overflow however many keys) and lexicographically ordered.
    codes, uniques = pd.factorize(keys[0], sort=True)
    codes = codes.astype(np.int64)
    levels = [np.arange(len(uniques))]
    level_uniques = [uniques]
    for col in keys[1:]:
        c, u = pd.factorize(col, sort=True)
        null = (codes < 0) | (c < 0)
        combined = np.where(null, -1, codes * len(u) + c)
        codes, comb_u = pd.factorize(combined, sort=True, use_na_sentinel=True)
        comb_u = np.asarray(comb_u, dtype=np.int64)
        if len(comb_u) and comb_u[0] == -1:
            # -1 sorts first: shift it out so real groups start at 0.
            codes = codes - 1
            comb_u = comb_u[1:]
        codes = codes.astype(np.int64)
        prev, cur = comb_u // len(u), comb_u % len(u)
        levels = [lvl[prev] for lvl in levels] + [cur]
        level_uniques.append(u)
    columns = [np.asarray(pd.Index(uq).take(lvl)) for uq, lvl in zip(level_uniques, levels, strict=True)]
    return codes.astype(np.intp, copy=False), columns


def _direct_int_codes(arr: IntArray) -> tuple[Codes, list[npt.NDArray[Any]]] | None:
    """Codes for an integer key with a small range: the key minus its minimum, no hashing."""
    lo, hi = int(arr.min()), int(arr.max())
    span = hi - lo + 1
    if span > max(_DIRECT_SPAN, 2 * len(arr)) or hi > np.iinfo(np.int64).max:
        return None
    # Subtract in int64: narrow key types would overflow.
    codes = (arr.astype(np.int64, copy=False) - lo).astype(np.intp, copy=False)
    present = np.flatnonzero(np.bincount(codes, minlength=span))
    if len(present) < span:
        lut = np.full(span, -1, dtype=np.intp)
        lut[present] = np.arange(len(present))
        codes = lut[codes]
    return codes, [(present + lo).astype(arr.dtype)]


def _sort_order(keys: list[npt.NDArray[Any]]) -> npt.NDArray[np.intp] | None:
    """The stable order that sorts the rows by their keys; None when they already are."""
    n = len(keys[0])
    if n < 2:
        return None
    if len(keys) == 1 and keys[0].dtype.kind in "iuf":
        (k,) = keys
        if not (k[1:] < k[:-1]).any():
            return None
        return np.argsort(k, kind="stable")
    import pandas as pd

    frame = pd.DataFrame({i: k for i, k in enumerate(keys)})
    order = frame.sort_values(list(frame.columns), kind="stable").index.to_numpy()
    return None if (order == np.arange(n)).all() else order


# ---- one part's rows -> partial ---------------------------------------------------------


def _pin_constant_groups(mean: FloatArray, m2: FloatArray, mn: FloatArray, mx: FloatArray) -> None:
    """A group whose values are all equal has exactly that mean and zero spread."""
    const = (mn == mx) & np.isfinite(mn)
    mean[const] = mn[const]
    m2[const] = 0.0


def _run_kernel(kernel: Any, x: FloatArray, codes: Codes, k: int, **options: int) -> FloatArray:
    """One of pandas' groupby kernels over every value column: a (groups, columns) table."""
    out = np.empty((k, x.shape[1]))
    kernel(out, np.zeros(k, dtype=np.int64), x, codes, min_count=-1, **options)
    return out


@np.errstate(invalid="ignore")  # inf - inf is NaN, as in pandas
def _value_stats(columns: list[FloatArray], codes: Codes, k: int) -> Moments:
    """rows per group code, and count, mean, M2, min and max per code (rows) and value
    column (columns). Codes below 0 (null keys) are skipped.

    The native kernels (s3rollup.native) read every row once for all the columns, without
    the GIL. Without them, pandas' own groupby kernels run over the value columns side by
    side; they skip NaN and release the GIL too. Both compute pandas' numbers: the mean is a
    compensated sum over the count, M2 comes from Welford's update.
    """
    if native.LIB is not None:
        g = native.rollup_codes(codes, k, columns)
        return g.rows, g.count, g.mean, g.m2, g.min, g.max
    from pandas._libs import groupby as _libgroupby  # type: ignore[attr-defined]  # no stubs

    if (codes < 0).any():
        keep = codes >= 0
        codes, columns = codes[keep], [c[keep] for c in columns]
    rows = np.bincount(codes, minlength=k).astype(np.int64)
    x = np.empty((len(codes), len(columns)))
    for j, c in enumerate(columns):
        x[:, j] = c
    mean = _run_kernel(_libgroupby.group_mean, x, codes, k)
    var = _run_kernel(_libgroupby.group_var, x, codes, k, ddof=0)
    mn = _run_kernel(_libgroupby.group_min, x, codes, k)
    mx = _run_kernel(_libgroupby.group_max, x, codes, k)
    nan = np.isnan(x)
    if nan.any():
        present = ~nan
        cnt = np.stack(
            [np.bincount(codes, weights=present[:, j], minlength=k) for j in range(x.shape[1])], axis=1
        ).astype(np.int64)
    else:
        cnt = np.repeat(rows[:, None], x.shape[1], axis=1)
    m2 = var * cnt  # NaN where a group has no value
    return rows, cnt, mean, m2, mn, mx


def partial_from_frame(df: pd.DataFrame, contract: Contract) -> pa.Table:
    """The partial aggregate (count, mean, M2, min, max per value, rows) of one part's rows
    (a DataFrame as parse.read_part gives it)."""
    keys = list(contract.group_by)
    if len(df) == 0:
        types = {k: pa.Array.from_pandas(df[k]).type for k in keys}
        return _empty_partial(contract, {k: t for k, t in types.items() if not pa.types.is_null(t)})
    # A column of a NumPy dtype as its array; an extension dtype's (nullable integers,
    # strings) as the column itself, for pandas' factorisation.
    codes, uniques = _group_codes(
        [df[k].to_numpy() if isinstance(df[k].dtype, np.dtype) else df[k] for k in keys]
    )
    columns = [df[v].to_numpy(dtype=np.float64, na_value=np.nan) for v in contract.values]
    moments = _value_stats(columns, codes, len(uniques[0]))
    rows, cnt, mean, m2, mn, mx = moments
    return _partial_table(
        contract,
        uniques,
        rows,
        [(cnt[:, j], mean[:, j], m2[:, j], mn[:, j], mx[:, j]) for j in range(cnt.shape[1])],
    )


def partial_from_groups(groups: native.Groups, contract: Contract) -> pa.Table:
    """The partial of the native kernels' moments by key (one int64 key, any group order)."""
    order = np.argsort(groups.keys)  # distinct keys: any sort is stable
    # Each (groups, values) table as a row per value column, then gathered in key order
    # along the rows: three times faster than gathering strided columns.
    moments = [
        np.take(np.ascontiguousarray(m.T), order, axis=1)
        for m in (groups.count, groups.mean, groups.m2, groups.min, groups.max)
    ]
    per_value = [tuple(m[j] for m in moments) for j in range(len(contract.values))]
    return _partial_table(contract, [groups.keys[order]], groups.rows[order], per_value)


def part_partial(
    body: native.Buffer,
    contract: Contract,
    fmt: str,
    alone: bool = False,
    keyless: parse.Keyless | None = None,
) -> tuple[pa.Table, int]:
    """One part's partial and its row count (the rows in a group), from its bytes; a
    PartError when it is rejected. The rows whose group key is missing, in no group, are
    counted in ``keyless``.

    A plain CSV part goes through the native single-pass parser, on every CPU when the
    part is computed ``alone`` (no other part's task competes for them: see
    job.PartialTask), else on one thread. Every other part, and a
    CSV part that parser leaves alone, is read by pyarrow (read_table); its moments then
    come from the native kernels on the key column itself (one int64 key, float64 values)
    or from partial_from_frame. A Parquet part computed ``alone`` is decoded a batch
    ahead of those kernels, on a second thread (parse.read_ahead).
    """
    keyless = keyless if keyless is not None else parse.Keyless()
    if fmt in ("csv", "csv.gz"):
        body = parse.csv_text(body, fmt)
        fmt = "csv"
        pieces = parse.csv_groups(body, contract, available_cpus() if alone else 1)
        if pieces is not None:
            partials = [partial_from_groups(g, contract) for g in pieces]
            merged = partials[0] if len(partials) == 1 else merge_partials(partials, contract)
            keyless.rows += sum(g.keyless for g in pieces)
            return merged, sum(g.records for g in pieces)
    if fmt == "parquet":
        # Counted apart: table_groups leaves the batches unread where it does not apply,
        # and read_table below reads (and counts) the part again.
        counted = parse.Keyless()
        tables = parse.parquet_tables(body, contract, counted)
        groups = parse.table_groups(parse.read_ahead(tables) if alone else tables, contract)
        if groups is not None:
            keyless.rows += counted.rows
            return partial_from_groups(groups, contract), groups.records
    table = parse.read_table(body, contract, fmt, keyless)
    groups = parse.table_groups([table], contract)
    if groups is not None:
        return partial_from_groups(groups, contract), groups.records
    frame = parse.table_frame(table, contract)
    return partial_from_frame(frame, contract), len(frame)


_MOMENT_TYPES = (np.int64, np.float64, np.float64, np.float64, np.float64)  # count, mean, m2, min, max


def _partial_table(
    contract: Contract,
    uniques: list[npt.NDArray[Any]],
    rows: IntArray,
    per_value: Sequence[Sequence[npt.NDArray[Any]]],
) -> pa.Table:
    """The partial table from its distinct keys and per-group moments (one tuple of count,
    mean, M2, min and max per value column), columns in their canonical order."""
    columns: list[pa.Array] = [
        _key_array(u, _key_type(contract, k)) for k, u in zip(contract.group_by, uniques, strict=True)
    ]
    columns.append(parse.arrow_column(np.asarray(rows, dtype=np.int64)))
    for moments in per_value:
        # Contiguous float64 copies where they are not already (their owner's: this pins
        # constant groups in place).
        cnt, mean, m2, mn, mx = (
            np.ascontiguousarray(a, dtype=t) for a, t in zip(moments, _MOMENT_TYPES, strict=True)
        )
        _pin_constant_groups(mean, m2, mn, mx)  # type: ignore[arg-type]  # float64 by _MOMENT_TYPES
        columns.extend(parse.arrow_column(a) for a in (cnt, mean, m2, mn, mx))
    return pa.Table.from_arrays(columns, names=partial_columns(contract))


# ---- partials -> merged partial ---------------------------------------------------------


# merge_partials takes at most this many partials, and this many bytes of them, at a time:
# its memory is the merge so far plus one chunk, whatever the number of parts (a dataset's
# partials each hold every group of a part: a few hundred KB for the seed's 1,000 groups,
# hundreds of MB for a key with millions of values).
_MERGE_CHUNK = 16
_MERGE_BYTES = 64 << 20


def merge_partials(partials: Iterable[pa.Table], contract: Contract) -> pa.Table:
    """One partial equivalent to the partial of all the parts' rows (Chan et al. combination).

    partials is consumed a chunk at a time (up to _MERGE_CHUNK partials and _MERGE_BYTES,
    at least one), each chunk merged onto the merge so far, so a generator of partials is
    never held whole.
    """
    merged: pa.Table | None = None
    rest = iter(partials)
    while chunk := _chunk(rest):
        merged = _merge_tables(chunk if merged is None else [merged, *chunk], contract)
    return _merge_tables([], contract) if merged is None else merged


def _chunk(partials: Iterator[pa.Table]) -> list[pa.Table]:
    chunk: list[pa.Table] = []
    size = 0
    while len(chunk) < _MERGE_CHUNK and size < _MERGE_BYTES:
        table = next(partials, None)
        if table is None:
            break
        chunk.append(table)
        size += table_bytes(table)
    return chunk


@np.errstate(invalid="ignore", divide="ignore", over="ignore")
def _merge_tables(tables: list[pa.Table], contract: Contract) -> pa.Table:
    """merge_partials of these partials, all at once."""
    nonempty = [parse.without_null_keys(t, contract) for t in tables if t.num_rows]
    nonempty = [t for t in nonempty if t.num_rows]
    if not nonempty:
        if tables:
            return _empty_partial(contract, {k: tables[0].schema.field(k).type for k in contract.group_by})
        return _empty_partial(contract)

    def column(name: str) -> npt.NDArray[Any]:
        arrays = [_array(t, name) for t in nonempty]
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    codes, uniques = _group_codes([column(k) for k in contract.group_by])
    k = len(uniques[0])
    if native.LIB is not None:
        # The same arithmetic, the same bits, one pass per step over the partials' columns
        # where they are (not joined, no temporaries): 20 partials of 100,000 groups in
        # 0.14 s against 0.20 s.
        fields = [ROWS, *(f"{v}__{f}" for v in contract.values for f in PARTIAL_FIELDS)]
        merged = native.merge(
            codes, k, len(contract.values), [[_array(t, f) for f in fields] for t in nonempty]
        )
        n_fields = len(PARTIAL_FIELDS)
        per_native = [
            (merged[1 + n_fields * j].astype(np.int64), *merged[2 + n_fields * j : 1 + n_fields * (j + 1)])
            for j in range(len(contract.values))
        ]
        return _partial_table(contract, uniques, merged[0].astype(np.int64), per_native)
    keep = codes >= 0 if (codes < 0).any() else None
    if keep is not None:
        codes = codes[keep]

    def values(name: str) -> FloatArray:
        joined = column(name).astype(np.float64, copy=False)
        return joined if keep is None else joined[keep]

    rows = np.bincount(codes, weights=values(ROWS), minlength=k).astype(np.int64)
    per_value = []
    for v in contract.values:
        n_i = values(f"{v}__count")
        mean_i = values(f"{v}__mean")
        m2_i = values(f"{v}__m2")
        w = n_i > 0
        # Zero-count entries carry NaN moments: they must contribute nothing.
        mean_w = np.where(w, mean_i, 0.0)
        n = np.bincount(codes, weights=n_i, minlength=k)
        mean0 = np.bincount(codes, weights=n_i * mean_w, minlength=k) / n
        # Shift by the first estimate and add back the weighted residual: a group that
        # only one partial contributes to keeps its mean bit for bit.
        d = np.where(w, mean_w - mean0[codes], 0.0)
        corr = np.bincount(codes, weights=n_i * d, minlength=k) / n
        mean = np.where(np.isfinite(mean0), mean0 + corr, mean0)
        spread = np.where(w, m2_i + n_i * (mean_w - mean[codes]) ** 2, 0.0)
        m2 = np.bincount(codes, weights=spread, minlength=k)
        m2[n == 0] = np.nan
        mn = np.full(k, np.nan)
        mx = np.full(k, np.nan)
        np.fmin.at(mn, codes, values(f"{v}__min"))
        np.fmax.at(mx, codes, values(f"{v}__max"))
        per_value.append((n.astype(np.int64), mean, m2, mn, mx))
    return _partial_table(contract, uniques, rows, per_value)


# ---- merged partial -> published statistics ---------------------------------------------


def _statistic(merged: Callable[[str], npt.NDArray[Any]], v: str, stat: str) -> FloatArray:
    if stat == "std":
        cnt = merged(f"{v}__count").astype(np.float64)
        m2 = merged(f"{v}__m2").astype(np.float64, copy=False)
        with np.errstate(invalid="ignore", divide="ignore"):
            # Sample std (ddof=1), undefined below two values, as pandas.
            return np.where(cnt >= 2, np.sqrt(m2 / (cnt - 1)), np.nan)
    return merged(f"{v}__{stat}").astype(np.float64, copy=False)


def finalize(merged: pa.Table, contract: Contract) -> pa.Table:
    """The published table: keys, rows, ``{v}_{stat}`` columns and derived columns, one row
    per group of at least ``min_group_size`` rows, in key order."""
    keys = list(contract.group_by)
    rows = _array(merged, ROWS)
    keep = rows >= contract.min_group_size
    picked = None if keep.all() else np.flatnonzero(keep)
    key_values = [_array(merged, k) for k in keys]
    if picked is not None:
        key_values = [a[picked] for a in key_values]
    order = _sort_order(key_values)
    if order is not None:
        picked = order if picked is None else picked[order]
        key_values = [a[order] for a in key_values]

    def column(name: str) -> npt.NDArray[Any]:
        a = _array(merged, name)
        return a if picked is None else a[picked]

    out: dict[str, pa.Array] = {
        k: parse.arrow_column(a, merged.schema.field(k).type) for k, a in zip(keys, key_values, strict=True)
    }
    out["rows"] = parse.arrow_column(column(ROWS).astype(np.int64, copy=False))
    stats: dict[tuple[str, str], FloatArray] = {}
    for v in contract.values:
        for s in ("mean", "std", "min", "max"):
            stats[(v, s)] = _statistic(column, v, s)
        for s in contract.statistics:
            out[f"{v}_{s}"] = parse.arrow_column(stats[(v, s)], nan_as_null=True)
    for d in contract.derived:
        derived = np.asarray(d.evaluate(stats.__getitem__), dtype=np.float64)
        out[d.name] = parse.arrow_column(derived, nan_as_null=True)
    if len(out) != len(keys) + 1 + len(contract.values) * len(contract.statistics) + len(contract.derived):
        raise ValueError("result column names collide; rename the contract's columns")
    return pa.Table.from_arrays(list(out.values()), names=list(out))


def to_reference_shape(final: pa.Table | pd.DataFrame, contract: Contract) -> pd.DataFrame:
    """A result table (finalize()'s, or as read back) in the reference's shape: (value,
    stat) columns indexed by key."""
    import pandas as pd

    if isinstance(final, pa.Table):
        final = final.to_pandas()
    keys = list(contract.group_by)
    if len(keys) == 1:
        index: pd.Index = pd.Index(final[keys[0]], name=keys[0])
    else:
        index = pd.MultiIndex.from_frame(final[keys])
    data: dict[tuple[str, str], object] = {}
    for v in contract.values:
        for s in contract.statistics:
            col = final[f"{v}_{s}"].to_numpy()
            if s in ("min", "max") and contract.columns.get(v) == "int64" and not np.isnan(col).any():
                # pandas keeps an integer column's min and max integral.
                col = col.astype(np.int64)
            data[(v, s)] = col
    for d in contract.derived:
        data[(d.name, "")] = final[d.name].to_numpy()
    out = pd.DataFrame(data, index=index)
    out.columns = pd.MultiIndex.from_tuples(list(data))
    return out
