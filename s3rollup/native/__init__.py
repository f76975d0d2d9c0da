"""s3rollup's native rollup kernels (rollup.c), loaded with ctypes.

``make`` (and the worker image) compiles rollup.c into librollup.so next to this file. The
kernels compute, in one pass and without the GIL, what pandas' groupby kernels compute
(and ``merge`` what stats' NumPy merge of partials computes); where the library is not
built, or S3ROLLUP_NATIVE=0, ``LIB`` is None and s3rollup uses pandas' kernels and the
NumPy merge instead (same results, slower). ``kernels()`` says which are in use.

On a CPU with AVX2 the kernels update a row's values four at a time (``vector()``); else,
or with ``use_vector`` False, one at a time. Both give the same bits.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

_OK, _UNSUPPORTED, _NOMEM, _BADARG = 0, 1, -1, 2
ROLE_SKIP, ROLE_KEY = -2, -1
MAX_VALUES = 64
LIBRARY = Path(__file__).with_name("librollup.so")

Buffer = bytes | bytearray | memoryview
_I64P = ctypes.POINTER(ctypes.c_int64)
_F64P = ctypes.POINTER(ctypes.c_double)


def _load() -> ctypes.CDLL | None:
    if os.environ.get("S3ROLLUP_NATIVE", "1") == "0" or not LIBRARY.is_file():
        return None
    lib = ctypes.CDLL(str(LIBRARY))
    lib.sr_new.restype = ctypes.c_void_p
    lib.sr_new.argtypes = [ctypes.c_int]
    lib.sr_free.restype = None
    lib.sr_free.argtypes = [ctypes.c_void_p]
    lib.sr_defer.restype = None
    lib.sr_defer.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    lib.sr_vector.restype = ctypes.c_int
    lib.sr_vector.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.sr_groups.restype = ctypes.c_int64
    lib.sr_groups.argtypes = [ctypes.c_void_p]
    lib.sr_codes.restype = ctypes.c_int
    lib.sr_codes.argtypes = [ctypes.c_void_p, _I64P, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(_F64P)]
    lib.sr_keys.restype = ctypes.c_int
    lib.sr_keys.argtypes = [ctypes.c_void_p, _I64P, ctypes.c_int64, ctypes.POINTER(_F64P)]
    lib.sr_csv.restype = ctypes.c_int
    lib.sr_csv.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.POINTER(ctypes.c_int8),
        ctypes.c_int,
    ]
    lib.sr_na.restype = ctypes.c_int
    lib.sr_na.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int64, ctypes.c_int]
    lib.sr_export.restype = None
    lib.sr_export.argtypes = [ctypes.c_void_p, _I64P, _I64P, _I64P, _F64P, _F64P, _F64P, _F64P]
    lib.sr_keyless.restype = ctypes.c_int64
    lib.sr_keyless.argtypes = [ctypes.c_void_p]
    lib.sr_thread_bytes.restype = ctypes.c_int64
    lib.sr_thread_bytes.argtypes = []
    lib.sr_merge.restype = ctypes.c_int
    lib.sr_merge.argtypes = [
        ctypes.c_int64,
        _I64P,
        _I64P,
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.POINTER(_F64P),
        ctypes.POINTER(_F64P),
    ]
    return lib


LIB = _load()


def kernels() -> str:
    """'native' when librollup.so is in use, else 'pandas'."""
    return "native" if LIB is not None else "pandas"


# False: contexts update rows one value at a time even where AVX2 is available (tests).
use_vector = True
# (groups, bytes): from how many groups on sr_keys's rows wait by partition, and in buffers
# of about how many bytes (tests; None: the library's defaults, 16,384 groups and 16 MiB).
defer: tuple[int, int] | None = None


def thread_bytes() -> int:
    """Bytes the kernels keep for threads' next parts: each thread's wait buffer (rows
    waiting by partition) and the group storage of the last context freed on it, until the
    thread ends."""
    return int(LIB.sr_thread_bytes()) if LIB is not None else 0


def vector() -> bool:
    """Whether the native kernels update rows with AVX2 (this CPU has it and use_vector)."""
    if LIB is None:
        return False
    with _Context(0) as ctx:
        return bool(LIB.sr_vector(ctx.ptr, 1))


@dataclass(frozen=True)
class Groups:
    """Per group (rows: code order for rollup_codes, first-seen order otherwise) and value
    column (columns): the moments. ``keyless``: the records rollup_csv read whose key is
    missing, in no group."""

    keys: npt.NDArray[np.int64]
    rows: npt.NDArray[np.int64]
    count: npt.NDArray[np.int64]
    mean: npt.NDArray[np.float64]
    m2: npt.NDArray[np.float64]
    min: npt.NDArray[np.float64]
    max: npt.NDArray[np.float64]
    keyless: int = 0

    @property
    def records(self) -> int:
        """The rows aggregated."""
        return int(self.rows.sum())


def _i64(a: npt.NDArray[np.int64]) -> ctypes._Pointer[ctypes.c_int64]:
    return a.ctypes.data_as(_I64P)


def _f64(a: npt.NDArray[np.float64]) -> ctypes._Pointer[ctypes.c_double]:
    return a.ctypes.data_as(_F64P)


def _check(status: int) -> None:
    if status == _NOMEM:
        raise MemoryError("native rollup: out of memory")
    if status == _BADARG:
        raise ValueError("native rollup: a group code is out of range, or keys sent to a context of codes")


class _Context:
    def __init__(self, nvalues: int) -> None:
        if LIB is None:
            raise RuntimeError("librollup.so is not loaded")
        if not 0 <= nvalues <= MAX_VALUES:
            raise ValueError(f"the native kernels take at most {MAX_VALUES} value columns")
        self.lib = LIB
        self.nvalues = nvalues
        self.ptr = LIB.sr_new(nvalues)
        if not self.ptr:
            raise MemoryError("native rollup: out of memory")
        if not use_vector:
            LIB.sr_vector(self.ptr, 0)
        if defer is not None:
            LIB.sr_defer(self.ptr, *defer)

    def __enter__(self) -> _Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.lib.sr_free(self.ptr)

    def export(self) -> Groups:
        k = int(self.lib.sr_groups(self.ptr))  # first takes in the rows still waiting
        if k < 0:
            raise MemoryError("native rollup: out of memory")
        nv = self.nvalues
        keys = np.empty(k, np.int64)
        rows = np.empty(k, np.int64)
        count = np.empty((k, nv), np.int64)
        mean, m2, mn, mx = (np.empty((k, nv)) for _ in range(4))
        self.lib.sr_export(
            self.ptr, _i64(keys), _i64(rows), _i64(count), _f64(mean), _f64(m2), _f64(mn), _f64(mx)
        )
        return Groups(keys, rows, count, mean, m2, mn, mx, int(self.lib.sr_keyless(self.ptr)))


def _f64_pointers(arrays: Sequence[npt.NDArray[np.float64]]) -> ctypes.Array[Any]:
    """The C array of the data pointers of float64 arrays (kept alive by the caller)."""
    return (_F64P * max(1, len(arrays)))(*(_f64(a) for a in arrays))


def _columns(
    rows: npt.NDArray[np.int64], values: Sequence[npt.NDArray[np.float64]]
) -> tuple[list[npt.NDArray[np.float64]], ctypes.Array[Any]]:
    """The value columns as contiguous float64 arrays (kept alive by the caller) and the C
    array of their data pointers."""
    cols = [np.ascontiguousarray(v, dtype=np.float64) for v in values]
    if any(len(c) != len(rows) for c in cols):
        raise ValueError("value columns and keys differ in length")
    return cols, _f64_pointers(cols)


def rollup_codes(codes: npt.NDArray[np.int64], k: int, values: Sequence[npt.NDArray[np.float64]]) -> Groups:
    """The moments of rows with dense group codes in [0, k) (-1: skipped); group g is code g."""
    codes = np.ascontiguousarray(codes, dtype=np.int64)
    cols, ptrs = _columns(codes, values)
    with _Context(len(cols)) as ctx:
        _check(ctx.lib.sr_codes(ctx.ptr, _i64(codes), len(codes), k, ptrs))
        return ctx.export()


def rollup_keys(keys: npt.NDArray[np.int64], values: Sequence[npt.NDArray[np.float64]]) -> Groups:
    """The moments of rows grouped by an int64 key (no nulls); groups in first-seen order."""
    return rollup_key_batches([(keys, values)], len(values))


KeyBatch = tuple[npt.NDArray[np.int64], Sequence[npt.NDArray[np.float64]]]


def rollup_key_batches(batches: Iterable[KeyBatch], nvalues: int) -> Groups:
    """rollup_keys over the rows of every (keys, values) batch in turn: one part's rows read
    a batch at a time, so that its columns never exist whole."""
    with _Context(nvalues) as ctx:
        for keys, values in batches:
            keys = np.ascontiguousarray(keys, dtype=np.int64)
            cols, ptrs = _columns(keys, values)
            if len(cols) != nvalues:
                raise ValueError("a batch has another number of value columns")
            _check(ctx.lib.sr_keys(ctx.ptr, _i64(keys), len(keys), ptrs))
        return ctx.export()


def na_spellings(na_values: Iterable[str]) -> tuple[bytes, bool]:
    """rollup_csv's ``na``: the non-empty spellings as UTF-8, each ended by a NUL, and
    whether an empty cell is missing too."""
    values = list(na_values)
    return b"".join(v.encode() + b"\0" for v in values if v), "" in values


def rollup_csv(
    data: Buffer, start: int, roles: Sequence[int], nvalues: int, na: tuple[bytes, bool] = (b"", True)
) -> Groups | None:
    """The moments of a plain CSV body's records from byte ``start``, grouped by its int64 key.

    ``roles`` gives, per field, ROLE_SKIP, ROLE_KEY or the value column's index. ``na``
    (from na_spellings) says which cells are missing: NaN in a value column; a record whose
    key is missing is in no group. None when the body is not plain enough for the fast
    parser: read it with pyarrow instead.
    """
    role_array = (ctypes.c_int8 * max(1, len(roles)))(*roles)
    raw = np.frombuffer(data, dtype=np.uint8)  # no copy; keeps the buffer alive for the call
    with _Context(nvalues) as ctx:
        _check(ctx.lib.sr_na(ctx.ptr, na[0], len(na[0]), int(na[1])))
        status = ctx.lib.sr_csv(ctx.ptr, raw.ctypes.data, len(raw), start, role_array, len(roles))
        _check(status)
        if status == _UNSUPPORTED:
            return None
        return ctx.export()


def merge(
    codes: npt.NDArray[np.int64], k: int, nvalues: int, partials: Sequence[Sequence[npt.NDArray[np.float64]]]
) -> list[npt.NDArray[np.float64]]:
    """Chan et al.'s merge of partials into k groups (sr_merge): partials[p] is partial p's
    fields as float64 arrays (rows, then per value column count, mean, M2, min, max), codes
    its rows' group codes, all partials' one after another (-1: in no group). Returns the
    merged fields in the same order, k values each (rows and counts as float64 sums)."""
    if LIB is None:
        raise RuntimeError("librollup.so is not loaded")
    nf = 1 + 5 * nvalues
    cols = [np.ascontiguousarray(f, dtype=np.float64) for fields in partials for f in fields]
    lengths = np.array([len(fields[0]) for fields in partials], dtype=np.int64)
    if any(len(fields) != nf for fields in partials) or any(
        len(c) != lengths[i // nf] for i, c in enumerate(cols)
    ):
        raise ValueError("a partial has another number of fields, or fields of other lengths")
    codes = np.ascontiguousarray(codes, dtype=np.int64)
    if len(codes) != int(lengths.sum()):
        raise ValueError("codes and partials differ in length")
    out = [np.empty(k) for _ in range(nf)]
    ins, outs = _f64_pointers(cols), _f64_pointers(out)
    _check(LIB.sr_merge(len(partials), _i64(lengths), _i64(codes), k, nvalues, ins, outs))
    return out
