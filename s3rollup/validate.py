"""Cheap validation of an incoming part from its size, its head and (for Parquet) its tail.

The Lambda decides on every part with at most ``Limits.head_bytes`` read in total: the head
window, plus the Parquet footer window at the end of the object when the object is larger
than ``head_bytes`` (the head window then shrinks by the tail window so the sum stays within
budget). The worker still parses the whole part; this module only rejects parts that would
certainly fail, or that must not enter the pipeline (personal data, decompression bombs).

Rules that keep it safe to run on untrusted bytes:

* standard library only, nothing heavy imported, also not indirectly;
* every input becomes a ``Verdict``; only caller mistakes (negative size, bad limits) raise;
* a message never carries a cell or header value from the file, only contract column names,
  positions and line numbers, so verdicts can be logged and stored freely.

Parquet parts are checked for their schema (names, physical types) from the footer only;
their values (and any personal data in them) are left to the worker.
"""

from __future__ import annotations

import codecs
import csv
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from s3rollup.contract import Contract

REASON_CODES: tuple[tuple[str, str], ...] = (
    ("EMPTY_OBJECT", "the object has zero bytes"),
    ("TOO_LARGE", "the object is larger than Limits.max_part_bytes"),
    ("SHORT_READ", "fewer bytes were passed than plan_reads asked for; retry, do not quarantine"),
    ("UNSUPPORTED_FORMAT", "content is a known non-CSV format (zip/xlsx, PDF, bzip2, zstd, ...)"),
    ("GZIP_BOMB", "gzip inflates above Limits.max_gzip_ratio within the inspected window"),
    ("BAD_GZIP", "gzip stream is corrupt, truncated or followed by garbage"),
    ("BAD_ENCODING", "text is not UTF-8 (invalid bytes, or a UTF-16/UTF-32 byte order mark)"),
    ("NUL_BYTES", "text contains NUL bytes (UTF-16 without BOM, or binary)"),
    ("HEADER_TOO_LONG", "the header line does not end within the head window"),
    ("NO_HEADER", "the first line is empty or has only empty names"),
    ("WRONG_DELIMITER", "the header is one field that splits on ';', tab or '|'"),
    ("DUPLICATE_COLUMN", "a column name appears more than once"),
    ("MISSING_COLUMN", "a contract column is not in the header"),
    ("UNEXPECTED_COLUMN", "a header column is not in the contract (or has no name)"),
    ("BAD_CSV", "malformed CSV quoting"),
    ("FIELD_TOO_LONG", "a CSV field is longer than the csv module's field size limit"),
    ("RAGGED_ROW", "a sampled row has a different number of fields than the header"),
    ("BAD_VALUE", "a sampled value does not parse as its contract type"),
    ("PERSONAL_DATA", "a sampled value looks like an e-mail, phone, card number or national id"),
    ("PARQUET_TRUNCATED", "starts with PAR1 but does not end with PAR1, or is too short"),
    ("PARQUET_BAD_FOOTER", "the Parquet footer length is zero or larger than the file"),
    ("PARQUET_FOOTER_TOO_LARGE", "the Parquet footer does not fit in the tail window"),
    ("PARQUET_BAD_METADATA", "the Parquet FileMetaData cannot be decoded"),
    ("BAD_COLUMN_TYPE", "a Parquet column's physical type cannot hold its contract type"),
)

# A verdict with one of these codes says nothing about the part: the caller should retry
# (or fail the message) rather than quarantine.
RETRYABLE_CODES: frozenset[str] = frozenset({"SHORT_READ"})

_CODES = frozenset(code for code, _ in REASON_CODES)


@dataclass(frozen=True)
class Limits:
    """How much the validator reads and inspects."""

    head_bytes: int = 1 << 20  # total read budget: head window plus tail window
    tail_bytes: int = 64 << 10  # Parquet footer window
    max_part_bytes: int = 5 << 30  # larger parts are rejected (TOO_LARGE)
    max_gzip_ratio: int = 200  # inflated/compressed ratio above this → GZIP_BOMB
    sample_rows: int = 200  # rows sampled from the head for value checks

    def __post_init__(self) -> None:
        if self.head_bytes < 1024:
            raise ValueError("head_bytes must be at least 1024")
        if not 64 <= self.tail_bytes <= self.head_bytes // 2:
            raise ValueError("tail_bytes must be between 64 and head_bytes // 2")
        if self.max_part_bytes < 1 or self.max_gzip_ratio < 1 or self.sample_rows < 0:
            raise ValueError("max_part_bytes, max_gzip_ratio must be positive; sample_rows >= 0")


@dataclass(frozen=True)
class Verdict:
    """The decision on a part: OK or a reason code with a value-free one-line message."""

    ok: bool
    code: str  # "OK" or a reason code
    message: str  # one line; never a cell or header value from the file
    line: int | None = None
    fmt: str | None = None  # "csv" | "csv.gz" | "parquet"


def _reject(code: str, message: str, line: int | None = None, fmt: str | None = None) -> Verdict:
    assert code in _CODES, code
    return Verdict(ok=False, code=code, message=message, line=line, fmt=fmt)


def _accept(fmt: str, message: str) -> Verdict:
    return Verdict(ok=True, code="OK", message=message, fmt=fmt)


# ---- read planning --------------------------------------------------------------------------


def _head_window(size: int, limits: Limits) -> int:
    """Bytes of the head to read: all of a small object, else what the tail leaves."""
    if size <= limits.head_bytes:
        return size
    return limits.head_bytes - limits.tail_bytes


def plan_reads(size: int, limits: Limits = Limits()) -> list[tuple[int, int]]:
    """The byte ranges (start, end inclusive) to read: the head, plus the tail for Parquet."""
    if size < 0:
        raise ValueError("size must not be negative")
    if size == 0 or size > limits.max_part_bytes:
        return []  # decided from the size alone
    if size <= limits.head_bytes:
        return [(0, size - 1)]  # the whole object; its tail is in it
    return [(0, _head_window(size, limits) - 1), (size - limits.tail_bytes, size - 1)]


def needs_tail(size: int, head: bytes, limits: Limits = Limits()) -> bool:
    """Whether validate_part will look at the tail range (only for Parquet larger than the head)."""
    return size > limits.head_bytes and bytes(head[:4]) == _PAR1


# ---- format sniffing ------------------------------------------------------------------------

_GZIP = b"\x1f\x8b"
_PAR1 = b"PAR1"
_UTF8_BOM = b"\xef\xbb\xbf"

# Magic numbers of formats producers send by mistake; checked on raw and inflated bytes.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "a zip container (zip, xlsx, docx, ods)"),
    (b"PK\x05\x06", "an empty zip container"),
    (b"%PDF-", "a PDF document"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an OLE2 document (xls, doc)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data"),
    (b"\xfd7zXZ\x00", "xz-compressed data"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"\x04\x22\x4d\x18", "lz4-compressed data"),
    (b"\x7fELF", "an ELF executable"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"ARROW1\x00\x00", "an Arrow IPC file"),
    (b"Obj\x01", "an Avro container"),
    (b"PARE", "an encrypted Parquet file"),
)
_BZIP2_RE = re.compile(rb"BZh[1-9](?:1AY&SY|\x17rE8P\x90)")


def _sniff_unsupported(data: bytes) -> str | None:
    for magic, what in _MAGIC:
        if data.startswith(magic):
            return what
    if _BZIP2_RE.match(data):
        return "bzip2-compressed data"
    return None


# ---- gzip -----------------------------------------------------------------------------------

# Ratios over a few KiB say little (tiny files compress oddly), so the bomb check waits for
# this much output; the head window caps output anyway, so a small window is never a bomb.
BOMB_MIN_OUTPUT = 64 << 10
_GZIP_CHUNK = 8 << 10
_MAX_GZIP_MEMBERS = 4096


def _gunzip_window(raw: bytes, raw_complete: bool, limits: Limits) -> tuple[bytes, bool] | Verdict:
    """Inflate at most head_bytes of the gzip members in raw: (bytes, complete) or a reject."""
    cap = limits.head_bytes
    out = bytearray()
    view = memoryview(raw)
    pos = 0  # input bytes consumed so far
    min_output = min(BOMB_MIN_OUTPUT, cap)
    for _ in range(_MAX_GZIP_MEMBERS):
        inflater = zlib.decompressobj(wbits=31)
        while not inflater.eof:
            if len(out) >= cap:
                return bytes(out), False  # window full: the rest is the worker's
            if pos >= len(raw):
                if raw_complete:
                    return _reject("BAD_GZIP", "gzip stream is truncated", fmt="csv.gz")
                return bytes(out), False  # the object goes on past the window
            # Small input slices keep zlib's copies of unused input small, so many tiny
            # members cannot make this quadratic.
            chunk = view[pos : pos + _GZIP_CHUNK]
            try:
                # max_length bounds the output: a bomb costs at most cap bytes of memory.
                out += inflater.decompress(chunk, cap - len(out))
            except zlib.error:
                return _reject("BAD_GZIP", "gzip stream is corrupt", fmt="csv.gz")
            pos += len(chunk) - len(inflater.unconsumed_tail) - len(inflater.unused_data)
            if len(out) >= min_output and len(out) > limits.max_gzip_ratio * max(pos, 1):
                return _reject(
                    "GZIP_BOMB",
                    f"gzip inflates {len(out) // max(pos, 1)}:1 in the first {pos} bytes "
                    f"(limit {limits.max_gzip_ratio}:1)",
                    fmt="csv.gz",
                )
        nxt = raw[pos : pos + 2]
        if nxt == _GZIP:
            continue  # concatenated members are one valid gzip file
        if not nxt:
            return bytes(out), raw_complete
        if not raw_complete and len(nxt) < 2 and _GZIP.startswith(nxt):
            return bytes(out), False  # the next member's magic is cut by the window
        if not raw[pos:].strip(b"\x00"):
            # Trailing NUL padding is tolerated, as the gzip module does.
            return bytes(out), raw_complete
        return _reject("BAD_GZIP", "gzip stream is followed by non-gzip bytes", fmt="csv.gz")
    return bytes(out), False  # enough members inspected; the worker reads the rest


# ---- Parquet footer: a minimal Thrift compact-protocol reader ----------------------------------


class _ThriftError(Exception):
    """The footer is not well-formed compact-protocol Thrift (message is value-free)."""


_MAX_DEPTH = 32  # nesting far beyond FileMetaData's; stops recursion bombs

# Compact-protocol type ids.
_T_STOP, _T_TRUE, _T_FALSE, _T_BYTE, _T_I16, _T_I32, _T_I64 = 0, 1, 2, 3, 4, 5, 6
_T_DOUBLE, _T_BINARY, _T_LIST, _T_SET, _T_MAP, _T_STRUCT = 7, 8, 9, 10, 11, 12


class _Compact:
    """A bounds-checked cursor over compact-protocol bytes."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise _ThriftError("footer ends inside a value")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def take(self, n: int) -> bytes:
        if n < 0 or n > self.remaining():
            raise _ThriftError("length runs past the footer")
        chunk = self.buf[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def varint(self) -> int:
        result = shift = 0
        for _ in range(10):
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
        raise _ThriftError("varint longer than 10 bytes")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def field(self, last_id: int) -> tuple[int, int]:
        """(field id, type) of the next field; type 0 is the struct's end."""
        b = self.byte()
        ftype = b & 0x0F
        if ftype == _T_STOP:
            return 0, _T_STOP
        delta = b >> 4
        return (last_id + delta if delta else self.zigzag()), ftype

    def collection(self) -> tuple[int, int]:
        """(size, element type) of a list or set."""
        b = self.byte()
        size, etype = b >> 4, b & 0x0F
        if size == 15:
            size = self.varint()
        # Every element takes at least one byte: this bounds the loop by the footer size.
        if size > self.remaining():
            raise _ThriftError("collection larger than the footer")
        return size, etype

    def skip(self, ftype: int, depth: int, in_collection: bool = False) -> None:
        """Skip one value of the given type."""
        if depth > _MAX_DEPTH:
            raise _ThriftError("nesting too deep")
        if ftype in (_T_TRUE, _T_FALSE):
            if in_collection:
                self.take(1)  # booleans in collections take a byte; in fields, the type is the value
        elif ftype == _T_BYTE:
            self.take(1)
        elif ftype in (_T_I16, _T_I32, _T_I64):
            self.varint()
        elif ftype == _T_DOUBLE:
            self.take(8)
        elif ftype == _T_BINARY:
            self.take(self.varint())
        elif ftype in (_T_LIST, _T_SET):
            size, etype = self.collection()
            for _ in range(size):
                self.skip(etype, depth + 1, in_collection=True)
        elif ftype == _T_MAP:
            size = self.varint()
            if size > self.remaining():
                raise _ThriftError("map larger than the footer")
            if size:
                kv = self.byte()
                for _ in range(size):
                    self.skip(kv >> 4, depth + 1, in_collection=True)
                    self.skip(kv & 0x0F, depth + 1, in_collection=True)
        elif ftype == _T_STRUCT:
            last = 0
            while True:
                fid, t = self.field(last)
                if t == _T_STOP:
                    return
                last = fid
                self.skip(t, depth + 1)
        else:
            raise _ThriftError("unknown compact type")


@dataclass(frozen=True)
class _SchemaElement:
    name: str
    ptype: int | None  # parquet physical Type enum; None for groups
    repetition: int | None  # 0 REQUIRED, 1 OPTIONAL, 2 REPEATED
    num_children: int | None  # set only on groups


def _read_schema_element(r: _Compact) -> _SchemaElement:
    name: str | None = None
    ptype = repetition = num_children = None
    last = 0
    while True:
        fid, t = r.field(last)
        if t == _T_STOP:
            break
        last = fid
        if fid == 1 and t == _T_I32:
            ptype = r.zigzag()
        elif fid == 3 and t == _T_I32:
            repetition = r.zigzag()
        elif fid == 4 and t == _T_BINARY:
            name = r.take(r.varint()).decode("utf-8", "replace")
        elif fid == 5 and t == _T_I32:
            num_children = r.zigzag()
        else:
            r.skip(t, 2)
    if name is None:
        raise _ThriftError("schema element without a name")
    if num_children is not None and num_children < 0:
        raise _ThriftError("negative num_children")
    return _SchemaElement(name, ptype, repetition, num_children)


def _read_file_metadata(footer: bytes) -> list[_SchemaElement]:
    """FileMetaData.schema (field 2), checking the other required fields are present."""
    r = _Compact(footer)
    schema: list[_SchemaElement] | None = None
    seen: set[int] = set()
    last = 0
    while True:
        fid, t = r.field(last)
        if t == _T_STOP:
            break
        last = fid
        seen.add(fid)
        if fid == 2:
            if t != _T_LIST:
                raise _ThriftError("schema is not a list")
            size, etype = r.collection()
            if etype != _T_STRUCT:
                raise _ThriftError("schema elements are not structs")
            schema = [_read_schema_element(r) for _ in range(size)]
        elif fid == 3:
            if t != _T_I64 or r.zigzag() < 0:
                raise _ThriftError("bad num_rows")
        else:
            r.skip(t, 1)
    # version, schema, num_rows and row_groups are required by parquet.thrift.
    if not {1, 2, 3, 4} <= seen or not schema:
        raise _ThriftError("a required FileMetaData field is missing")
    return schema


def _top_level_columns(schema: list[_SchemaElement]) -> list[_SchemaElement]:
    """The root's children, walking the depth-first flattened tree."""
    root = schema[0]
    columns: list[_SchemaElement] = []
    i = 1
    for _ in range(root.num_children or 0):
        if i >= len(schema):
            raise _ThriftError("schema tree is shorter than num_children says")
        columns.append(schema[i])
        pending = 1
        while pending:  # skip the whole subtree of this column
            if i >= len(schema):
                raise _ThriftError("schema tree is shorter than num_children says")
            pending += (schema[i].num_children or 0) - 1
            i += 1
    if i != len(schema):
        raise _ThriftError("schema has elements outside the tree")
    return columns


# Physical types (parquet.thrift Type) that the worker can read as each contract type.
_PARQUET_TYPES: dict[str, frozenset[int]] = {
    "int64": frozenset({1, 2}),  # INT32, INT64
    "float64": frozenset({1, 2, 4, 5}),  # INT32, INT64, FLOAT, DOUBLE
    "string": frozenset(range(8)),  # CSV string columns take anything too
}
_PARQUET_TYPE_NAMES = (
    "BOOLEAN",
    "INT32",
    "INT64",
    "INT96",
    "FLOAT",
    "DOUBLE",
    "BYTE_ARRAY",
    "FIXED_LEN_BYTE_ARRAY",
)
# pandas writes a non-default index as such columns; readers turn them back into the index.
_INDEX_COLUMN_RE = re.compile(r"__index_level_\d+__")


def _check_parquet(
    size: int, tail_data: bytes, contract: Contract, limits: Limits, tail_window: bool
) -> Verdict:
    fmt = "parquet"
    if size < 12:
        return _reject("PARQUET_TRUNCATED", "too short to be a Parquet file", fmt=fmt)
    end = tail_data[-4:]
    if end == b"PARE":
        return _reject("UNSUPPORTED_FORMAT", "Parquet with an encrypted footer", fmt=fmt)
    if end != _PAR1:
        return _reject("PARQUET_TRUNCATED", "Parquet file does not end with PAR1", fmt=fmt)
    footer_len = int.from_bytes(tail_data[-8:-4], "little")
    if footer_len == 0 or footer_len > size - 12:
        return _reject(
            "PARQUET_BAD_FOOTER",
            f"footer length {footer_len} does not fit a {size}-byte file",
            fmt=fmt,
        )
    if footer_len + 8 > len(tail_data):
        # Reading more would break the read budget; such footers come from very many
        # row groups or columns, which the producer should avoid for small parts anyway.
        window = limits.tail_bytes if tail_window else len(tail_data)
        return _reject(
            "PARQUET_FOOTER_TOO_LARGE",
            f"footer of {footer_len} bytes exceeds the {window}-byte tail window",
            fmt=fmt,
        )
    footer = tail_data[-8 - footer_len : -8]
    try:
        columns = _top_level_columns(_read_file_metadata(footer))
    except _ThriftError as exc:
        return _reject("PARQUET_BAD_METADATA", f"footer metadata: {exc}", fmt=fmt)
    columns = [c for c in columns if not _INDEX_COLUMN_RE.fullmatch(c.name)]
    verdict = _check_columns([c.name for c in columns], contract, fmt, line=None)
    if verdict is not None:
        return verdict
    for col in columns:
        ctype = contract.columns[col.name]
        if col.num_children is not None or col.ptype is None:
            what = "a nested group"
        elif col.repetition == 2:
            what = "a repeated field"
        elif col.ptype not in _PARQUET_TYPES.get(ctype, frozenset()):
            if 0 <= col.ptype < len(_PARQUET_TYPE_NAMES):
                what = _PARQUET_TYPE_NAMES[col.ptype]
            else:
                what = f"unknown type {col.ptype}"
        else:
            continue
        return _reject("BAD_COLUMN_TYPE", f"column {col.name!r} is {what}, contract says {ctype}", fmt=fmt)
    return _accept(fmt, f"Parquet schema matches the contract ({len(columns)} columns)")


# ---- header ---------------------------------------------------------------------------------


def _loose(name: str) -> str:
    return name.strip().strip('"\ufeff').strip().lower()


def _check_columns(
    names: Sequence[str], contract: Contract, fmt: str, line: int | None = 1
) -> Verdict | None:
    """Compare a header with the contract; names that are not in it are never echoed."""
    expected = contract.columns

    def label(i: int) -> str:
        name = names[i]
        return f"column {i + 1} ({name!r})" if name in expected else f"column {i + 1}"

    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            return _reject("DUPLICATE_COLUMN", f"{label(i)} repeats column {first[name] + 1}", line, fmt)
        first[name] = i
    for col in expected:
        if col not in first:
            near = [i + 1 for i, n in enumerate(names) if n not in expected and _loose(n) == col.lower()]
            hint = f" (column {near[0]} differs from it only in case or spacing)" if near else ""
            return _reject("MISSING_COLUMN", f"contract column {col!r} is missing{hint}", line, fmt)
    for i, name in enumerate(names):
        if name not in expected:
            why = "has no name" if not name.strip() else "is not in the contract"
            return _reject("UNEXPECTED_COLUMN", f"column {i + 1} {why}", line, fmt)
    return None


# ---- values ---------------------------------------------------------------------------------

_INT_RE = re.compile(r"[+-]?[0-9]+")
# What float() accepts, minus underscores and non-ASCII digits, which pandas does not take.
_FLOAT_RE = re.compile(
    r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|nan|inf|infinity)",
    re.IGNORECASE,
)
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

# Quantifiers are bounded so a hostile cell costs linear time.
_EMAIL_RE = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}"
    r"@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,24}"
)
# E.164-ish: +CC (1-3 digits) then 8-14 digits, separators allowed.
_PHONE_RE = re.compile(r"(?<![\w+])\+[1-9][0-9]{0,2}(?:[ .()/-]{0,2}[0-9]){8,14}(?![0-9])")
_SSN_RE = re.compile(r"(?<![0-9])(?!000|666|9)[0-9]{3}-(?!00)[0-9]{2}-(?!0000)[0-9]{4}(?![0-9])")
# Card numbers start with 2-6 (the payment-card industry identifiers); 13-19 digits.
_CARD_RE = re.compile(r"(?<![0-9])[2-6](?:[ -]?[0-9]){12,18}(?![0-9])")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _personal_kind(cell: str) -> str | None:
    """What kind of personal data a cell looks like, if any."""
    if "@" in cell and _EMAIL_RE.search(cell):
        return "an e-mail address"
    if "+" in cell and _PHONE_RE.search(cell):
        return "a phone number"
    if "-" in cell and _SSN_RE.search(cell):
        return "a national id number"
    for m in _CARD_RE.finditer(cell):
        if _luhn(m.group().replace(" ", "").replace("-", "")):
            return "a card number"
    return None


def _parses(cell: str, ctype: str, na: frozenset[str]) -> bool:
    if cell in na:
        return True  # missing, as pandas reads it (matched exactly, as the worker does)
    value = cell.strip(" \t")
    if ctype == "int64":
        if not value:
            return True  # missing keys and ids are the worker's business
        if not _INT_RE.fullmatch(value):
            return False
        # int() refuses strings over 4300 digits, leading zeros included: strip them first.
        digits = value.lstrip("+-").lstrip("0") or "0"
        if len(digits) > 19:
            return False
        number = -int(digits) if value.startswith("-") else int(digits)
        return _INT64_MIN <= number <= _INT64_MAX
    if ctype == "float64":
        if not value:
            return "" in na  # a contract may say an empty cell is not a missing value
        return _FLOAT_RE.fullmatch(value) is not None
    return True


def _cell_problem(cell: str, ctype: str, personal_ok: bool, na: frozenset[str]) -> tuple[str, str] | None:
    """(code, what) for a cell that must not pass, else None; ``na``: the contract's
    missing-value spellings."""
    if ctype not in ("int64", "float64"):
        kind = None if personal_ok else _personal_kind(cell)
        return ("PERSONAL_DATA", kind) if kind else None
    if _parses(cell, ctype, na):
        value = cell.strip(" \t")
        # A number with an explicit '+' and phone length is almost surely a phone number.
        if not personal_ok and value.startswith("+") and _PHONE_RE.fullmatch(value):
            return "PERSONAL_DATA", "a phone number"
        return None
    # Only cells that are not plain numbers are scanned, so long numeric ids that happen
    # to pass Luhn are never taken for card numbers.
    kind = None if personal_ok else _personal_kind(cell)
    if kind:
        return "PERSONAL_DATA", kind
    return "BAD_VALUE", f"not a valid {ctype}"


# ---- CSV text -------------------------------------------------------------------------------

_OTHER_BOMS: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)
_OTHER_DELIMITERS = (";", "\t", "|")


class _Lines:
    """Line iterator for csv.reader that remembers whether it ran out."""

    def __init__(self, text: str) -> None:
        self._lines = _split_lines(text)
        self.exhausted = False

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return next(self._lines)
        except StopIteration:
            self.exhausted = True
            raise


_LINE_RE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")


def _split_lines(text: str) -> Iterator[str]:
    # Only CR, LF and CRLF end lines, as in the csv module; str.splitlines also splits on
    # form feeds and Unicode separators, which would shift line numbers.
    return (m.group() for m in _LINE_RE.finditer(text))


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _check_text(data: bytes, complete: bool, contract: Contract, limits: Limits, fmt: str) -> Verdict:
    """Validate CSV bytes: the whole part if complete, else a prefix of it."""
    for bom, name in _OTHER_BOMS:
        if data.startswith(bom):
            return _reject("BAD_ENCODING", f"text is {name} (byte order mark); use UTF-8", line=1, fmt=fmt)
    nul = data.find(b"\x00")
    if nul >= 0:
        return _reject(
            "NUL_BYTES",
            "text contains NUL bytes (UTF-16 or binary?)",
            line=_line_of(data, nul),
            fmt=fmt,
        )
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        # final=False keeps a multi-byte character cut by the window end from counting as bad.
        text = decoder.decode(data, final=complete)
    except UnicodeDecodeError as exc:
        return _reject("BAD_ENCODING", "text is not valid UTF-8", line=_line_of(data, exc.start), fmt=fmt)
    if not complete:
        cut = max(text.rfind("\n"), text.rfind("\r"))
        if cut < 0:
            return _reject("HEADER_TOO_LONG", f"no line end in the first {len(data)} bytes", line=1, fmt=fmt)
        text = text[: cut + 1]  # only complete lines are sampled
    return _check_csv(text, complete, contract, limits, fmt)


def _check_csv(text: str, complete: bool, contract: Contract, limits: Limits, fmt: str) -> Verdict:
    lines = _Lines(text)
    reader = csv.reader(lines, strict=True)
    header: list[str] | None = None
    types: list[str] = []
    allowed = _personal_allowed(contract)
    na = frozenset(contract.na_values)
    first_problem: Verdict | None = None
    line = 0
    rows = 0
    ended = False
    while rows < limits.sample_rows or header is None:
        start = line + 1
        try:
            record = next(reader)
        except StopIteration:
            ended = True
            break
        except csv.Error as exc:
            if lines.exhausted and not complete:
                if header is None:  # a quoted header field runs past the window
                    return _reject("HEADER_TOO_LONG", "header does not end within the window", 1, fmt)
                break  # a quoted field runs past the window: not the part's fault
            if "field larger" in str(exc):
                return _reject("FIELD_TOO_LONG", "a field exceeds the csv field size limit", start, fmt)
            return _reject("BAD_CSV", "malformed quoting", line=reader.line_num, fmt=fmt)
        line = reader.line_num
        if header is None:
            verdict = _check_header(record, contract, fmt)
            if verdict is not None:
                return verdict
            header = record
            types = [contract.columns[name] for name in record]
            continue
        if not record:
            continue  # blank lines are skipped by readers
        rows += 1
        if len(record) != len(header) and first_problem is None:
            first_problem = _reject(
                "RAGGED_ROW", f"row has {len(record)} fields, header has {len(header)}", start, fmt
            )
        for i, cell in enumerate(record):
            name = header[i] if i < len(header) else None
            ctype = types[i] if i < len(types) else "string"
            problem = _cell_problem(cell, ctype, name in allowed, na)
            if problem is None:
                continue
            code, what = problem
            where = f"column {name!r}" if name is not None else f"field {i + 1}"
            if code == "PERSONAL_DATA":
                # Personal data decides how the quarantined copy is handled: it wins.
                return _reject(code, f"{where} holds what looks like {what}", start, fmt)
            if first_problem is None:
                first_problem = _reject(code, f"{where}: {what}", start, fmt)
    if header is None:
        return _reject("NO_HEADER", "the part has no header line", line=1, fmt=fmt)
    if first_problem is not None:
        return first_problem
    scope = "all" if complete and ended else "the first"
    return _accept(fmt, f"header matches the contract; {scope} {rows} rows checked look valid")


def _check_header(record: list[str], contract: Contract, fmt: str) -> Verdict | None:
    if not record:
        return _reject("NO_HEADER", "the first line is empty", line=1, fmt=fmt)
    if all(not name.strip() for name in record):
        return _reject("NO_HEADER", "the header has only empty names", line=1, fmt=fmt)
    if len(record) == 1 and len(contract.columns) > 1:
        for delim in _OTHER_DELIMITERS:
            if len(record[0].split(delim)) > 1:
                return _reject(
                    "WRONG_DELIMITER",
                    f"header is one field separated by {delim!r}; parts must use ','",
                    line=1,
                    fmt=fmt,
                )
    return _check_columns(record, contract, fmt)


def _personal_allowed(contract: Contract) -> frozenset[str]:
    allowed: Any = contract.extra.get("personal_data_allowed") if contract.extra else None
    if isinstance(allowed, (list, tuple)):
        return frozenset(name for name in allowed if isinstance(name, str))
    return frozenset()


# ---- entry point ----------------------------------------------------------------------------


def validate_part(
    size: int,
    head: bytes,
    tail: bytes | None,
    contract: Contract,
    limits: Limits = Limits(),
) -> Verdict:
    """Decide on a part from its size and the bytes plan_reads asked for."""
    if size < 0:
        raise ValueError("size must not be negative")
    if size == 0:
        return _reject("EMPTY_OBJECT", "the part is empty")
    if size > limits.max_part_bytes:
        return _reject("TOO_LARGE", f"the part has {size} bytes, limit {limits.max_part_bytes}")
    want = _head_window(size, limits)
    head = bytes(head[:want])
    if len(head) < want:
        return _reject("SHORT_READ", f"got {len(head)} of the {want} head bytes asked for")
    whole = want == size
    if head.startswith(_PAR1):
        if whole:
            return _check_parquet(size, head, contract, limits, tail_window=False)
        if tail is None or len(tail) < limits.tail_bytes:
            got = 0 if tail is None else len(tail)
            return _reject(
                "SHORT_READ",
                f"got {got} of the {limits.tail_bytes} tail bytes asked for",
                fmt="parquet",
            )
        return _check_parquet(size, bytes(tail[-limits.tail_bytes :]), contract, limits, True)
    if head.startswith(_GZIP):
        inflated = _gunzip_window(head, whole, limits)
        if isinstance(inflated, Verdict):
            return inflated
        data, complete = inflated
        if data.startswith(_GZIP):
            return _reject("UNSUPPORTED_FORMAT", "gzip inside gzip", fmt="csv.gz")
        if data.startswith(_PAR1):
            return _reject("UNSUPPORTED_FORMAT", "gzip-compressed Parquet", fmt="csv.gz")
        what = _sniff_unsupported(data)
        if what:
            return _reject("UNSUPPORTED_FORMAT", f"gzip-compressed {what}", fmt="csv.gz")
        return _check_text(data, complete, contract, limits, "csv.gz")
    what = _sniff_unsupported(head)
    if what:
        return _reject("UNSUPPORTED_FORMAT", f"content is {what}; parts must be CSV, CSV.gz or Parquet")
    return _check_text(head, whole, contract, limits, "csv")
