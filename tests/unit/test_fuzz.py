"""Fuzzing the part path end to end: whatever the bytes, the validator (Lambda) and the parser
(worker) give a verdict or a clean PartError, and the validator never accepts a part the
parser then fails on with anything but a PartError. Valid parts keep every row."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s3rollup.contract import DEFAULT_CONTRACT
from s3rollup.demo import to_csv_bytes
from s3rollup.parse import PartError, detect_format, read_part
from s3rollup.validate import Limits, plan_reads, validate_part

DEFAULT = Limits()
SMALL = Limits(head_bytes=1024, tail_bytes=64, sample_rows=20)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decide(data: bytes, limits: Limits = DEFAULT) -> bool:
    """The Lambda's verdict on data, reading only what plan_reads asks for."""
    ranges = plan_reads(len(data), limits)
    head = data[: ranges[0][1] + 1] if ranges else b""
    tail = data[ranges[1][0] : ranges[1][1] + 1] if len(ranges) > 1 else None
    return validate_part(len(data), head, tail, DEFAULT_CONTRACT, limits).ok


def parse(data: bytes) -> pd.DataFrame | PartError:
    """The worker's reading of data (as compute_partial calls it): a frame or a PartError."""
    try:
        return read_part(data, DEFAULT_CONTRACT, detect_format(data[:8], "part"))
    except PartError as exc:
        assert exc.code and "\n" not in exc.message
        return exc


def encode(frame: pd.DataFrame, fmt: str) -> bytes:
    """A part in one of the three formats."""
    if fmt == "parquet":
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        return buf.getvalue()
    csv = to_csv_bytes(frame)
    return gzip.compress(csv, mtime=0) if fmt == "csv.gz" else csv


floats = st.floats(allow_nan=True, allow_infinity=False, width=64)


@st.composite
def frames(draw: st.DrawFn) -> pd.DataFrame:
    """A valid part: 0-40 rows, any finite or NaN values, any int64 ids and categories."""
    n = draw(st.integers(0, 40))
    ints = st.integers(-(2**63), 2**63 - 1)
    return pd.DataFrame(
        {
            "id": np.array(draw(st.lists(ints, min_size=n, max_size=n)), dtype=np.int64),
            "value1": np.array(draw(st.lists(floats, min_size=n, max_size=n)), dtype=np.float64),
            "value2": np.array(draw(st.lists(floats, min_size=n, max_size=n)), dtype=np.float64),
            "value3": np.array(draw(st.lists(floats, min_size=n, max_size=n)), dtype=np.float64),
            "category": np.array(draw(st.lists(ints, min_size=n, max_size=n)), dtype=np.int64),
        }
    )


@FUZZ
@given(frame=frames(), fmt=st.sampled_from(["csv", "csv.gz", "parquet"]))
def test_valid_parts_are_accepted_and_read_with_every_row(frame: pd.DataFrame, fmt: str) -> None:
    data = encode(frame, fmt)
    # A 64-byte tail window cannot hold a real Parquet footer: SMALL is for text parts.
    assert decide(data) and (fmt == "parquet" or decide(data, SMALL))
    got = parse(data)
    assert isinstance(got, pd.DataFrame), got
    assert len(got) == len(frame)
    for col in DEFAULT_CONTRACT.used_columns:
        np.testing.assert_array_equal(got[col].to_numpy(dtype=float), frame[col].to_numpy(dtype=float))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid part with bytes flipped, inserted, deleted or cut off."""
    data = bytearray(encode(draw(frames()), draw(st.sampled_from(["csv", "csv.gz", "parquet"]))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.sampled_from([b",", b"\n", b'"', b"\r", b"\x00", b"x", b"-", b"1e999"]))
        elif op == "delete" and data:
            del data[i]
        elif op == "cut":
            del data[i:]
    return bytes(data)


@FUZZ
@given(data=mutated())
def test_an_accepted_mutated_part_parses_or_fails_cleanly(data: bytes) -> None:
    accepted = decide(data), decide(data, SMALL)
    got = parse(data)  # only a frame or a PartError: anything else fails the test
    if any(accepted) and isinstance(got, pd.DataFrame):
        assert list(got.columns) == list(DEFAULT_CONTRACT.used_columns)


@FUZZ
@given(
    prefix=st.sampled_from([b"", b"PAR1", b"\x1f\x8b\x08\x00", b"id,value1,value2,value3,category\n"]),
    body=st.binary(max_size=2000),
)
def test_arbitrary_bytes_never_escape_the_parser(prefix: bytes, body: bytes) -> None:
    data = prefix + body
    decide(data)
    parse(data)
