"""Per-group partial aggregates: build them from rows, merge them, finalise them.

A *partial* holds, per group and value column ``v``: ``v__count`` (non-NaN values),
``v__mean``, ``v__m2`` (sum of squared deviations from the group mean), ``v__min`` and
``v__max``, plus ``__rows`` (rows in the group). Partials of disjoint row sets merge
exactly (Chan et al.), so a dataset's result is the merge of its parts' partials.

Pure functions, no I/O. Everything is vectorised over groups: the hot path is
``partial_from_frame`` on a freshly parsed part. Partials, merges and results are stored
as Parquet: ``frame_to_parquet`` and ``frame_from_parquet`` turn them into bytes and back.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pandas._libs import groupby as _libgroupby  # type: ignore[attr-defined]  # no stubs

from s3rollup import native, parse
from s3rollup.config import available_cpus
from s3rollup.contract import Contract

ROWS = "__rows"
PARTIAL_FIELDS = ("count", "mean", "m2", "min", "max")

# An integer key whose range is at most this wide (or twice the row count) is used as
# its own group code; wider or sparse keys go through a hash factorisation.
_DIRECT_SPAN = 1 << 20

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def frame_to_parquet(frame: pd.DataFrame) -> bytes:
    """A partial, merge or result as Parquet bytes (snappy, no index column).

    pyarrow's own writer and reader, not pandas' to_parquet and read_parquet: these import
    pyarrow.dataset and Acero on first use, 15-20 ms of every job process (one job is one
    process), for the same bytes and the same frame back.

    Without dictionary encoding: a partial's columns are mostly distinct floats, which
    pyarrow would first try to fit in a dictionary per column and then write plain anyway
    (a 100,000-group partial: 70 ms to write, 13.2 MB, against 30 ms and 11.0 MB).
    """
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buf, use_dictionary=False)
    return buf.getvalue()


def frame_from_parquet(data: bytes) -> pd.DataFrame:
    """The frame frame_to_parquet wrote (dtypes and index as pandas' read_parquet gives)."""
    return pq.ParquetFile(pa.BufferReader(data)).read().to_pandas()


def partial_columns(contract: Contract) -> list[str]:
    """The columns of a partial table, in order: group keys, ``__rows``, value fields."""
    cols = [*contract.group_by, ROWS]
    for v in contract.values:
        cols.extend(f"{v}__{f}" for f in PARTIAL_FIELDS)
    return cols


def _key_dtype(contract: Contract, col: str) -> str:
    typ = contract.columns.get(col, "string")
    return "str" if typ == "string" else typ


def _empty_partial(contract: Contract, key_dtypes: dict[str, object] | None = None) -> pd.DataFrame:
    data: dict[str, pd.Series] = {}
    for k in contract.group_by:
        dtype = key_dtypes[k] if key_dtypes is not None else _key_dtype(contract, k)
        data[k] = pd.Series([], dtype=dtype)  # type: ignore[call-overload]
    data[ROWS] = pd.Series([], dtype=np.int64)
    for v in contract.values:
        data[f"{v}__count"] = pd.Series([], dtype=np.int64)
        for f in PARTIAL_FIELDS[1:]:
            data[f"{v}__{f}"] = pd.Series([], dtype=np.float64)
    return pd.DataFrame(data)


# ---- group codes ------------------------------------------------------------------------


def _group_codes(keys: pd.DataFrame) -> tuple[npt.NDArray[np.intp], pd.DataFrame]:
    """Dense group codes (-1 where a key is null) whose order is the sorted key order.

    Returns the codes and a frame of the distinct keys, one row per code.
    """
    cols = list(keys.columns)
    if len(cols) == 1:
        s = keys[cols[0]]
        if s.dtype.kind in "iu" and len(s):
            direct = _direct_int_codes(s)
            if direct is not None:
                return direct
        codes, uniques = pd.factorize(s, sort=True)
        return codes.astype(np.intp, copy=False), pd.DataFrame({cols[0]: uniques})
    # Several keys: fold them in one at a time, re-factorising the combined code so it
    # stays dense (no overflow however many keys) and lexicographically ordered.
    codes, uniques = pd.factorize(keys[cols[0]], sort=True)
    codes = codes.astype(np.int64)
    levels = [np.arange(len(uniques))]
    level_uniques = [uniques]
    for col in cols[1:]:
        c, u = pd.factorize(keys[col], sort=True)
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
    frame = pd.DataFrame(
        {col: pd.Index(uq).take(lvl) for col, uq, lvl in zip(cols, level_uniques, levels, strict=True)}
    )
    return codes.astype(np.intp, copy=False), frame


def _direct_int_codes(s: pd.Series) -> tuple[npt.NDArray[np.intp], pd.DataFrame] | None:
    """Codes for an integer key with a small range: the key minus its minimum, no hashing."""
    if not isinstance(s.dtype, np.dtype):
        return None  # nullable extension integers may hold NA: let factorize handle them
    arr = s.to_numpy()
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
    uniques = (present + lo).astype(arr.dtype)
    return codes, pd.DataFrame({s.name: uniques})


# ---- one part's rows -> partial ---------------------------------------------------------


def _pin_constant_groups(mean: FloatArray, m2: FloatArray, mn: FloatArray, mx: FloatArray) -> None:
    """A group whose values are all equal has exactly that mean and zero spread."""
    const = (mn == mx) & np.isfinite(mn)
    mean[const] = mn[const]
    m2[const] = 0.0


Codes = npt.NDArray[np.intp]
Moments = tuple[IntArray, IntArray, FloatArray, FloatArray, FloatArray, FloatArray]


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


def partial_from_frame(df: pd.DataFrame, contract: Contract) -> pd.DataFrame:
    """The partial aggregate (count, mean, M2, min, max per value, rows) of one part's rows."""
    keys = df[list(contract.group_by)]
    if len(df) == 0:
        return _empty_partial(contract, {k: df[k].dtype for k in contract.group_by})
    codes, uniques = _group_codes(keys)
    columns = [df[v].to_numpy(dtype=np.float64, na_value=np.nan) for v in contract.values]
    moments = _value_stats(columns, codes, len(uniques))
    return _partial_from_moments(uniques, moments, contract)


def partial_from_groups(groups: native.Groups, contract: Contract) -> pd.DataFrame:
    """The partial of the native kernels' moments by key (one int64 key, any group order)."""
    (key,) = contract.group_by
    order = np.argsort(groups.keys, kind="stable")
    moments = (
        groups.rows[order],
        groups.count[order],
        groups.mean[order],
        groups.m2[order],
        groups.min[order],
        groups.max[order],
    )
    return _partial_from_moments(pd.DataFrame({key: groups.keys[order]}), moments, contract)


def part_partial(
    body: native.Buffer, contract: Contract, fmt: str, alone: bool = False
) -> tuple[pd.DataFrame, int]:
    """One part's partial and its row count, from its bytes; a PartError when it is rejected.

    A plain CSV part goes through the native single-pass parser, on every CPU when the
    part is computed ``alone`` (no other part's task competes for them: see
    job.PartialTask), else on one thread. Every other part, and a
    CSV part that parser leaves alone, is read by pyarrow (read_table); its moments then
    come from the native kernels on the key column itself (one int64 key, float64 values)
    or from partial_from_frame. A Parquet part computed ``alone`` is decoded a batch
    ahead of those kernels, on a second thread (parse.read_ahead).
    """
    if fmt in ("csv", "csv.gz"):
        body = parse.csv_text(body, fmt)
        fmt = "csv"
        pieces = parse.csv_groups(body, contract, available_cpus() if alone else 1)
        if pieces is not None:
            partials = [partial_from_groups(g, contract) for g in pieces]
            merged = partials[0] if len(partials) == 1 else merge_partials(partials, contract)
            return merged, sum(g.records for g in pieces)
    if fmt == "parquet":
        tables = parse.parquet_tables(body, contract)
        groups = parse.table_groups(parse.read_ahead(tables) if alone else tables, contract)
        if groups is not None:
            return partial_from_groups(groups, contract), groups.records
    table = parse.read_table(body, contract, fmt)
    groups = parse.table_groups([table], contract)
    if groups is not None:
        return partial_from_groups(groups, contract), groups.records
    frame = parse.table_frame(table, contract)
    return partial_from_frame(frame, contract), len(frame)


def _partial_from_moments(uniques: pd.DataFrame, moments: Moments, contract: Contract) -> pd.DataFrame:
    """The partial table from per-group moments, whichever kernels computed them."""
    rows, cnt, mean, m2, mn, mx = moments
    _pin_constant_groups(mean, m2, mn, mx)
    stats = (cnt, mean, m2, mn, mx)
    out: dict[str, object] = {c: uniques[c].to_numpy() for c in contract.group_by}
    out[ROWS] = rows
    for j, v in enumerate(contract.values):
        _put_moments(out, v, *(s[:, j] for s in stats))
    return _partial_table(out, contract, uniques)


def _put_moments(out: dict[str, object], v: str, *moments: npt.NDArray[Any]) -> None:
    """Store one value column's count, mean, M2, min and max under its partial names."""
    for name, array in zip(("count", "mean", "m2", "min", "max"), moments, strict=True):
        out[f"{v}__{name}"] = array


def _partial_table(out: dict[str, object], contract: Contract, uniques: pd.DataFrame) -> pd.DataFrame:
    """The partial's columns in their canonical order, group keys in their own dtypes."""
    result = pd.DataFrame(out, columns=partial_columns(contract))
    for c in contract.group_by:
        result[c] = result[c].astype(uniques[c].dtype)
    return result


# ---- partials -> merged partial ---------------------------------------------------------


# merge_partials takes at most this many partials, and this many bytes of them, at a time:
# its memory is the merge so far plus one chunk, whatever the number of parts (a dataset's
# partials each hold every group of a part: a few hundred KB for the seed's 1,000 groups,
# hundreds of MB for a key with millions of values).
_MERGE_CHUNK = 16
_MERGE_BYTES = 64 << 20


def frame_bytes(frame: pd.DataFrame) -> int:
    """A frame's size in memory, cheaply (its arrays' buffers, not Python objects'): what
    ``memory_usage(index=True, deep=False).sum()`` says, without building that Series
    (0.2 ms against 0.5 ms for a seed partial; the job takes it twice per partial)."""
    return int(frame.index.nbytes + sum(column.array.nbytes for _, column in frame.items()))


def merge_partials(partials: Iterable[pd.DataFrame], contract: Contract) -> pd.DataFrame:
    """One partial equivalent to the partial of all the parts' rows (Chan et al. combination).

    partials is consumed a chunk at a time (up to _MERGE_CHUNK partials and _MERGE_BYTES,
    at least one), each chunk merged onto the merge so far, so a generator of partials is
    never held whole.
    """
    merged: pd.DataFrame | None = None
    rest = iter(partials)
    while chunk := _chunk(rest):
        merged = _merge_frames(chunk if merged is None else [merged, *chunk], contract)
    return _merge_frames([], contract) if merged is None else merged


def _chunk(partials: Iterator[pd.DataFrame]) -> list[pd.DataFrame]:
    chunk: list[pd.DataFrame] = []
    size = 0
    while len(chunk) < _MERGE_CHUNK and size < _MERGE_BYTES:
        frame = next(partials, None)
        if frame is None:
            break
        chunk.append(frame)
        size += frame_bytes(frame)
    return chunk


@np.errstate(invalid="ignore", divide="ignore", over="ignore")
def _merge_frames(frames: list[pd.DataFrame], contract: Contract) -> pd.DataFrame:
    """merge_partials of these partials, all at once."""
    nonempty = [p for p in frames if len(p)]
    if not nonempty:
        if frames:
            return _empty_partial(contract, {k: frames[0][k].dtype for k in contract.group_by})
        return _empty_partial(contract)
    keys = list(contract.group_by)
    # The keys through pandas (their dtypes and factorisation), the moments as plain float64
    # arrays, one column at a time: concatenating whole frames consolidates every column
    # into blocks first, most of a merge's time with many groups.
    key_frame = nonempty[0][keys] if len(nonempty) == 1 else pd.concat([p[keys] for p in nonempty])
    codes, uniques = _group_codes(key_frame)
    keep = codes >= 0 if (codes < 0).any() else None
    if keep is not None:
        codes = codes[keep]

    def column(name: str) -> FloatArray:
        arrays = [p[name].to_numpy(np.float64) for p in nonempty]
        joined = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        return joined if keep is None else joined[keep]

    k = len(uniques)
    out: dict[str, object] = {c: uniques[c].to_numpy() for c in contract.group_by}
    out[ROWS] = np.bincount(codes, weights=column(ROWS), minlength=k).astype(np.int64)
    for v in contract.values:
        n_i = column(f"{v}__count")
        mean_i = column(f"{v}__mean")
        m2_i = column(f"{v}__m2")
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
        np.fmin.at(mn, codes, column(f"{v}__min"))
        np.fmax.at(mx, codes, column(f"{v}__max"))
        _pin_constant_groups(mean, m2, mn, mx)
        _put_moments(out, v, n.astype(np.int64), mean, m2, mn, mx)
    return _partial_table(out, contract, uniques)


# ---- merged partial -> published statistics ---------------------------------------------


def _statistic(merged: pd.DataFrame, v: str, stat: str) -> FloatArray:
    if stat == "std":
        cnt = merged[f"{v}__count"].to_numpy(np.float64)
        m2 = merged[f"{v}__m2"].to_numpy(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            # Sample std (ddof=1), undefined below two values, as pandas.
            return np.where(cnt >= 2, np.sqrt(m2 / (cnt - 1)), np.nan)
    return merged[f"{v}__{stat}"].to_numpy(np.float64)


def finalize(merged: pd.DataFrame, contract: Contract) -> pd.DataFrame:
    """The published table: keys, rows, ``{v}_{stat}`` columns and derived columns."""
    keys = list(contract.group_by)
    m = merged.loc[merged[ROWS].to_numpy() >= contract.min_group_size]
    if len(m) > 1:
        m = m.sort_values(keys, kind="stable")
    out: dict[str, object] = {k: m[k].to_numpy() for k in keys}
    out["rows"] = m[ROWS].to_numpy(np.int64)
    stats: dict[tuple[str, str], FloatArray] = {}
    for v in contract.values:
        for s in ("mean", "std", "min", "max"):
            stats[(v, s)] = _statistic(m, v, s)
        for s in contract.statistics:
            out[f"{v}_{s}"] = stats[(v, s)]
    for d in contract.derived:
        out[d.name] = d.evaluate(stats.__getitem__)
    if len(out) != len(keys) + 1 + len(contract.values) * len(contract.statistics) + len(contract.derived):
        raise ValueError("result column names collide; rename the contract's columns")
    result = pd.DataFrame(out)
    for k in keys:
        result[k] = result[k].astype(m[k].dtype)
    return result.reset_index(drop=True)


def to_reference_shape(final: pd.DataFrame, contract: Contract) -> pd.DataFrame:
    """finalize()'s table in the reference's shape: (value, stat) columns indexed by key."""
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
