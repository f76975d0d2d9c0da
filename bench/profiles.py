"""The bench's data profiles: what the parts hold and how they are written.

Each profile makes part ``i`` of a data set from (i, rows, seed) alone, in the seed's schema
(``id``, ``value1..3``, ``category``), and writes it as CSV (or CSV.gz) and Parquet. The
demo's profile is ``s3rollup.demo``'s parts; the others are data a new user may bring:
heavy tails at full precision, many small groups, skewed groups, a large constant offset,
missing values spelled as R and SQL exports spell them, and gzipped CSV.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from s3rollup.contract import DEFAULT_NA_VALUES
from s3rollup.demo import generate_part, to_csv_bytes

Frame = pd.DataFrame


@dataclass(frozen=True)
class Profile:
    """One kind of data: its parts' frames and their CSV bytes."""

    name: str
    about: str  # one line for the report
    generate: Callable[[int, int, int], Frame]  # (part, rows, seed) -> the part's frame
    csv: Callable[[Frame], bytes]  # the part's CSV file (gzipped for csv_ext "csv.gz")
    csv_ext: str = "csv"
    parquet: bool = True  # also written and measured as Parquet
    na_spelled: bool = False  # missing values are spelled (NA, null, ...), not empty cells
    missing_keys: bool = False  # some rows have no group key (pandas leaves them out)

    def read_csv_body(self, body: bytes) -> bytes:
        """The CSV text of a written part (inflated)."""
        return gzip.decompress(body) if self.csv_ext == "csv.gz" else body


def _rng(profile: str, index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, zlib.crc32(profile.encode())])


def _frame(index: int, rows: int, v1: object, v2: object, v3: object, category: object) -> Frame:
    return pd.DataFrame(
        {
            "id": np.arange(index * rows, (index + 1) * rows, dtype=np.int64),
            "value1": v1,
            "value2": v2,
            "value3": v3,
            "category": category,
        }
    )


def _csv_17_digits(frame: Frame) -> bytes:
    """Every float with 17 significant digits (the longest exact form, as `%.17g` writes it)."""
    return frame.to_csv(index=False, float_format="%.17g", lineterminator="\n").encode()


def heavy(index: int, rows: int, seed: int) -> Frame:
    """Student-t (3 degrees of freedom) x 1,000, lognormal (sigma 2) and Pareto (1.5) values;
    5,000 evenly filled groups."""
    rng = _rng("heavy", index, seed)
    return _frame(
        index,
        rows,
        rng.standard_t(3, rows) * 1e3,
        rng.lognormal(0.0, 2.0, rows),
        rng.pareto(1.5, rows) * 10.0,
        rng.integers(0, 5_000, rows),
    )


def groups_100k(index: int, rows: int, seed: int) -> Frame:
    """100,000 groups (about 10 rows each per 1M-row part), keys spread over 0..2^40 as
    customer ids are (no small range to index by), standard normal values."""
    rng = _rng("groups100k", index, seed)
    g = rng.integers(0, 100_000, rows)
    keys = (g * 2_654_435_761 + 12_345) % (1 << 40)  # an odd multiplier: distinct g, distinct keys
    return _frame(
        index, rows, rng.standard_normal(rows), rng.standard_normal(rows), rng.standard_normal(rows), keys
    )


_ZIPF_GROUPS = 10_000


def zipf(index: int, rows: int, seed: int) -> Frame:
    """10,000 groups whose sizes follow Zipf's law (s = 1.1): the largest holds about 10% of
    the rows, most hold a handful; standard normal values scaled by 100."""
    rng = _rng("zipf", index, seed)
    p = 1.0 / np.arange(1, _ZIPF_GROUPS + 1) ** 1.1
    ranks = rng.choice(_ZIPF_GROUPS, rows, p=p / p.sum())
    keys = np.random.default_rng([seed, 7]).permutation(_ZIPF_GROUPS)[ranks]  # the same in every part
    return _frame(
        index,
        rows,
        rng.standard_normal(rows) * 100,
        rng.standard_normal(rows),
        rng.standard_normal(rows),
        keys,
    )


def offset(index: int, rows: int, seed: int) -> Frame:
    """value1 = 1e6 + N(0, 1), value3 = -2e5 + N(0, 0.1): a variance taken as E[x^2] - E[x]^2
    loses ~12 of its 16 digits there (1e-4 relative off over 20 x 1M rows), a stable one
    does not. (At 1e9 + N(0, 1) pandas' own std is 1e-7 off the exact value, s3rollup's
    2e-8: the check against pandas at 1e-9 would test pandas.) 1,000 groups."""
    rng = _rng("offset", index, seed)
    return _frame(
        index,
        rows,
        1e6 + rng.standard_normal(rows),
        rng.standard_normal(rows),
        -2e5 + rng.standard_normal(rows) * 0.1,
        rng.integers(0, 1_000, rows),
    )


def nan_heavy(index: int, rows: int, seed: int) -> Frame:
    """value1 30% missing, value2 70%, value3 missing in every tenth group and 5% elsewhere;
    0.1% of the rows have no group key; 1,000 groups."""
    rng = _rng("nan", index, seed)
    v1, v2, v3 = rng.standard_normal(rows), rng.standard_normal(rows), rng.standard_normal(rows)
    cat = rng.integers(0, 1_000, rows).astype(np.float64)
    v1[rng.random(rows) < 0.3] = np.nan
    v2[rng.random(rows) < 0.7] = np.nan
    v3[(cat % 10 == 0) | (rng.random(rows) < 0.05)] = np.nan
    cat[rng.random(rows) < 0.001] = np.nan
    return _frame(index, rows, v1, v2, v3, cat)


def _csv_spelled(frame: Frame) -> bytes:
    """Shortest round-trip floats; each missing cell spelled as one of pandas' missing-value
    spellings, at random (the empty cell among them)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(len(frame))
    spellings = pa.array([s for s in DEFAULT_NA_VALUES])
    columns = []
    for c in frame.columns:
        values = frame[c].to_numpy()
        arr = pa.array(values, type=pa.int64() if c in ("id", "category") else None, from_pandas=True)
        text = pc.cast(arr, pa.string())
        if text.null_count:
            fill = pc.take(spellings, pa.array(rng.integers(0, len(spellings), len(frame))))
            text = pc.if_else(pc.is_null(text), fill, text)
        columns.append(text)
    buf = io.BytesIO()
    buf.write((",".join(frame.columns) + "\n").encode())
    table = pa.table(columns, names=list(frame.columns))
    pacsv.write_csv(table, buf, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    return buf.getvalue()


def _about(f: Callable[..., object]) -> str:
    return " ".join((f.__doc__ or "").split())


def _gz(frame: Frame) -> bytes:
    return gzip.compress(to_csv_bytes(frame), compresslevel=6)  # gzip's own default level


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "demo",
            "s3rollup demo's parts: standard normal values (shortest repr), 1,000 evenly filled groups",
            generate_part,
            to_csv_bytes,
        ),
        Profile("heavy", _about(heavy) + " Written with 17 significant digits.", heavy, _csv_17_digits),
        Profile("groups100k", _about(groups_100k), groups_100k, to_csv_bytes),
        Profile("zipf", _about(zipf), zipf, to_csv_bytes),
        Profile("offset", _about(offset), offset, to_csv_bytes),
        Profile(
            "nan",
            _about(nan_heavy)
            + " Missing cells spelled as pandas' spellings at random (NA, null, N/A, '', ...).",
            nan_heavy,
            _csv_spelled,
            na_spelled=True,
            missing_keys=True,
        ),
        Profile(
            "gz",
            "the demo's parts as CSV.gz (gzip level 6); CSV only",
            generate_part,
            _gz,
            csv_ext="csv.gz",
            parquet=False,
        ),
    )
}


def parquet_bytes(frame: Frame) -> bytes:
    """A part as Parquet: pyarrow's defaults (snappy, one row group per 1M rows); integer
    columns stay int64 where values are missing (as nulls)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = [
        pa.array(
            frame[c].to_numpy(),
            type=pa.int64() if c in ("id", "category") else pa.float64(),
            from_pandas=True,
        )
        for c in frame.columns
    ]
    buf = io.BytesIO()
    pq.write_table(pa.table(arrays, names=list(frame.columns)), buf)
    return buf.getvalue()
