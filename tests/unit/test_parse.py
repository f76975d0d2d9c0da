"""Part files become contract-typed frames, or a PartError that names column and line only."""

from __future__ import annotations

import dataclasses
import gzip
import io
import itertools
import threading
import time
import zlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s3rollup import parse
from s3rollup.contract import DEFAULT_CONTRACT, Contract
from s3rollup.parse import PartError, detect_format, read_ahead, read_part
from s3rollup.validate import Limits, validate_part

C = DEFAULT_CONTRACT
HEADER = "id,value1,value2,value3,category\n"
STRING_KEYS = Contract(columns={"region": "string", "x": "float64"}, group_by=("region",), values=("x",))


def seed_frame(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "id": np.arange(n),
            "value1": rng.standard_normal(n),
            "value2": rng.standard_normal(n),
            "value3": rng.standard_normal(n),
            "category": rng.integers(0, 20, n),
        }
    )


def csv_bytes(df: pd.DataFrame) -> bytes:
    # repr-exact floats so a round trip can be compared bit for bit
    return df.to_csv(index=False, float_format="%.17g").encode("utf-8")


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def rows(*lines: str) -> bytes:
    return (HEADER + "".join(line + "\n" for line in lines)).encode("utf-8")


def reject(body: bytes, contract: Contract = C) -> PartError:
    with pytest.raises(PartError) as info:
        read_part(body, contract)
    return info.value


# ---- formats ----------------------------------------------------------------------------


def test_detect_format_goes_by_content_not_name() -> None:
    assert detect_format(b"PAR1", "part.csv") == "parquet"
    assert detect_format(b"\x1f\x8b\x08\x00", "part.parquet") == "csv.gz"
    assert detect_format(b"id,v", "part.csv.gz") == "csv"


def test_csv_csv_gz_and_parquet_read_to_identical_frames() -> None:
    # GIVEN the same rows as CSV, gzipped CSV and Parquet
    df = seed_frame()
    body = csv_bytes(df)
    # WHEN each is read
    from_csv = read_part(body, C)
    from_gz = read_part(gzip.compress(body), C)
    from_parquet = read_part(parquet_bytes(pa.Table.from_pandas(df, preserve_index=False)), C)
    # THEN the frames are identical and hold the used columns of the source
    expected = df[list(C.used_columns)].reset_index(drop=True)
    pd.testing.assert_frame_equal(from_csv, expected, check_exact=True)
    pd.testing.assert_frame_equal(from_gz, expected, check_exact=True)
    pd.testing.assert_frame_equal(from_parquet, expected, check_exact=True)


def test_returns_used_columns_in_contract_order_whatever_the_header_order() -> None:
    body = b"category,value3,id,value2,value1\n3,1.5,1,2.5,0.5\n"
    df = read_part(body, C)
    assert list(df.columns) == ["category", "value1", "value2", "value3"]
    assert df.iloc[0].tolist() == [3, 0.5, 2.5, 1.5]


def test_header_only_csv_is_a_part_with_zero_rows_and_contract_dtypes() -> None:
    for body in (HEADER.encode(), HEADER.strip().encode(), gzip.compress(HEADER.encode())):
        df = read_part(body, C)
        assert len(df) == 0
        assert df.dtypes.to_dict() == {
            "category": np.dtype("int64"),
            "value1": np.dtype("float64"),
            "value2": np.dtype("float64"),
            "value3": np.dtype("float64"),
        }


def test_utf8_bom_is_tolerated() -> None:
    body = b"\xef\xbb\xbf" + rows("1,0.5,1.5,2.5,7")
    assert read_part(body, C)["category"].tolist() == [7]
    assert read_part(gzip.compress(body), C)["category"].tolist() == [7]


def test_empty_value_cells_are_nan() -> None:
    df = read_part(rows("1,,1.5,,7", "2,0.5,,2.5,8"), C)
    assert np.isnan(df["value1"][0]) and np.isnan(df["value3"][0]) and np.isnan(df["value2"][1])


def test_crlf_line_endings_are_read() -> None:
    body = rows("1,0.5,1.5,2.5,7", "2,0.5,1.5,2.5,8").replace(b"\n", b"\r\n")
    assert read_part(body, C)["category"].tolist() == [7, 8]


@pytest.mark.parametrize("pack", [bytes, gzip.compress], ids=["csv", "csv.gz"])
def test_quoted_header_and_line_breaks_inside_quoted_values(pack) -> None:
    # GIVEN a quoted header (as Arrow and Spark write it), then rows whose keys hold a
    # line break inside quotes, over several of pyarrow's parse blocks
    body = '"region","x"\n' + "".join(f'"r{i % 7}\nnext",{i}\n' for i in range(200_000))
    # WHEN it is read
    df = read_part(pack(body.encode()), STRING_KEYS)
    # THEN every record is one row and the multi-line keys are intact
    assert len(df) == 200_000
    assert set(df["region"]) == {f"r{i}\nnext" for i in range(7)}


def test_quoted_header_alone_does_not_change_values() -> None:
    body = b'"id","value1","value2","value3","category"\n' + rows("1,0.5,1.5,2.5,7").split(b"\n", 1)[1]
    assert read_part(body, C)["value1"].tolist() == [0.5]


def test_string_keys_come_back_as_pandas_strings() -> None:
    df = read_part("region,x\nnorth,1\nsüd,2\n".encode(), STRING_KEYS)
    assert pd.api.types.is_string_dtype(df["region"]) and df["region"].tolist() == ["north", "süd"]


# ---- header problems --------------------------------------------------------------------


def test_missing_column_is_rejected() -> None:
    err = reject(b"id,value1,value2,value3\n1,2,3,4\n")
    assert (err.code, err.line) == ("MISSING_COLUMN", 1) and "category" in err.message


def test_duplicate_column_is_rejected() -> None:
    err = reject(b"id,value1,value2,value3,category,value2\n1,2,3,4,5,6\n")
    assert (err.code, err.line) == ("DUPLICATE_COLUMN", 1) and "value2" in err.message


def test_unexpected_column_is_rejected() -> None:
    err = reject(b"id,value1,value2,value3,category,extra\n1,2,3,4,5,6\n")
    assert (err.code, err.line) == ("UNEXPECTED_COLUMN", 1)


def test_headerless_file_does_not_echo_its_first_row() -> None:
    # GIVEN a file whose first line is data, not a header
    err = reject(b"17,jane.doe@example.com,1,2,3\n")
    # THEN the header error quotes nothing from that line
    assert err.code in ("MISSING_COLUMN", "UNEXPECTED_COLUMN")
    assert "jane" not in str(err) and "17" not in str(err)


def test_empty_file_is_a_bad_format() -> None:
    assert reject(b"").code == "BAD_FORMAT"


def test_header_that_is_not_utf8_is_bad_encoding() -> None:
    err = reject(HEADER.replace("value3", "valu\xe93").encode("latin-1"))
    assert (err.code, err.line) == ("BAD_ENCODING", 1)


# ---- cell problems ----------------------------------------------------------------------


def test_bad_value_reports_code_and_line_but_not_the_value() -> None:
    # GIVEN a CSV whose 56th data row (line 57, the header is line 1) has a bad value2
    lines = [f"{i},0.5,1.5,2.5,{i % 7}" for i in range(200)]
    lines[55] = "55,0.5,SECRET-4242,2.5,3"
    # WHEN it is read
    err = reject(rows(*lines))
    # THEN the error says BAD_VALUE at line 57, in value2, without the cell
    assert (err.code, err.line) == ("BAD_VALUE", 57)
    assert "value2" in err.message
    assert "SECRET" not in str(err) and "4242" not in str(err)


def test_bad_value_in_gzipped_csv_reports_its_line() -> None:
    lines = [f"{i},0.5,1.5,2.5,{i % 7}" for i in range(100)]
    lines[9] = "9,0.5,1.5,2.5,seven"
    err = reject(gzip.compress(rows(*lines)))
    assert (err.code, err.line) == ("BAD_VALUE", 11) and "seven" not in str(err)


def test_pyarrow_exception_is_not_chained_to_the_part_error() -> None:
    # pyarrow's own message quotes the cell; it must not ride along in tracebacks.
    err = reject(rows("1,0.5,PRIVATE,2.5,7"))
    assert err.__cause__ is None and err.__suppress_context__


def test_line_numbers_count_physical_lines_of_quoted_multiline_cells() -> None:
    body = (HEADER + '1,0.5,1.5,2.5,7\n"2\n\n",0.5,1.5,2.5,8\n3,0.5,oops,2.5,9\n').encode()
    err = reject(body)
    assert (err.code, err.line) == ("BAD_VALUE", 6)


def test_integer_column_rejects_fractions_and_overflow() -> None:
    assert reject(rows("1,0.5,1.5,2.5,7", "2,0.5,1.5,2.5,7.5")).line == 3
    err = reject(rows("1,0.5,1.5,2.5,99999999999999999999"))
    assert (err.code, err.line) == ("BAD_VALUE", 2)


def test_rows_whose_group_key_is_missing_are_left_out_as_pandas_groupby_does() -> None:
    # GIVEN a part whose key is empty, NA or null in some rows
    body = rows("1,0.5,1.5,2.5,7", "2,0.5,1.5,2.5,", "3,0.5,1.5,2.5,NA", "4,1,2,3,null", "5,1,2,3,8")
    # WHEN it is read THEN those rows are in no group, as in pandas' read_csv + groupby
    df = read_part(body, C)
    assert df["category"].tolist() == [7, 8]
    assert sorted(pd.read_csv(io.BytesIO(body)).dropna(subset=["category"])["category"]) == [7.0, 8.0]


def test_a_missing_string_group_key_leaves_its_row_out() -> None:
    assert read_part(b"region,x\nnorth,1\n,2\nNA,3\n", STRING_KEYS)["region"].tolist() == ["north"]


def test_pandas_missing_value_spellings_are_nan_in_value_columns() -> None:
    # GIVEN value cells as R, SQL exports and spreadsheets write a missing value
    body = rows("1,NA,null,N/A,7", "2,NULL,#N/A,nan,7", "3,-1.#IND,<NA>,None,7", "4,0.5,1.5,2.5,7")
    # WHEN the part is read THEN they are NaN, as pandas reads them
    df = read_part(body, C)
    expected = pd.read_csv(io.BytesIO(body))
    for v in ("value1", "value2", "value3"):
        assert df[v].isna().tolist() == expected[v].isna().tolist() == [True, True, True, False]


def test_a_contract_narrows_or_extends_the_missing_value_spellings() -> None:
    narrow = dataclasses.replace(C, na_values=("",))
    assert reject(rows("1,NA,1.5,2.5,7"), narrow).code == "BAD_VALUE"
    assert np.isnan(read_part(rows("1,,1.5,2.5,7"), narrow)["value1"][0])
    extended = dataclasses.replace(C, na_values=(*C.na_values, "-999", "missing"))
    df = read_part(rows("1,-999,missing,2.5,7", "2,1,2,3,-999"), extended)
    assert df["value1"].isna().tolist() == [True] and df["value2"].isna().tolist() == [True]
    assert df["category"].tolist() == [7]


def test_a_spelling_not_in_the_contract_is_a_bad_value_named_by_its_line() -> None:
    err = reject(rows("1,0.5,1.5,2.5,7", "2,0.5,missing,2.5,7"))
    assert (err.code, err.line) == ("BAD_VALUE", 3) and "missing" not in str(err)


def test_row_with_wrong_field_count_is_bad_format_with_line() -> None:
    err = reject(rows("1,0.5,1.5,2.5,7", "2,0.5,1.5", "3,0.5,1.5,2.5,9"))
    assert (err.code, err.line) == ("BAD_FORMAT", 3)


def test_invalid_utf8_in_a_string_key_is_bad_encoding_with_line() -> None:
    err = reject(b"region,x\nnorth,1\nb\xe9l,2\n", STRING_KEYS)
    assert (err.code, err.line) == ("BAD_ENCODING", 3)


def test_corrupt_gzip_is_bad_format() -> None:
    assert reject(b"\x1f\x8b\x08\x00garbage").code == "BAD_FORMAT"
    assert reject(gzip.compress(csv_bytes(seed_frame()))[:-40]).code == "BAD_FORMAT"
    assert reject(gzip.compress(csv_bytes(seed_frame())) + b"trailing").code == "BAD_FORMAT"


def test_gzip_members_and_padding_inflate_as_the_gzip_module_inflates_them() -> None:
    # GIVEN the same text as one member, as members of every size (thousands of tiny ones,
    # an empty one) with NUL padding between and after them, and as a BGZF-like run of blocks
    text = csv_bytes(seed_frame())
    cuts = [0, 1, 2, 50, 51, 51, *range(100, 3_100), len(text) // 2, len(text)]
    members = [gzip.compress(text[a:b]) for a, b in itertools.pairwise(cuts)]
    shapes = {
        "one member": gzip.compress(text),
        "many members, padded": b"\0".join(members[:10]) + b"\0\0" + b"".join(members[10:]) + b"\0" * 7,
        "blocks": b"".join(gzip.compress(text[i : i + 65_000]) for i in range(0, len(text), 65_000)),
    }
    for name, body in shapes.items():
        # THEN each reads as the gzip module reads it, and as the plain text does
        assert parse._gunzip(body) == gzip.decompress(body) == text, name
        pd.testing.assert_frame_equal(read_part(body, C), read_part(text, C))


def test_gzip_text_goes_into_the_thread_s_buffer_and_grows_it_past_its_trailer_s_size(monkeypatch) -> None:
    monkeypatch.setattr(parse, "_buffers", type(parse._buffers)())
    text = csv_bytes(seed_frame(n=2_000))
    # GIVEN two members, the last one small: the trailer states only its size
    body = gzip.compress(text[:-100]) + gzip.compress(text[-100:])
    # WHEN it is inflated THEN the thread's buffer grows to hold it all
    assert bytes(parse._gunzip(body)) == text
    first = parse._buffers.text
    assert len(first) >= len(text)
    # ... and the thread's next part, no larger, is inflated into the same buffer
    assert bytes(parse._gunzip(gzip.compress(text[:5_000]))) == text[:5_000]
    assert parse._buffers.text is first


def test_a_gzip_bomb_past_the_validated_head_is_rejected_before_it_fills_memory() -> None:
    # GIVEN a CSV.gz part whose first megabyte is ordinary rows (all the validator inflates:
    # it passes) and whose last member inflates 256 MiB of zeros from about 260 KB
    head = csv_bytes(seed_frame(n=20_000))
    assert len(head) > Limits().head_bytes
    zeros = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = b"".join(zeros.compress(b"0" * (1 << 20)) for _ in range(256)) + zeros.flush()
    body = gzip.compress(head) + bomb
    assert validate_part(len(body), body[: Limits().head_bytes], None, C, Limits()).ok
    assert parse.GZIP_MAX_RATIO * len(body) < 256 << 20
    # WHEN the worker reads it THEN it is rejected as a bomb, by the validator's ratio
    err = reject(body)
    assert err.code == "GZIP_BOMB" and str(parse.GZIP_MAX_RATIO) in err.message


# ---- Parquet ----------------------------------------------------------------------------


def test_parquet_narrow_numeric_types_are_widened() -> None:
    table = pa.table(
        {
            "id": pa.array([1, 2], pa.int32()),
            "value1": pa.array([0.5, 1.5], pa.float32()),
            "value2": pa.array([1, 2], pa.int16()),
            "value3": pa.array([2.5, 3.5], pa.float64()),
            "category": pa.array([7, 8], pa.int32()),
        }
    )
    df = read_part(parquet_bytes(table), C)
    assert df["category"].dtype == np.int64 and df["value1"].dtype == np.float64
    assert df["value2"].tolist() == [1.0, 2.0]


def test_parquet_lossy_cast_is_bad_value() -> None:
    df = seed_frame(5).assign(category=[1.0, 2.5, 3.0, 4.0, 5.0])
    err = reject(parquet_bytes(pa.Table.from_pandas(df, preserve_index=False)))
    assert err.code == "BAD_VALUE" and "category" in err.message and "2.5" not in str(err)


def test_parquet_text_in_a_numeric_column_is_bad_value() -> None:
    df = seed_frame(3).assign(value2=["1", "2", "x"])
    err = reject(parquet_bytes(pa.Table.from_pandas(df, preserve_index=False)))
    assert err.code == "BAD_VALUE" and "value2" in err.message


def test_parquet_rows_with_a_null_group_key_are_left_out() -> None:
    df = seed_frame(3).assign(category=pd.array([1, None, 3], dtype="Int64"))
    assert read_part(parquet_bytes(pa.Table.from_pandas(df, preserve_index=False)), C)[
        "category"
    ].tolist() == [
        1,
        3,
    ]


def test_parquet_header_is_checked_like_csv() -> None:
    df = seed_frame(3)
    assert reject(parquet_bytes(pa.Table.from_pandas(df.drop(columns="id")))).code == ("MISSING_COLUMN")
    extra = pa.Table.from_pandas(df.assign(extra=1), preserve_index=False)
    assert reject(parquet_bytes(extra)).code == "UNEXPECTED_COLUMN"


def test_parquet_from_pandas_with_unnamed_index_is_accepted() -> None:
    df = seed_frame(6).iloc[[5, 1, 3]]
    table = pa.Table.from_pandas(df, preserve_index=True)
    assert "__index_level_0__" in table.column_names
    assert read_part(parquet_bytes(table), C)["category"].tolist() == df["category"].tolist()


def test_garbage_after_parquet_magic_is_bad_format() -> None:
    assert reject(b"PAR1 not really parquet").code == "BAD_FORMAT"


def test_parquet_column_name_that_is_not_utf8_is_bad_encoding() -> None:
    body = parquet_bytes(pa.Table.from_pandas(seed_frame(), preserve_index=False))
    # The footer's schema element for "category": its name (thrift compact: 0x18, length 8,
    # the bytes), then the element's end (0x00).
    at = body.index(b"\x18\x08category\x00")
    broken = body[:at] + b"\x18\x08categor\x80" + body[at + 10 :]
    err = reject(broken)
    assert (err.code, err.message) == ("BAD_ENCODING", "Parquet column names are not UTF-8")


def test_parquet_column_with_no_values_reads_as_nan() -> None:
    table = pa.Table.from_pandas(seed_frame(3), preserve_index=False)
    table = table.set_column(table.schema.get_field_index("value3"), "value3", pa.nulls(3, pa.null()))
    df = read_part(parquet_bytes(table), C)
    assert df["value3"].dtype == np.float64 and df["value3"].isna().all()


# ---- read_ahead -------------------------------------------------------------------------


def _read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "s3rollup-read-ahead"]


def test_read_ahead_yields_every_item_in_order_from_another_thread() -> None:
    made_on: set[int] = set()

    def items():
        for i in range(50):
            made_on.add(threading.get_ident())
            yield i

    ahead = read_ahead(items())
    assert not _read_ahead_threads()  # nothing runs before the first item is asked for
    assert list(ahead) == list(range(50))
    assert made_on and threading.get_ident() not in made_on
    assert not _read_ahead_threads()


def test_read_ahead_raises_where_the_items_raised() -> None:
    def items():
        yield 1
        yield 2
        raise PartError("BAD_VALUE", "column 'value1' is bad", line=7)

    got = []
    with pytest.raises(PartError) as err:
        for item in read_ahead(items()):
            got.append(item)
    assert got == [1, 2]
    assert (err.value.code, err.value.line) == ("BAD_VALUE", 7)
    assert not _read_ahead_threads()


def test_read_ahead_stops_its_producer_when_the_caller_stops_early() -> None:
    produced = []

    def items():
        for i in range(1_000):
            time.sleep(0.001)
            produced.append(i)
            yield i

    ahead = read_ahead(items(), depth=2)
    assert next(ahead) == 0
    ahead.close()  # e.g. the kernels raised on the first batch
    assert not _read_ahead_threads()  # the producer is gone: nothing reads the part anymore
    stopped_at = len(produced)
    assert stopped_at <= 5  # the item handed over, two queued, one being made, one checked
    time.sleep(0.05)
    assert len(produced) == stopped_at
