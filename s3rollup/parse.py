"""Part files (CSV, CSV.gz, Parquet) to tables that follow a dataset's contract.

The fast path is pyarrow's multi-threaded CSV reader (or the Parquet reader) with the
contract's types. Only when it rejects a part does a slow, pure-Python second pass walk
the records to say which line is at fault.

Error messages name columns and line numbers, never a cell's content: parts may hold
personal data and rejection reasons end up in logs and in the quarantine record. The
pyarrow exceptions that do quote cells are never chained to a PartError.
"""

from __future__ import annotations

import csv
import io
import itertools
import operator
import queue
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from s3rollup import native, validate
from s3rollup.contract import Contract

if TYPE_CHECKING:
    import pandas as pd

# pyarrow.compute and pyarrow.csv (about 40 ms of a process) and pandas are imported by the
# paths that use them: a Parquet part with an int64 key that needs no cast, and a CSV part
# the native parser reads, use none of them.

ARROW_TYPES = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string()}
_BOM = b"\xef\xbb\xbf"
# The header must end within this many bytes: a part without line breaks near its start
# is not a CSV file with a header.
_MAX_HEADER_BYTES = 1 << 20
_LINE_BREAK = re.compile(rb"\r\n|[\r\n]")
# What pyarrow's CSV converters accept, after they trim spaces and tabs. Used only on the
# error path, and only to propose a culprit that pyarrow itself then confirms.
_INT_BODY = r"[ \t]*-?[0-9]+[ \t]*"
_NUMBER = r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|(?i:inf|infinity))"
_FLOAT_BODY = rf"[ \t]*(?:{_NUMBER}|[+-]?(?i:nan))[ \t]*"
_INT_RE = re.compile(_INT_BODY)
_FLOAT_RE = re.compile(_FLOAT_BODY)
# Whole-record shapes for the second pass (cells joined by NUL, which no cell pattern
# accepts): one regex call per clean record. Integers of up to 18 digits cannot overflow;
# longer ones, and every mismatch, get the per-cell check.
_RECORD_CELL = {
    "int64": r"[ \t]*-?[0-9]{1,18}[ \t]*",
    "float64": _FLOAT_BODY,
    "string": r"[^\x00\udc80-\udcff]+",
}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# A missing-value spelling the native parser would take for a number (a contract's "-999",
# say): pyarrow reads it as missing, so parts of such a contract go to pyarrow.
_NATIVE_NUMBER = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


# ---- Arrow <-> NumPy ----------------------------------------------------------------------
# pyarrow's own conversions between NumPy and Arrow (pa.array, to_numpy) import pandas when
# it is installed: about a quarter of a second of a job's process, for nothing on an
# integer key. Numeric columns go through their buffers instead; other columns (strings)
# through pyarrow's, on paths that use pandas anyway.


def _numpy_dtype(t: pa.DataType) -> np.dtype[Any] | None:
    if pa.types.is_floating(t):
        return np.dtype(f"float{t.bit_width}")
    if pa.types.is_signed_integer(t):
        return np.dtype(f"int{t.bit_width}")
    if pa.types.is_unsigned_integer(t):
        return np.dtype(f"uint{t.bit_width}")
    return None


def numpy_column(column: pa.ChunkedArray | pa.Array, nulls: bool = True) -> npt.NDArray[Any]:
    """A column as one NumPy array, as pyarrow's to_numpy gives it: nulls as NaN (an integer
    column with nulls as float64); with ``nulls=False`` the cells' stored values whatever
    their validity (see valid_cells). Shares the column's memory where it can (one chunk,
    no nulls): nothing may write into it."""
    dtype = _numpy_dtype(column.type)
    if dtype is None:
        return column.to_numpy()
    parts: list[npt.NDArray[Any]] = []
    for c in _chunks(column):
        values = np.frombuffer(c.buffers()[1], dtype=dtype, count=c.offset + len(c))[c.offset :]
        if nulls and c.null_count:
            values = np.where(_valid_cells(c), values, np.nan)
        parts.append(values)
    if not parts:
        return np.empty(0, dtype=dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def valid_cells(column: pa.ChunkedArray) -> npt.NDArray[np.bool_]:
    """Which of a column's cells are not null, from its validity bitmaps."""
    parts = [_valid_cells(c) for c in _chunks(column)]
    return np.concatenate(parts) if parts else np.ones(0, dtype=bool)


def _chunks(column: pa.ChunkedArray | pa.Array) -> list[pa.Array]:
    return [c for c in (column.chunks if isinstance(column, pa.ChunkedArray) else [column]) if len(c)]


def _valid_cells(chunk: pa.Array) -> npt.NDArray[np.bool_]:
    if not chunk.null_count:
        return np.ones(len(chunk), dtype=bool)
    bits = np.frombuffer(chunk.buffers()[0], dtype=np.uint8)
    cells = np.unpackbits(bits, count=chunk.offset + len(chunk), bitorder="little")
    return cells[chunk.offset :].astype(bool)


_ARROW_OF_NUMPY = {np.dtype(np.int64): pa.int64(), np.dtype(np.float64): pa.float64()}


def arrow_column(
    values: npt.NDArray[Any], type: pa.DataType | None = None, nan_as_null: bool = False
) -> pa.Array:
    """An Arrow array of a NumPy array (int64 and float64 without a copy where contiguous),
    of ``type`` when given; NaN as null when ``nan_as_null``."""
    own = _ARROW_OF_NUMPY.get(values.dtype)
    if own is None or (type is not None and type != own):
        if not len(values):
            return pa.nulls(0, type or pa.string())
        return pa.array(values, type=type, from_pandas=nan_as_null)
    data = np.ascontiguousarray(values)
    buffers = [None, pa.py_buffer(data)]
    if nan_as_null and data.dtype.kind == "f":
        missing = np.isnan(data)
        if missing.any():
            buffers[0] = pa.py_buffer(np.packbits(~missing, bitorder="little"))
    return pa.Array.from_buffers(own, len(data), buffers)


class Readable(Protocol):
    """A binary stream: an S3 object's StreamingBody or an open file."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


class Digest(Protocol):
    """A running checksum (hashlib's objects)."""

    def update(self, data: memoryview, /) -> None: ...


class PartError(Exception):
    """A part that cannot be read under its contract; ``code`` says why, ``line`` where."""

    def __init__(self, code: str, message: str, line: int | None = None) -> None:
        super().__init__(message if line is None else f"{message} (line {line})")
        self.code = code
        self.message = message
        self.line = line


# read_body asks the stream for at most this much at a time, and keeps a buffer for the
# thread's next part only up to _KEEP_BYTES (a long-lived worker does not hold a huge one).
_READ_CHUNK = 8 << 20
_KEEP_BYTES = 512 << 20
_buffers = threading.local()


def read_body(stream: Readable, size: int | None = None, digest: Digest | None = None) -> memoryview:
    """A part's whole body, read straight into this thread's reusable buffer; ``digest``
    (a hashlib object) is updated with each chunk as it arrives, so on a network stream
    the checksum is computed while the rest of the body is still on its way.

    A part is tens of MB: reading each into fresh memory costs a page fault per 4 KiB, more
    than the native parser spends on the bytes; a zero-filled buffer (bytearray) costs them
    twice. The buffer is uninitialised memory, reused by the thread's next call, so nothing
    derived from the view may outlive the caller's use of it (partials are new arrays).
    ``size`` (the object's Content-Length, when known) sizes the buffer. A buffer above
    512 MiB is not kept: the next part gets a fresh one.
    """
    # +1: the end of the stream is seen without growing.
    buf = _thread_buffer("body", 0 if size is None else size + 1)
    view = memoryview(buf)
    pos = 0
    while True:
        if pos == len(buf):
            # A fresh, larger buffer (never resized: a view of the old one may still exist).
            buf = _grown(buf, pos, max(2 * len(buf), _READ_CHUNK))
            view = memoryview(buf)
        n = stream.readinto(view[pos : pos + _READ_CHUNK])
        if not n:
            break
        if digest is not None:
            digest.update(view[pos : pos + n])
        pos += n
    _keep_buffer("body", buf)
    return view[:pos]


def _thread_buffer(slot: str, size: int) -> npt.NDArray[np.uint8]:
    """This thread's reusable buffer ``slot`` (uninitialised memory) if it holds ``size``
    bytes, else a fresh one an eighth larger, so that the thread's next, slightly larger
    part fits too. Never resized: a view of the old one may still exist."""
    kept: npt.NDArray[np.uint8] | None = getattr(_buffers, slot, None)
    if kept is not None and len(kept) >= size:
        return kept
    return np.empty(size + size // 8, np.uint8)


def _grown(buf: npt.NDArray[np.uint8], used: int, size: int) -> npt.NDArray[np.uint8]:
    """A fresh buffer of ``size`` bytes holding buf's first ``used`` (never resized in
    place: a view of buf may still exist)."""
    grown = np.empty(size, np.uint8)
    grown[:used] = buf[:used]
    return grown


def _keep_buffer(slot: str, buf: npt.NDArray[np.uint8]) -> None:
    """Keep buf as this thread's buffer ``slot``, unless it is above _KEEP_BYTES."""
    setattr(_buffers, slot, buf if len(buf) <= _KEEP_BYTES else None)


def detect_format(head: bytes, name: str) -> str:
    """'parquet', 'csv.gz' or 'csv', from the first bytes of the part (not its name)."""
    del name  # the key's suffix is the sender's claim; the magic bytes are the fact
    if head[:4] == b"PAR1":
        return "parquet"
    if head[:2] == b"\x1f\x8b":
        return "csv.gz"
    return "csv"


def read_part(body: native.Buffer, contract: Contract, fmt: str | None = None) -> pd.DataFrame:
    """The part's group-key and value columns, typed as the contract says, or a PartError."""
    return table_frame(read_table(body, contract, fmt), contract)


def read_table(
    body: native.Buffer, contract: Contract, fmt: str | None = None, keyless: Keyless | None = None
) -> pa.Table:
    """read_part's columns as an Arrow table, or a PartError. Rows whose group key is
    missing are left out, as pandas' groupby leaves them out of every group (counted in
    ``keyless``)."""
    fmt = fmt or detect_format(bytes(body[:4]), "")
    if fmt == "parquet":
        tables = list(parquet_tables(body, contract, keyless))
        return pa.concat_tables(tables) if tables else _empty_table(contract)
    if fmt in ("csv", "csv.gz"):
        # bytes: the CSV error path searches and decodes the text.
        text = body if isinstance(body, bytes) else bytes(body)
        return _read_csv(text, contract, gzipped=fmt == "csv.gz", keyless=keyless)
    raise PartError("BAD_FORMAT", f"unknown part format {fmt!r}")


def table_groups(tables: Iterable[pa.Table], contract: Contract) -> native.Groups | None:
    """The per-group moments of the rows of tables as read_table returns them (one part's,
    whole or in batches), from the native kernels on the int64 key column itself (no
    DataFrame, no factorisation). None where csv_groups would not apply; then tables is
    left unread."""
    if native.LIB is None or not _plain_contract(contract):
        return None
    (key,) = contract.group_by
    return native.rollup_key_batches(
        # nulls come out as NaN
        ((numpy_column(t.column(key)), [numpy_column(t.column(v)) for v in contract.values]) for t in tables),
        len(contract.values),
    )


# ---- shared -----------------------------------------------------------------------------


def _check_header(names: Sequence[str], contract: Contract, line: int | None) -> None:
    """The columns must be exactly the declared ones, each once (any order)."""
    declared = contract.columns
    seen: set[str] = set()
    for pos, name in enumerate(names, start=1):
        if name in seen:
            raise PartError("DUPLICATE_COLUMN", f"column {_describe(name, pos, declared)} repeats", line)
        seen.add(name)
    for name in declared:
        if name not in seen:
            raise PartError("MISSING_COLUMN", f"column {name!r} is missing", line)
    for pos, name in enumerate(names, start=1):
        if name not in declared:
            raise PartError(
                "UNEXPECTED_COLUMN",
                f"column {_describe(name, pos, declared)} is not declared",
                line,
            )


def _describe(name: str, pos: int, declared: dict[str, str]) -> str:
    # An undeclared "column name" may be a data row of a headerless file: quote only
    # names the contract declares, and give the position otherwise.
    return repr(name) if name in declared else f"#{pos}"


def _empty_table(contract: Contract) -> pa.Table:
    cols = contract.used_columns
    return pa.table([pa.nulls(0, ARROW_TYPES[contract.columns[c]]) for c in cols], names=list(cols))


class Keyless:
    """A part's rows left out of every group because a group key is missing (pandas'
    groupby leaves them out too): counted as the part is read, so that the job can say how
    many there were (the audit's PART_AGGREGATED record, the job's log)."""

    def __init__(self) -> None:
        self.rows = 0

    def keyed(self, table: pa.Table, contract: Contract) -> pa.Table:
        """without_null_keys(table), counting the rows it leaves out."""
        kept = without_null_keys(table, contract)
        self.rows += table.num_rows - kept.num_rows
        return kept


def without_null_keys(table: pa.Table, contract: Contract) -> pa.Table:
    """The rows whose group keys are all present (not null, not NaN): pandas' groupby
    leaves out a row with a missing key, and so does the rollup (a part's rows as read, or
    a partial's: s3rollup writes none without a key, another tool might)."""
    keys = [table.column(col) for col in contract.group_by]
    if not any(k.null_count or pa.types.is_floating(k.type) for k in keys):
        return table  # nothing can be missing: no nulls, and no float key to hold NaN
    if _plain_contract(contract) and table.column_names == list(contract.used_columns):
        # One int64 key and float64 values, as the native kernels take them: the rows are
        # kept by NumPy, without pyarrow.compute (about 0.13 s to import and start) and
        # without Arrow's filter. A missing value comes out as NaN, as the kernels and
        # pandas read it.
        (key,) = keys
        keep = valid_cells(key)
        columns = [arrow_column(numpy_column(key, nulls=False)[keep])]
        columns += [arrow_column(numpy_column(table.column(v))[keep]) for v in contract.values]
        return pa.Table.from_arrays(columns, names=table.column_names)
    import pyarrow.compute as pc

    missing: Any = None
    for col in contract.group_by:
        m = pc.is_null(table.column(col), nan_is_null=True)
        missing = m if missing is None else pc.or_(missing, m)
    if missing is None or not pc.any(missing).as_py():
        return table
    return table.filter(pc.invert(missing))


def table_frame(table: pa.Table, contract: Contract) -> pd.DataFrame:
    """read_table's table as read_part's DataFrame."""
    df = table.select(list(contract.used_columns)).to_pandas(split_blocks=True)
    for col in contract.used_columns:
        # to_pandas already maps int64 (nulls -> float64), float64 and string; a header-
        # only part must come out with the same dtypes as a full one.
        if contract.columns[col] == "float64" and df[col].dtype != "float64":
            df[col] = df[col].astype("float64")
    return df


# ---- CSV --------------------------------------------------------------------------------


def _read_csv(body: bytes, contract: Contract, gzipped: bool, keyless: Keyless | None = None) -> pa.Table:
    import pyarrow.csv as pacsv

    # A gzipped part is inflated whole first: the quote check below needs the text, and
    # parsing it in parallel afterwards beats streaming it through a serial parser.
    data = bytes(_gunzip(body)) if gzipped else body
    names, header_end = _parse_header(data[:_MAX_HEADER_BYTES], len(data) <= _MAX_HEADER_BYTES)
    _check_header(names, contract, line=1)
    if header_end is None:
        # pyarrow cannot infer a header without a line break after it.
        return _empty_table(contract)
    used = list(contract.used_columns)
    convert = pacsv.ConvertOptions(
        column_types={c: ARROW_TYPES[contract.columns[c]] for c in used},
        include_columns=used,
        null_values=list(contract.na_values),
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
    )
    # A value spans lines only inside quotes. Telling pyarrow that values may hold line
    # breaks makes it parse serially, so only when a row (not the header, which writers
    # often quote) holds a quote at all.
    parse = pacsv.ParseOptions(newlines_in_values=data.find(b'"', header_end) != -1)
    try:
        table = pacsv.read_csv(pa.BufferReader(data), parse_options=parse, convert_options=convert)
    except (pa.ArrowException, OSError) as exc:
        raise _locate_csv_error(data, contract, names, exc) from None
    return (keyless if keyless is not None else Keyless()).keyed(table, contract)


def csv_text(body: native.Buffer, fmt: str) -> native.Buffer:
    """A CSV or CSV.gz part's text (inflated), or a PartError."""
    return _gunzip(body) if fmt == "csv.gz" else body


def csv_groups(data: native.Buffer, contract: Contract, pieces: int = 1) -> list[native.Groups] | None:
    """A plain CSV part's per-group moments, parsed and aggregated natively.

    For a contract with one int64 group key and float64 value columns, when the native
    kernels are built. The header is checked exactly as read_part checks it (same errors).
    With ``pieces`` above 1, a large part is cut at line breaks into up to that many pieces
    parsed at once on as many threads (the kernels run without the GIL): the moments of each
    piece come back, to be merged like any partials. None when this path does not apply or
    the rows are not plain enough for it (quotes, for one): read_part then reads the part
    and accepts or rejects it, so both paths accept the same parts. Cells spelled as the
    contract's missing values are NaN, and a row whose key is missing is in no group.
    """
    if native.LIB is None or not _plain_contract(contract):
        return None
    if any(_NATIVE_NUMBER.fullmatch(v) for v in contract.na_values):
        return None
    names, header_end = _parse_header(bytes(data[:_MAX_HEADER_BYTES]), len(data) <= _MAX_HEADER_BYTES)
    _check_header(names, contract, line=1)
    if header_end is None:
        return None
    key = contract.group_by[0]
    value_index = {v: j for j, v in enumerate(contract.values)}
    roles = [native.ROLE_KEY if n == key else value_index.get(n, native.ROLE_SKIP) for n in names]
    na = native.na_spellings(contract.na_values)

    def piece(bounds: tuple[int, int]) -> native.Groups | None:
        start, end = bounds
        return native.rollup_csv(data[:end], start, roles, len(contract.values), na)

    ranges = _line_ranges(data, header_end, pieces)
    if len(ranges) == 1:
        groups = [piece(ranges[0])]
    else:
        with ThreadPoolExecutor(len(ranges), thread_name_prefix="s3rollup-csv") as pool:
            groups = list(pool.map(piece, ranges))
    found = [g for g in groups if g is not None]
    return found if len(found) == len(groups) else None


# csv_groups cuts a part into pieces of at least this many bytes.
_PIECE_BYTES = 8 << 20


def _line_ranges(data: native.Buffer, start: int, pieces: int) -> list[tuple[int, int]]:
    """Up to ``pieces`` (start, end) byte ranges of whole lines that cover data[start:]."""
    size = len(data) - start
    count = max(1, min(pieces, size // _PIECE_BYTES))
    cuts = [start]
    for i in range(1, count):
        at = start + size * i // count
        line_end = bytes(data[at : at + (1 << 16)]).find(b"\n")
        if line_end != -1:
            cuts.append(at + line_end + 1)
    cuts.append(len(data))
    return list(itertools.pairwise(cuts))


def _plain_contract(contract: Contract) -> bool:
    return (
        len(contract.group_by) == 1
        and contract.columns[contract.group_by[0]] == "int64"
        and 0 < len(contract.values) <= native.MAX_VALUES
        and all(contract.columns[v] == "float64" for v in contract.values)
    )


# A CSV.gz part inflates to at most the validator's bomb ratio times its size (at least
# validate.BOMB_MIN_OUTPUT): the validator can only check that ratio on the part's head.
GZIP_MAX_RATIO = validate.Limits().max_gzip_ratio
# Input is fed to the inflater _GZIP_FIRST_READ bytes at a time at the start of each member,
# doubling up to _GZIP_MAX_READ: a member's end costs a copy of the rest of its slice (the
# inflater's unused_data), so parts of many tiny members cost little more than their size.
_GZIP_FIRST_READ = 8 << 10
_GZIP_MAX_READ = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"


def _gunzip(body: native.Buffer) -> memoryview:
    """A CSV.gz part's text: its members inflated one after another (NUL padding between
    and after them allowed, as the gzip module allows it), by Intel ISA-L (isal) through
    zlib's streaming API, or a PartError: BAD_FORMAT for a corrupt or truncated stream or
    trailing bytes, GZIP_BOMB when it inflates past GZIP_MAX_RATIO times its size (memory
    never holds more than that).

    The text goes into this thread's reusable buffer, as read_body's bytes do (70 MB of
    fresh memory per demo part cost more than a third of the inflate): the view is valid
    until the thread's next call."""
    from isal import isal_zlib

    view = memoryview(body).cast("B")
    limit = max(validate.BOMB_MIN_OUTPUT, GZIP_MAX_RATIO * len(view))
    # The last member's size as its trailer states it (mod 2^32), the usual size of a
    # part of one member; untrusted, so only a first guess, within the limit.
    stated = int.from_bytes(view[-4:], "little") if len(view) >= 4 else 0
    buf = _thread_buffer("text", min(limit, max(stated, 2 * len(view))))
    size = pos = 0
    while pos < len(view):
        inflater = isal_zlib.decompressobj(wbits=31)
        read = _GZIP_FIRST_READ
        while not inflater.eof:
            if pos >= len(view):
                raise PartError("BAD_FORMAT", "the gzip stream is truncated")
            piece = view[pos : pos + read]
            try:
                out = inflater.decompress(piece, limit - size + 1)
            except isal_zlib.error:  # type: ignore[misc]  # its stub declares an instance
                raise PartError("BAD_FORMAT", "the gzip stream is corrupt") from None
            if size + len(out) > limit:
                raise PartError("GZIP_BOMB", f"gzip inflates more than {GZIP_MAX_RATIO}:1")
            if size + len(out) > len(buf):
                buf = _grown(buf, size, min(limit, max(2 * len(buf), size + len(out))))
            buf[size : size + len(out)] = np.frombuffer(out, np.uint8)
            size += len(out)
            pos += len(piece) - len(inflater.unconsumed_tail) - len(inflater.unused_data)
            read = min(2 * read, _GZIP_MAX_READ)
        if view[pos : pos + 2] != _GZIP_MAGIC:
            rest = bytes(view[pos:]).lstrip(b"\0")
            if rest and not rest.startswith(_GZIP_MAGIC):
                raise PartError("BAD_FORMAT", "the gzip stream is followed by other bytes")
            pos = len(view) - len(rest)
    _keep_buffer("text", buf)
    return memoryview(buf)[:size]


def _parse_header(head: bytes, complete: bool) -> tuple[list[str], int | None]:
    """The header's column names, and the offset where the rows start in the part.

    ``complete`` says whether ``head`` is the whole file rather than its first bytes. The
    offset is None when the part is its header without a line break.
    """
    start = len(_BOM) if head.startswith(_BOM) else 0
    m = _LINE_BREAK.search(head, start)
    if m is None and not complete:
        raise PartError("BAD_FORMAT", "the header line does not end", 1)
    line = head[start:] if m is None else head[start : m.start()]
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise PartError("BAD_ENCODING", "header is not UTF-8", 1) from None
    if not text.strip():
        raise PartError("BAD_FORMAT", "first line must be the header and is empty", 1)
    names = next(csv.reader([text]))
    return names, None if m is None else m.end()


def _cell_checker(typ: str, na: frozenset[str]) -> Callable[[str], str | None]:
    """A function from a cell to the reason it is rejected (None when it is fine). A
    missing value is fine in every column: in a group key it leaves its row out."""

    def check(cell: str) -> str | None:
        if cell in na:
            return None
        if typ == "string":
            return "BAD_ENCODING" if _has_undecodable(cell) else None
        if typ == "int64":
            if _INT_RE.fullmatch(cell) and _INT64_MIN <= int(cell) <= _INT64_MAX:
                return None
            return "BAD_VALUE"
        return None if _FLOAT_RE.fullmatch(cell) else "BAD_VALUE"

    return check


def _has_undecodable(cell: str) -> bool:
    # surrogateescape maps each undecodable byte to a lone surrogate U+DC80..U+DCFF.
    return any("\udc80" <= ch <= "\udcff" for ch in cell)


def _arrow_rejects(cell: str, typ: str, na: frozenset[str]) -> bool:
    """Ask pyarrow itself about one cell, so the line reported is the one it choked on."""
    import pyarrow.csv as pacsv

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([cell])
    raw = b"v\n" + buf.getvalue().encode("utf-8", errors="surrogateescape")
    convert = pacsv.ConvertOptions(
        column_types={"v": ARROW_TYPES[typ]},
        null_values=sorted(na),
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
    )
    try:
        pacsv.read_csv(pa.BufferReader(raw), convert_options=convert)
    except pa.ArrowException:
        return True
    return False


def _record_pattern(contract: Contract) -> re.Pattern[str]:
    # A cell is a missing-value spelling (exactly) or a value of its column's type.
    missing = [re.escape(v) for v in contract.na_values]
    cells = ["|".join([*missing, _RECORD_CELL[contract.columns[col]]]) for col in contract.used_columns]
    return re.compile("\x00".join(f"(?:{c})" for c in cells))


def _locate_csv_error(
    data: bytes, contract: Contract, names: list[str], exc: BaseException | None
) -> PartError:
    """Walk the records in order and describe the first one pyarrow would refuse."""
    text = data.decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    reader = csv.reader(io.StringIO(text, newline=""))
    used = contract.used_columns
    positions = [names.index(col) for col in used]
    cells_of = operator.itemgetter(*positions)
    clean = _record_pattern(contract).fullmatch
    na = frozenset(contract.na_values)
    checks = [(col, contract.columns[col], _cell_checker(contract.columns[col], na)) for col in used]
    try:
        next(reader)  # the header, already checked
        end = reader.line_num
        for record in reader:
            start, end = end + 1, reader.line_num
            if not record:
                continue  # blank lines are skipped, as pyarrow does
            if len(record) != len(names):
                return PartError(
                    "BAD_FORMAT", f"{len(record)} fields where the header has {len(names)}", start
                )
            cells = cells_of(record)
            if clean("\x00".join(cells) if len(used) > 1 else cells):
                continue
            for cell, (col, typ, check) in zip(cells if len(used) > 1 else (cells,), checks, strict=True):
                code = check(cell)
                if code == "BAD_VALUE" and not _arrow_rejects(cell, typ, na):
                    code = None
                if code == "BAD_ENCODING":
                    return PartError(code, f"column {col!r} is not UTF-8", start)
                if code is not None:
                    return PartError(code, f"column {col!r} is not a valid {typ}", start)
    except csv.Error:
        # In practice the csv module's field size limit; pyarrow has none, so its own
        # verdict (without a line) is the better report.
        pass
    return _describe_arrow_error(exc, names)


def _describe_arrow_error(exc: BaseException | None, names: list[str]) -> PartError:
    """A line-less PartError from a pyarrow failure the slow pass could not pin down."""
    msg = str(exc) if exc is not None else ""
    # Only the column number is taken from pyarrow's message: the rest may quote a cell.
    m = re.match(r"In CSV column #(\d+)", msg)
    column = f"column {names[int(m.group(1))]!r}" if m and int(m.group(1)) < len(names) else "a column"
    if "UTF8" in msg:
        return PartError("BAD_ENCODING", f"{column} is not UTF-8")
    if "conversion error" in msg:
        return PartError("BAD_VALUE", f"{column} holds a value that is not of its type")
    if isinstance(exc, OSError):
        return PartError("BAD_FORMAT", "not a valid gzip stream")
    return PartError("BAD_FORMAT", "malformed CSV")


# ---- Parquet ----------------------------------------------------------------------------


# parquet_tables decodes a part this many rows at a time: the decoded columns of a batch
# (2 MiB for the seed's schema) are reused from batch to batch and from part to part, where a
# whole part's (32 MiB) would be fresh memory for each of a worker's first parts.
_PARQUET_BATCH_ROWS = 1 << 16


def parquet_tables(
    body: native.Buffer, contract: Contract, keyless: Keyless | None = None
) -> Iterator[pa.Table]:
    """A Parquet part's used columns, typed as the contract says, in tables of at most
    _PARQUET_BATCH_ROWS rows, rows with a null (or NaN) group key left out (counted in
    ``keyless``); a PartError (at the batch where it is found) otherwise. Only real nulls
    are missing here: Parquet cells are typed, and pandas' read_parquet reads no spelling
    as missing."""
    try:
        pf = pq.ParquetFile(pa.BufferReader(body))
        schema = pf.schema_arrow
    except UnicodeDecodeError:  # pyarrow decodes the footer's column names as it opens it
        raise PartError("BAD_ENCODING", "Parquet column names are not UTF-8") from None
    except (pa.ArrowException, OSError):
        raise PartError("BAD_FORMAT", "not a readable Parquet file") from None
    _check_header(_parquet_columns(schema), contract, line=None)
    used = list(contract.used_columns)
    tally = keyless if keyless is not None else Keyless()
    batches = pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=used, use_threads=False)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError):
            raise PartError("BAD_FORMAT", "Parquet data cannot be read") from None
        if batch is None:
            return
        arrays = [_cast_parquet_column(batch.column(c), c, contract.columns[c]) for c in used]
        # A fresh table drops the writer's pandas metadata (index, categorical dtypes).
        yield tally.keyed(pa.table(arrays, names=used), contract)


_T = TypeVar("_T")


def read_ahead(items: Iterator[_T], depth: int = 2) -> Iterator[_T]:
    """items in order, produced on a thread of their own up to ``depth`` ahead of the
    caller, and what producing them raised, where it raised it.

    For a part that has the worker to itself: pyarrow decodes a Parquet batch (without the
    GIL) while the native kernels take the batch before it, on another CPU. Nothing runs
    until the first item is asked for; once the caller stops, early or not, the producer
    is stopped and waited for, so nothing still reads the part's buffer after this returns.
    """
    ready: queue.Queue[tuple[bool, Any]] = queue.Queue(depth)
    stop = threading.Event()

    def put(done: bool, item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put((done, item), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(False, item):
                    return
            put(True, None)
        except BaseException as exc:  # re-raised in the caller's thread
            put(True, exc)

    producer = threading.Thread(target=produce, name="s3rollup-read-ahead", daemon=True)
    producer.start()
    try:
        while True:
            done, item = ready.get()
            if done:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        producer.join()


def _parquet_columns(schema: pa.Schema) -> list[str]:
    # pandas stores an unnamed, non-default index as an extra column and lists it in its
    # metadata: the writer's bookkeeping, not data. A named index is a real column. Metadata
    # that is not readable JSON (or not an object) is no bookkeeping: every column counts.
    try:
        meta = schema.pandas_metadata or {}
    except ValueError:  # undecodable bytes or not JSON
        meta = {}
    listed = meta.get("index_columns", []) if isinstance(meta, dict) else []
    index_cols = {
        c
        for c in (listed if isinstance(listed, list) else [])
        if isinstance(c, str) and re.fullmatch(r"__index_level_\d+__", c)
    }
    return [n for n in schema.names if n not in index_cols]


def _cast_parquet_column(arr: pa.Array, col: str, typ: str) -> pa.Array:
    """The column as the contract's type, if that is lossless; otherwise BAD_VALUE."""
    t = arr.type
    if pa.types.is_dictionary(t):
        arr, t = arr.cast(t.value_type), t.value_type
    target = ARROW_TYPES[typ]
    if pa.types.is_null(t):
        ok = True  # a column written with no values at all
    elif typ == "string":
        ok = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
    else:
        ok = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
    if not ok:
        raise PartError("BAD_VALUE", f"column {col!r} has Parquet type {t}, expected {typ}")
    if t == target:
        return arr
    import pyarrow.compute as pc

    try:
        # safe=True refuses overflow, truncation and lost precision.
        return pc.cast(arr, target, safe=True)
    except pa.ArrowException:
        raise PartError("BAD_VALUE", f"column {col!r} does not fit {typ} without loss") from None
