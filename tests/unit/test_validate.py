"""The cheap part validator: corpus of bad and good parts, read budget, fuzzing, imports."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import io
import json
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s3rollup.contract import DEFAULT_CONTRACT, Contract
from s3rollup.validate import (
    REASON_CODES,
    RETRYABLE_CODES,
    Limits,
    Verdict,
    needs_tail,
    plan_reads,
    validate_part,
)

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "corpus"
CODES = {code for code, _ in REASON_CODES}
HEADER = b"id,value1,value2,value3,category\n"
MiB = 1 << 20

# Every code a test saw, so the last test can check none is outside REASON_CODES.
_SEEN_CODES: set[str] = set()


def _load_make_corpus() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_corpus", CORPUS / "make_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_corpus = _load_make_corpus()
EXPECTED: dict[str, str] = json.loads((CORPUS / "bad" / "EXPECTED.json").read_text())
GOOD_FILES = sorted(p.name for p in (CORPUS / "good").iterdir())


def decide(
    data: bytes,
    size: int | None = None,
    contract: Contract = DEFAULT_CONTRACT,
    limits: Limits = Limits(),  # noqa: B008
) -> Verdict:
    """Read data the way the Lambda does: only the ranges plan_reads asks for."""
    size = len(data) if size is None else size
    ranges = plan_reads(size, limits)
    assert sum(end - start + 1 for start, end in ranges) <= limits.head_bytes
    head = data[ranges[0][0] : ranges[0][1] + 1] if ranges else b""
    tail = data[ranges[1][0] : ranges[1][1] + 1] if len(ranges) > 1 else None
    verdict = validate_part(size, head, tail, contract, limits)
    _SEEN_CODES.add(verdict.code)
    assert verdict.code == "OK" or verdict.code in CODES
    assert verdict.ok == (verdict.code == "OK")
    assert "\n" not in verdict.message and "\r" not in verdict.message
    return verdict


def csv_rows(n: int, seed: int = 7) -> bytes:
    """n valid rows with noisy floats (compresses about 2:1, like real data)."""
    rng = random.Random(seed)
    rows = (
        f"{i},{rng.uniform(-9, 9)!r},{rng.gauss(0, 1)!r},{rng.random()!r},{rng.randint(0, 50)}\n"
        for i in range(n)
    )
    return "".join(rows).encode()


STRING_CONTRACT = Contract(
    columns={"id": "int64", "name": "string", "value1": "float64", "category": "int64"},
    group_by=("category",),
    values=("value1",),
)


# ---- corpus -----------------------------------------------------------------------------------


def test_manifest_matches_generator_and_disk() -> None:
    generated = {name: code for name, (_, code) in make_corpus.bad_files().items()}
    assert generated == EXPECTED
    on_disk = {p.name for p in (CORPUS / "bad").iterdir()} - {"EXPECTED.json"}
    assert on_disk == set(EXPECTED)
    assert set(GOOD_FILES) == set(make_corpus.good_files())


def test_corpus_breadth() -> None:
    assert len(EXPECTED) >= 22
    assert len(set(EXPECTED.values())) >= 20
    assert set(EXPECTED.values()) <= CODES


@pytest.mark.parametrize(("name", "code"), sorted(EXPECTED.items()))
def test_bad_corpus_file_is_rejected_with_its_code(name: str, code: str) -> None:
    verdict = decide((CORPUS / "bad" / name).read_bytes())
    assert (verdict.ok, verdict.code) == (False, code), verdict.message


@pytest.mark.parametrize("name", GOOD_FILES)
def test_good_corpus_file_is_accepted(name: str) -> None:
    verdict = decide((CORPUS / "good" / name).read_bytes())
    assert verdict.ok, (verdict.code, verdict.message)
    assert verdict.fmt == ("csv.gz" if name.endswith(".gz") else "csv")


def _planted_fragments() -> set[str]:
    fragments = set(make_corpus.PLANTED)
    for value in make_corpus.PLANTED:
        fragments.add("".join(ch for ch in value if ch.isdigit()))
    fragments |= {"jane.doe", "example.com", "23456789", "45-6789"}
    return {f for f in fragments if len(f) >= 6}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_corpus_message_never_echoes_personal_values(name: str) -> None:
    verdict = decide((CORPUS / "bad" / name).read_bytes())
    for fragment in _planted_fragments():
        assert fragment not in verdict.message


# ---- Parquet made by pyarrow ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pa_modules() -> tuple[ModuleType, ModuleType]:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    return pa, pq


def _parquet_bytes(pq: ModuleType, table: object, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def good_parquet(pa_modules: tuple[ModuleType, ModuleType]) -> bytes:
    pa, pq = pa_modules
    table = pa.table(
        {
            "id": pa.array([1, 2, 3], pa.int64()),
            "value1": pa.array([1.5, None, 3.0], pa.float64()),
            "value2": pa.array([1.0, 2.0, 3.0], pa.float32()),
            "value3": pa.array([1, 2, 3], pa.int32()),
            "category": pa.array([7, 7, 8], pa.int64()),
        }
    )
    return _parquet_bytes(pq, table)


def test_pyarrow_parquet_is_accepted(good_parquet: bytes) -> None:
    verdict = decide(good_parquet)
    assert (verdict.ok, verdict.fmt) == (True, "parquet"), verdict.message


def test_pandas_parquet_with_index_and_compression_is_accepted(
    pa_modules: tuple[ModuleType, ModuleType],
) -> None:
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(
        {
            "id": [1, 2],
            "value1": [1.0, 2.0],
            "value2": [0.5, 1.5],
            "value3": [3.0, 4.0],
            "category": [1, 1],
        },
        index=pd.Index([10, 20], name=None),
    )
    for compression in ("snappy", "zstd", None):
        buf = io.BytesIO()
        df.to_parquet(buf, compression=compression)
        verdict = decide(buf.getvalue())
        assert verdict.ok, (compression, verdict.message)


def test_large_parquet_is_decided_from_the_tail_window(
    pa_modules: tuple[ModuleType, ModuleType],
) -> None:
    pa, pq = pa_modules
    n = 300_000
    rng = random.Random(3)
    table = pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "value1": pa.array([rng.random() for _ in range(n)]),
            "value2": pa.array([rng.random() for _ in range(n)]),
            "value3": pa.array([rng.random() for _ in range(n)]),
            "category": pa.array([i % 13 for i in range(n)], pa.int64()),
        }
    )
    data = _parquet_bytes(pq, table, row_group_size=50_000, compression="none")
    assert len(data) > 2 * MiB
    assert needs_tail(len(data), data[:4])
    verdict = decide(data)
    assert verdict.ok, verdict.message
    # The same file pretending to be 1 GiB: only head[:4] and the tail matter.
    limits = Limits()
    size = 1 << 30
    ranges = plan_reads(size, limits)
    head = data[:4] + b"\x00" * (ranges[0][1] + 1 - 4)
    tail = data[-limits.tail_bytes :]
    assert validate_part(size, head, tail, DEFAULT_CONTRACT).ok


def test_parquet_wrong_types_and_nested_columns(pa_modules: tuple[ModuleType, ModuleType]) -> None:
    pa, pq = pa_modules
    base = {
        "id": pa.array([1], pa.int64()),
        "value1": pa.array([1.0]),
        "value2": pa.array([1.0]),
        "value3": pa.array([1.0]),
        "category": pa.array([1], pa.int64()),
    }
    cases = {
        "value1": pa.array(["1.0"]),
        "value2": pa.array([{"a": 1.0}]),
        "value3": pa.array([[1.0]]),
        "category": pa.array([True]),
        "id": pa.array([1.0]),
    }
    for column, array in cases.items():
        verdict = decide(_parquet_bytes(pq, pa.table({**base, column: array})))
        assert verdict.code == "BAD_COLUMN_TYPE", (column, verdict.message)
        assert repr(column) in verdict.message


def test_parquet_footer_larger_than_tail_window(pa_modules: tuple[ModuleType, ModuleType]) -> None:
    pa, pq = pa_modules
    rng = random.Random(5)
    n = 200_000
    table = pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "value1": pa.array([rng.random() for _ in range(n)]),
            "value2": pa.array([rng.random() for _ in range(n)]),
            "value3": pa.array([rng.random() for _ in range(n)]),
            "category": pa.array([1] * n, pa.int64()),
        }
    ).replace_schema_metadata({"notes": "x" * (100 << 10)})
    data = _parquet_bytes(pq, table, compression="none")
    assert len(data) > 2 * MiB
    verdict = decide(data)
    assert verdict.code == "PARQUET_FOOTER_TOO_LARGE", verdict.message
    # A hand-made footer with padding gives the same answer without pyarrow.
    crafted = make_corpus.parquet_file(
        make_corpus.file_metadata(make_corpus.DEFAULT_PARQUET_COLUMNS, padding=80 << 10),
        body=b"\x00" * (2 * MiB),
    )
    assert decide(crafted).code == "PARQUET_FOOTER_TOO_LARGE"
    # When the whole file fits in the head window, the footer is read from it.
    small = make_corpus.parquet_file(
        make_corpus.file_metadata(make_corpus.DEFAULT_PARQUET_COLUMNS, padding=80 << 10)
    )
    assert decide(small).ok


def test_parquet_hostile_footers() -> None:
    cols = make_corpus.DEFAULT_PARQUET_COLUMNS
    # Lists nested far deeper than any real footer: rejected, no RecursionError.
    deep = b"\x19" * 10_000
    assert decide(make_corpus.parquet_file(b"\x19\x1c" + deep)).code == "PARQUET_BAD_METADATA"
    # A list claiming billions of elements.
    huge = b"\x19\xfc" + make_corpus._varint(1 << 40)
    assert decide(make_corpus.parquet_file(huge)).code == "PARQUET_BAD_METADATA"
    # num_children larger than the schema.
    bad_tree = make_corpus._struct(
        [
            (1, 5, make_corpus._zigzag(1)),
            (2, 9, make_corpus._list(12, [make_corpus.schema_element("schema", children=99)])),
            (3, 6, make_corpus._zigzag(0)),
            (4, 9, make_corpus._list(12, [])),
        ]
    )
    assert decide(make_corpus.parquet_file(bad_tree)).code == "PARQUET_BAD_METADATA"
    # Missing required num_rows.
    no_rows = make_corpus.file_metadata(cols).replace(b"\x16\x00\x19", b"\x29", 1)
    assert decide(make_corpus.parquet_file(no_rows)).code == "PARQUET_BAD_METADATA"
    # The crafted valid footer is accepted.
    assert decide(make_corpus.parquet_file(make_corpus.file_metadata(cols))).ok


# ---- read budget and windows ------------------------------------------------------------------


def test_plan_reads_shapes() -> None:
    limits = Limits()
    assert plan_reads(0) == []
    assert plan_reads(limits.max_part_bytes + 1) == []
    assert plan_reads(10) == [(0, 9)]
    assert plan_reads(limits.head_bytes) == [(0, limits.head_bytes - 1)]
    two = plan_reads(limits.head_bytes + 1)
    assert len(two) == 2 and two[0][1] < two[1][0]
    assert sum(b - a + 1 for a, b in two) == limits.head_bytes
    assert two[1] == (limits.head_bytes + 1 - limits.tail_bytes, limits.head_bytes)
    with pytest.raises(ValueError):
        plan_reads(-1)
    with pytest.raises(ValueError):
        Limits(head_bytes=100)
    with pytest.raises(ValueError):
        Limits(tail_bytes=1 << 20)


def test_one_gib_csv_is_decided_within_one_mib() -> None:
    size = 1 << 30
    ranges = plan_reads(size)
    assert sum(end - start + 1 for start, end in ranges) <= MiB
    data = HEADER + csv_rows(30_000)
    assert len(data) > MiB
    head = data[: ranges[0][1] + 1]
    assert not needs_tail(size, head)
    verdict = validate_part(size, head, None, DEFAULT_CONTRACT)
    assert (verdict.ok, verdict.fmt) == (True, "csv"), verdict.message
    assert "first 200 rows" in verdict.message
    # Passing the tail anyway changes nothing for CSV.
    assert validate_part(size, head, data[-(64 << 10) :], DEFAULT_CONTRACT).ok


def test_one_gib_csv_gz_window_cut_short_is_not_corrupt() -> None:
    data = gzip.compress(HEADER + csv_rows(60_000), mtime=0)
    assert len(data) > MiB
    assert decide(data).ok
    assert decide(data[: 2 * MiB], size=1 << 30).ok
    # The same bytes as a whole object are a truncated stream.
    assert decide(data[:300_000]).code == "BAD_GZIP"


def test_gzip_bomb_is_caught_in_a_window() -> None:
    bomb = gzip.compress(HEADER + b"0" * (100 * MiB), mtime=0)
    assert len(bomb) < 200_000
    assert decide(bomb).code == "GZIP_BOMB"
    # Inside the head window of a 4 GiB object (concatenated members are valid gzip).
    verdict = decide(bomb * 12, size=4 << 30)
    assert verdict.code == "GZIP_BOMB"
    # A lower ratio limit catches ordinary repetitive text too; a higher one lets it through.
    repetitive = gzip.compress(HEADER + b"1,1.0,2.0,3.0,4\n" * 200_000, mtime=0)
    assert decide(repetitive, limits=Limits(max_gzip_ratio=20)).code == "GZIP_BOMB"
    assert decide(repetitive, limits=Limits(max_gzip_ratio=5000)).ok


def test_many_empty_gzip_members_stay_cheap() -> None:
    empty_member = gzip.compress(b"", mtime=0)
    data = gzip.compress(HEADER + b"1,1,2,3,4\n", mtime=0) + empty_member * 40_000
    assert len(data) < MiB
    assert decide(data).ok


def _cut_inside_euro(window: int, k: int) -> bytes:
    """A CSV whose first `window` bytes end with the first k bytes of a euro sign."""
    rows = b"1,abc,1.0,2\n" * ((window - 200) // 12)
    base = b"id,name,value1,category\n" + rows
    pad = window - k - len(base) - 2
    data = base + b"2," + b"a" * pad + "€€".encode() + b",1.0,2\n" + rows
    assert data[:window].endswith("€".encode()[:k])
    return data


@pytest.mark.parametrize("k", [1, 2])
def test_utf8_char_cut_by_the_window_is_not_bad_encoding(k: int) -> None:
    limits = Limits(head_bytes=4096, tail_bytes=1024)
    window = limits.head_bytes - limits.tail_bytes
    data = _cut_inside_euro(window, k)
    assert decide(data, size=1 << 30, contract=STRING_CONTRACT, limits=limits).ok
    # As a whole object, the same cut bytes are invalid.
    assert decide(data[:window], contract=STRING_CONTRACT, limits=limits).code == "BAD_ENCODING"
    # An invalid byte before the last three is bad even in a cut window.
    bad = b"id,name,value1,category\n1,a,1,2\n2,\xff,1.0,2\n" + data[40:]
    verdict = decide(bad, size=1 << 30, contract=STRING_CONTRACT, limits=limits)
    assert (verdict.code, verdict.line) == ("BAD_ENCODING", 3)


def test_header_too_long() -> None:
    long_header = b"id,value1,value2,value3,category," + b"x" * (2 * MiB) + b"\n1,2,3,4,5,6\n"
    assert decide(long_header).code == "HEADER_TOO_LONG"
    # A quoted header field that runs past a small window (but under the csv field limit).
    quoted = b'id,value1,value2,value3,category,"' + b"y\n" * 5000 + b'"\n'
    small = Limits(head_bytes=4096, tail_bytes=1024)
    assert decide(quoted, limits=small).code == "HEADER_TOO_LONG"
    # Whole and longer than the csv field limit, it is a field too long.
    assert decide(b'id,"' + b"y\n" * 100_000 + b'"\n').code == "FIELD_TOO_LONG"
    gz = gzip.compress(long_header, mtime=0)
    # Compressed, a header of 'x' * 2 MiB is first of all a bomb.
    assert decide(gz).code == "GZIP_BOMB"


def test_quoted_field_cut_by_the_window_is_not_bad_csv() -> None:
    limits = Limits(head_bytes=4096, tail_bytes=1024)
    contract = STRING_CONTRACT
    text = b"id,name,value1,category\n" + b'1,"multi\nline",1.0,2\n' * 400
    for size_extra in (0, 1, 17):
        verdict = decide(text, size=len(text) + size_extra, contract=contract, limits=limits)
        assert verdict.ok, verdict.message
    five_rows = 24 + 21 * 5
    verdict = decide(text[:five_rows] + b'2,"open,1,2\n', contract=contract)
    assert verdict.code == "BAD_CSV", verdict.message


def test_size_rules_and_short_reads() -> None:
    assert validate_part(0, b"", None, DEFAULT_CONTRACT).code == "EMPTY_OBJECT"
    assert validate_part(6 << 30, b"", None, DEFAULT_CONTRACT).code == "TOO_LARGE"
    data = HEADER + b"1,2,3,4,5\n"
    short = validate_part(len(data) + 5, data, None, DEFAULT_CONTRACT)
    assert short.code == "SHORT_READ" and short.code in RETRYABLE_CODES
    parquet_head = b"PAR1" + b"\x00" * (MiB - (64 << 10) - 4)
    assert validate_part(2 * MiB, parquet_head, None, DEFAULT_CONTRACT).code == "SHORT_READ"
    with pytest.raises(ValueError):
        validate_part(-1, b"", None, DEFAULT_CONTRACT)
    # A longer head than asked for is cut to the window, not trusted beyond it.
    assert validate_part(len(data), data + b"junk\xff", None, DEFAULT_CONTRACT).ok


# ---- values and personal data -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "code", "column"),
    [
        (b"1,Jane,1.0,2", "OK", None),
        (b"1,jane.doe@example.com,1.0,2", "PERSONAL_DATA", "name"),
        (b"1,call +14155552671,1.0,2", "PERSONAL_DATA", "name"),
        (b"1,4111111111111111,1.0,2", "PERSONAL_DATA", "name"),
        (b"1,5500 0000 0000 0004,1.0,2", "PERSONAL_DATA", "name"),
        (b"1,4111111111111112,1.0,2", "OK", None),  # fails Luhn
        (b"1,ssn 078-05-1120,1.0,2", "PERSONAL_DATA", "name"),
        (b"1,2024-01-15,1.0,2", "OK", None),
        (b"4111111111111111,x,4111111111111111,4111111111111111", "OK", None),
        (b"+14155552671,x,1.0,2", "PERSONAL_DATA", "id"),
        (b"1,x,1e+10,+5", "OK", None),
        (b"1,x,4111 1111 1111 1111,2", "PERSONAL_DATA", "value1"),
        (b"1,x,1.0,078-05-1120", "PERSONAL_DATA", "category"),
        (b"1,x,1.0,jane@example.org", "PERSONAL_DATA", "category"),
        (b"1,x,abc,2", "BAD_VALUE", "value1"),
        (b"-9223372036854775808,x,1.0,9223372036854775807", "OK", None),
        (b"9223372036854775808,x,1.0,2", "BAD_VALUE", "id"),
        (b"0000000000000000000000000001,x,1.0,2", "OK", None),
        (b"\xd9\xa1,x,1.0,2", "BAD_VALUE", "id"),  # Arabic-Indic digit
        (b",x,,", "OK", None),
        (b"1,x,1.0,2,jane.doe@example.com", "PERSONAL_DATA", None),
    ],
)
def test_values_and_personal_data(row: bytes, code: str, column: str | None) -> None:
    data = b"id,name,value1,category\n" + row + b"\n"
    verdict = decide(data, contract=STRING_CONTRACT)
    assert verdict.code == code, verdict.message
    if code != "OK":
        assert verdict.line == 2
        if column:
            assert repr(column) in verdict.message
        for fragment in ("jane", "4111", "1120", "4155552671", "5500", "abc", "example"):
            assert fragment not in verdict.message


def test_pandas_missing_value_spellings_are_accepted_in_every_numeric_column() -> None:
    # GIVEN a part as R writes it (NA), and other spellings pandas reads as missing
    data = HEADER + b"NA,NA,null,N/A,7\n2,NULL,#N/A,-1.#IND,NA\n3,1.5,2.5,3.5,8\n"
    # WHEN the Lambda decides on it THEN it is accepted, not quarantined
    verdict = decide(data)
    assert verdict.ok, verdict.message


def test_a_contract_s_missing_value_spellings_decide_what_passes() -> None:
    narrow = dataclasses.replace(DEFAULT_CONTRACT, na_values=("",))
    verdict = decide(HEADER + b"1,NA,2,3,7\n", contract=narrow)
    assert (verdict.code, verdict.line) == ("BAD_VALUE", 2) and "'value1'" in verdict.message
    assert decide(HEADER + b"1,,2,3,7\n", contract=narrow).ok
    assert decide(HEADER + b"1,,2,3,7\n", contract=dataclasses.replace(narrow, na_values=("NA",))).code == (
        "BAD_VALUE"
    )
    extended = dataclasses.replace(DEFAULT_CONTRACT, na_values=(*DEFAULT_CONTRACT.na_values, "missing"))
    assert decide(HEADER + b"1,missing,2,3,7\n", contract=extended).ok
    assert decide(HEADER + b"1,missing,2,3,7\n").code == "BAD_VALUE"


def test_personal_data_allowed_columns() -> None:
    allowed = Contract(
        columns=STRING_CONTRACT.columns,
        group_by=STRING_CONTRACT.group_by,
        values=STRING_CONTRACT.values,
        extra={"personal_data_allowed": ["name"]},
    )
    data = b"id,name,value1,category\n1,jane.doe@example.com,1.0,2\n"
    assert decide(data, contract=allowed).ok
    # Only the listed column is exempt.
    data = b"id,name,value1,category\n1,x,1.0,078-05-1120\n"
    assert decide(data, contract=allowed).code == "PERSONAL_DATA"
    odd = Contract(
        columns=STRING_CONTRACT.columns,
        group_by=STRING_CONTRACT.group_by,
        values=STRING_CONTRACT.values,
        extra={"personal_data_allowed": "name"},
    )
    assert decide(b"id,name,value1,category\n1,a@b.io,1,2\n", contract=odd).code == "PERSONAL_DATA"


def test_header_rules_and_messages() -> None:
    secret = b"alice@example.com"
    verdict = decide(b"id,value1,value2,value3,category," + secret + b"\n")
    assert verdict.code == "UNEXPECTED_COLUMN" and "column 6" in verdict.message
    assert "alice" not in verdict.message
    verdict = decide(b" id,value1,value2,value3,category\n")
    assert verdict.code == "MISSING_COLUMN" and "'id'" in verdict.message
    verdict = decide(b"id,value1,value2,value3,category,value1\n")
    assert verdict.code == "DUPLICATE_COLUMN" and "'value1'" in verdict.message
    assert decide(b"\xef\xbb\xbf\r\n").code == "NO_HEADER"
    assert decide(b"\xef\xbb\xbf").code == "NO_HEADER"
    sampled = HEADER + b"1,1,2,3,4\n" * 5 + b"oops\n"
    assert decide(sampled).code == "RAGGED_ROW"
    assert decide(sampled, limits=Limits(sample_rows=5)).ok


def test_adversarial_cells_stay_fast() -> None:
    import time

    cells = [
        b"a" * 60 + b"@" + b"b." * 100,
        b"1" * 120_000 + b"x",
        b"+1" + b" 2" * 50_000,
        b"4 " * 60_000,
    ]
    contract = STRING_CONTRACT
    for cell in cells:
        data = b"id,name,value1,category\n" + (b'1,"' + cell + b'",' + cell[:100_000] + b",2\n") * 4
        start = time.perf_counter()
        decide(data, contract=contract)
        assert time.perf_counter() - start < 2.0


# ---- never raises -----------------------------------------------------------------------------

_PREFIXES = [b"", b"PAR1", b"\x1f\x8b\x08\x00", HEADER, b"\xef\xbb\xbf" + HEADER, b"PK\x03\x04"]
SMALL = Limits(head_bytes=1024, tail_bytes=64, sample_rows=20)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from(_PREFIXES),
    body=st.binary(max_size=3000),
    extra=st.integers(min_value=0, max_value=1 << 31),
    small=st.booleans(),
)
def test_arbitrary_bytes_never_raise(prefix: bytes, body: bytes, extra: int, small: bool) -> None:
    data = prefix + body
    limits = SMALL if small else Limits()
    for size in {len(data), len(data) + extra}:
        padded = data + bytes(min(extra, 4096)) if size > len(data) else data
        ranges = plan_reads(size, limits)
        head = padded[: ranges[0][1] + 1] if ranges else b""
        tail = body[-limits.tail_bytes :] if len(ranges) > 1 else None
        if tail is not None and len(tail) < limits.tail_bytes:
            tail = bytes(limits.tail_bytes - len(tail)) + tail
        verdict = validate_part(size, head, tail, DEFAULT_CONTRACT, limits)
        assert verdict.code == "OK" or verdict.code in CODES


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_parquet_footers_never_raise(data: st.DataObject) -> None:
    footer = bytearray(make_corpus.file_metadata(make_corpus.DEFAULT_PARQUET_COLUMNS, num_rows=3))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(footer) - 1))
        footer[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(footer)))
    verdict = decide(make_corpus.parquet_file(bytes(footer[:cut] + footer[cut:])))
    assert verdict.code == "OK" or verdict.code in CODES


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=400), contract_string=st.booleans())
def test_arbitrary_text_never_raises(text: str, contract_string: bool) -> None:
    contract = STRING_CONTRACT if contract_string else DEFAULT_CONTRACT
    header = b"id,name,value1,category\n" if contract_string else HEADER
    for encoded in (header + text.encode(), gzip.compress(header + text.encode(), mtime=0)):
        decide(encoded, contract=contract)
        decide(encoded, size=1 << 30, contract=contract, limits=SMALL)


# ---- imports ----------------------------------------------------------------------------------


def test_imports_without_heavy_modules_in_a_fresh_interpreter() -> None:
    code = (
        "import sys, json, s3rollup.validate\n"
        "heavy = {'pandas', 'numpy', 'pyarrow', 'dask'}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_reason_codes_are_documented_and_cover_what_tests_saw() -> None:
    codes = [code for code, _ in REASON_CODES]
    assert len(codes) == len(set(codes)) >= 20
    assert all(desc and "\n" not in desc for _, desc in REASON_CODES)
    assert RETRYABLE_CODES <= CODES
    assert _SEEN_CODES - {"OK"} <= CODES
