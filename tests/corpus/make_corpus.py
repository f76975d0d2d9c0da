"""Regenerate the validator corpus: tests/corpus/bad/, tests/corpus/good/, bad/EXPECTED.json.

Run ``python tests/corpus/make_corpus.py``. Standard library only and deterministic (gzip
with mtime 0, seeded pseudo-random text, hand-encoded Parquet footers), so the files only
change when this script does. Every bad file is read with the default contract
(id, value1, value2, value3, category) and must be rejected with the code in EXPECTED.json.
Several bad files carry PLANTED personal values next to their actual defect, so tests can
check that no verdict message ever echoes them.
"""

from __future__ import annotations

import bz2
import gzip
import json
import random
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADER = b"id,value1,value2,value3,category"
ROWS = b"1,1.5,2.25,-3e2,7\n2,0.5,,nan,7\n3,-1,4,5,8\n"

EMAIL = "jane.doe@example.com"
CARD = "4111111111111111"  # Luhn-valid test Visa number
CARD_DASHED = "4111-1111-1111-1111"
PHONE = "+49 151 23456789"
SSN = "123-45-6789"
PLANTED: tuple[str, ...] = (EMAIL, CARD, CARD_DASHED, PHONE, SSN)


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def _csv(*lines: bytes, end: bytes = b"\n") -> bytes:
    return b"".join(line + end for line in lines)


# ---- hand-encoded Parquet footers (Thrift compact protocol) ------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _zigzag(n: int) -> bytes:
    return _varint((n << 1) ^ (n >> 63))


def _struct(fields: list[tuple[int, int, bytes]]) -> bytes:
    """Encode a struct from (field id, compact type, encoded value), ids ascending."""
    out = bytearray()
    last = 0
    for fid, ftype, value in fields:
        delta = fid - last
        if 0 < delta <= 15:
            out.append((delta << 4) | ftype)
        else:
            out.append(ftype)
            out += _zigzag(fid)
        out += value
        last = fid
    out.append(0)
    return bytes(out)


def _list(etype: int, items: list[bytes]) -> bytes:
    head = bytes([(len(items) << 4) | etype]) if len(items) < 15 else bytes([0xF0 | etype])
    if len(items) >= 15:
        head += _varint(len(items))
    return head + b"".join(items)


def _binary(s: str) -> bytes:
    raw = s.encode()
    return _varint(len(raw)) + raw


def schema_element(
    name: str, ptype: int | None = None, children: int | None = None, repetition: int = 1
) -> bytes:
    """A SchemaElement: physical type for leaves, num_children for groups."""
    fields: list[tuple[int, int, bytes]] = []
    if ptype is not None:
        fields.append((1, 5, _zigzag(ptype)))
    if children is None:
        fields.append((3, 5, _zigzag(repetition)))
    fields.append((4, 8, _binary(name)))
    if children is not None:
        fields.append((5, 5, _zigzag(children)))
    return _struct(fields)


def file_metadata(
    columns: list[tuple[str, int]],
    num_rows: int = 0,
    padding: int = 0,
    extra: tuple[bytes, ...] = (),
) -> bytes:
    """FileMetaData with a flat schema of (name, physical type); padding adds key/value bytes."""
    schema = [schema_element("schema", children=len(columns) + len(extra))]
    schema += [schema_element(name, ptype) for name, ptype in columns]
    schema += list(extra)
    fields = [
        (1, 5, _zigzag(1)),
        (2, 9, _list(12, schema)),
        (3, 6, _zigzag(num_rows)),
        (4, 9, _list(12, [])),
    ]
    if padding:
        kv = _struct([(1, 8, _binary("pad")), (2, 8, _binary("x" * padding))])
        fields.append((5, 9, _list(12, [kv])))
    return _struct(fields)


def parquet_file(footer: bytes, body: bytes = b"\x00" * 16) -> bytes:
    """PAR1, a body, the footer, its length and PAR1: enough for a footer-only reader."""
    return b"PAR1" + body + footer + struct.pack("<I", len(footer)) + b"PAR1"


INT64, DOUBLE, BYTE_ARRAY = 2, 5, 6
DEFAULT_PARQUET_COLUMNS = [
    ("id", INT64),
    ("value1", DOUBLE),
    ("value2", DOUBLE),
    ("value3", DOUBLE),
    ("category", INT64),
]


# ---- the corpus -------------------------------------------------------------------------------


def _words_field(n_chars: int) -> bytes:
    """Pseudo-random words: compresses about 4:1, far below any bomb ratio."""
    rng = random.Random(20260101)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(2000)
    ]
    out: list[str] = []
    size = 0
    while size < n_chars:
        w = rng.choice(words)
        out.append(w)
        size += len(w) + 1
    return " ".join(out).encode()


def bad_files() -> dict[str, tuple[bytes, str]]:
    """File name → (content, expected reason code)."""
    ok_rows = ROWS
    planted_row = f"9,{EMAIL},1,2,3\n".encode()
    files: dict[str, tuple[bytes, str]] = {
        "empty.csv": (b"", "EMPTY_OBJECT"),
        "spreadsheet.xlsx.csv": (
            b"PK\x03\x04\x14\x00\x06\x00\x08\x00" + b"[Content_Types].xml" + b"\x00" * 32,
            "UNSUPPORTED_FORMAT",
        ),
        "scan.pdf.csv": (
            b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
            "UNSUPPORTED_FORMAT",
        ),
        "archive.csv.bz2": (bz2.compress(_csv(HEADER) + ok_rows, 9), "UNSUPPORTED_FORMAT"),
        "photo.png.csv": (
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x00" * 17,
            "UNSUPPORTED_FORMAT",
        ),
        "double.csv.gz": (_gz(_gz(_csv(HEADER) + ok_rows)), "UNSUPPORTED_FORMAT"),
        # 16 MiB of zeros after the header: ~16 KiB compressed, ~1000:1.
        "bomb.csv.gz": (_gz(_csv(HEADER) + b"0" * (16 << 20)), "GZIP_BOMB"),
        "truncated.csv.gz": (_gz(_csv(HEADER) + ok_rows * 20)[:-30], "BAD_GZIP"),
        "crc_mismatch.csv.gz": (
            _gz(_csv(HEADER) + ok_rows)[:-8] + b"\xde\xad\xbe\xef" + b"\x00\x00\x00\x00",
            "BAD_GZIP",
        ),
        "trailing_garbage.csv.gz": (_gz(_csv(HEADER) + ok_rows) + b"garbage", "BAD_GZIP"),
        "not_deflate.csv.gz": (b"\x1f\x8b\x08\x00" + b"\xff" * 40, "BAD_GZIP"),
        "latin1.csv": (
            _csv(HEADER) + "1,caf\xe9,1,2,3\n".encode("latin-1") + planted_row,
            "BAD_ENCODING",
        ),
        "utf16_bom.csv": ((_csv(HEADER) + planted_row).decode().encode("utf-16"), "BAD_ENCODING"),
        "utf8_cut_at_end.csv": (_csv(HEADER) + ok_rows + "4,1,2,3,€".encode()[:-1], "BAD_ENCODING"),
        "utf16le_no_bom.csv": (
            (_csv(HEADER) + planted_row).decode().encode("utf-16-le"),
            "NUL_BYTES",
        ),
        "binary_nul.csv": (
            _csv(HEADER) + b"1,2,3,4,5\n\x00\x01\x02\x03" + planted_row,
            "NUL_BYTES",
        ),
        "blank_first_line.csv": (b"\n" + _csv(HEADER) + ok_rows, "NO_HEADER"),
        "only_commas.csv": (b",,,,\n" + ok_rows, "NO_HEADER"),
        "missing_column.csv": (
            _csv(b"id,value1,value2,category") + f"1,1,2,3\n2,{EMAIL},1,2\n".encode(),
            "MISSING_COLUMN",
        ),
        "renamed_column_case.csv": (
            _csv(b"ID,value1,value2,value3,category") + ok_rows,
            "MISSING_COLUMN",
        ),
        "duplicate_column.csv": (
            _csv(HEADER + f",{EMAIL},{EMAIL}".encode()) + b"1,1,2,3,4,5,6\n",
            "DUPLICATE_COLUMN",
        ),
        "unexpected_column.csv": (
            _csv(HEADER + f",{EMAIL}".encode()) + f"1,1,2,3,4,{CARD}\n".encode(),
            "UNEXPECTED_COLUMN",
        ),
        "unnamed_column.csv": (_csv(HEADER + b",") + b"1,1,2,3,4,\n", "UNEXPECTED_COLUMN"),
        "semicolons.csv": (_csv(HEADER.replace(b",", b";")) + b"1;1,5;2;3;4\n", "WRONG_DELIMITER"),
        "tabs.tsv.csv": (
            _csv(HEADER.replace(b",", b"\t")) + b"1\t1.5\t2\t3\t4\n",
            "WRONG_DELIMITER",
        ),
        "bad_quote.csv": (_csv(HEADER) + b'1,"1.5"x,2,3,4\n' + planted_row, "BAD_CSV"),
        "unterminated_quote.csv": (_csv(HEADER) + ok_rows + b'4,"1.5,2,3,4\n', "BAD_CSV"),
        "huge_field.csv.gz": (
            _gz(_csv(HEADER) + b'1,"' + _words_field(140_000) + b'",2,3,4\n'),
            "FIELD_TOO_LONG",
        ),
        "ragged_short.csv": (_csv(HEADER) + ok_rows + b"4,1,2,3\n", "RAGGED_ROW"),
        "ragged_long.csv": (_csv(HEADER) + b"1,1,2,3,4,5\n", "RAGGED_ROW"),
        "bad_int.csv": (_csv(HEADER) + ok_rows + b"12a,1,2,3,4\n", "BAD_VALUE"),
        "float_in_int.csv": (_csv(HEADER) + b"1,1,2,3,4.5\n", "BAD_VALUE"),
        "bad_float.csv": (_csv(HEADER) + b"1,1_000,2,3,4\n", "BAD_VALUE"),
        "decimal_comma.csv": (_csv(HEADER) + b'1,"1,5",2,3,4\n', "BAD_VALUE"),
        "int_overflow.csv": (_csv(HEADER) + b"99999999999999999999,1,2,3,4\n", "BAD_VALUE"),
        "email_in_value.csv": (_csv(HEADER) + ok_rows + planted_row, "PERSONAL_DATA"),
        "card_in_id.csv": (_csv(HEADER) + f"{CARD_DASHED},1,2,3,4\n".encode(), "PERSONAL_DATA"),
        "phone_in_value.csv": (_csv(HEADER) + f'1,1,"{PHONE}",3,4\n'.encode(), "PERSONAL_DATA"),
        "ssn_in_category.csv": (_csv(HEADER) + f"1,1,2,3,{SSN}\n".encode(), "PERSONAL_DATA"),
        "pii_after_ragged.csv": (
            _csv(HEADER) + b"1,2,3\n" + f"2,1,2,3,{SSN}\n".encode(),
            "PERSONAL_DATA",
        ),
        "parquet_tiny.parquet": (b"PAR1PAR1", "PARQUET_TRUNCATED"),
        "parquet_no_end_magic.parquet": (
            parquet_file(file_metadata(DEFAULT_PARQUET_COLUMNS))[:-3],
            "PARQUET_TRUNCATED",
        ),
        "parquet_footer_len_huge.parquet": (
            b"PAR1" + b"\x00" * 32 + struct.pack("<I", 1 << 30) + b"PAR1",
            "PARQUET_BAD_FOOTER",
        ),
        "parquet_footer_len_zero.parquet": (
            b"PAR1" + b"\x00" * 32 + struct.pack("<I", 0) + b"PAR1",
            "PARQUET_BAD_FOOTER",
        ),
        "parquet_garbage_footer.parquet": (parquet_file(b"\xff" * 40), "PARQUET_BAD_METADATA"),
        "parquet_footer_cut.parquet": (
            parquet_file(file_metadata(DEFAULT_PARQUET_COLUMNS)[:-20]),
            "PARQUET_BAD_METADATA",
        ),
        "parquet_missing_column.parquet": (
            parquet_file(file_metadata(DEFAULT_PARQUET_COLUMNS[:-1])),
            "MISSING_COLUMN",
        ),
        "parquet_unexpected_column.parquet": (
            parquet_file(file_metadata([*DEFAULT_PARQUET_COLUMNS, (EMAIL, BYTE_ARRAY)])),
            "UNEXPECTED_COLUMN",
        ),
        "parquet_string_value.parquet": (
            parquet_file(
                file_metadata([(n, BYTE_ARRAY if n == "value1" else t) for n, t in DEFAULT_PARQUET_COLUMNS])
            ),
            "BAD_COLUMN_TYPE",
        ),
        "parquet_float_id.parquet": (
            parquet_file(file_metadata([(n, DOUBLE) for n, _ in DEFAULT_PARQUET_COLUMNS])),
            "BAD_COLUMN_TYPE",
        ),
        "parquet_encrypted.parquet": (b"PARE" + b"\x00" * 40 + b"PARE", "UNSUPPORTED_FORMAT"),
    }
    return files


def good_files() -> dict[str, bytes]:
    """File name → content; each must be accepted with the default contract."""
    body = _csv(HEADER) + ROWS
    return {
        "basic.csv": body,
        "bom_crlf.csv": b"\xef\xbb\xbf" + body.replace(b"\n", b"\r\n"),
        "header_only.csv": HEADER,
        "header_only_newline.csv": _csv(HEADER),
        "header_only_crlf.csv": HEADER + b"\r\n",
        "basic.csv.gz": _gz(body),
        "multi_member.csv.gz": _gz(body) + _gz(b"4,1,2,3,9\n"),
        "reordered_columns.csv": _csv(b"category,id,value3,value2,value1") + b"7,1,1,2,3\n",
        "quoted_blank_lines.csv": _csv(HEADER) + b'"1","1.5",,"2",7\n\n\n2,1e-3,-Inf,+4,8\n',
        # A 16-digit id that passes Luhn, and NaN spellings, in numeric columns.
        "long_ids.csv": _csv(HEADER) + f"{CARD},1,NaN,-nan,{CARD}\n".encode(),
        "no_final_newline.csv": _csv(HEADER) + b"1,1.5,2,3,4",
        "utf8_text_ok.csv.gz": _gz(_csv(HEADER) + ROWS * 50),
    }


def main() -> None:
    """Write the corpus next to this script."""
    bad_dir, good_dir = HERE / "bad", HERE / "good"
    bad_dir.mkdir(exist_ok=True)
    good_dir.mkdir(exist_ok=True)
    expected: dict[str, str] = {}
    for name, (content, code) in sorted(bad_files().items()):
        (bad_dir / name).write_bytes(content)
        expected[name] = code
    (bad_dir / "EXPECTED.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
    for name, content in sorted(good_files().items()):
        (good_dir / name).write_bytes(content)


if __name__ == "__main__":
    main()
