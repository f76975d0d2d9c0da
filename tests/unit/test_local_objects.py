"""The embedded endpoint's object bytes in sealed files, and its access logs in batches."""

from __future__ import annotations

import os
import stat
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag

from s3rollup.local_objects import AccessLogBatches, ObjectFiles, SealedBuffer


@pytest.fixture
def files() -> Any:
    store = ObjectFiles()
    yield store
    store.remove()


def test_a_buffer_reads_back_what_moto_writes_as_a_file_would(files: ObjectFiles) -> None:
    # GIVEN a buffer written as moto's FakeKey writes its value
    buf = SealedBuffer(files, 5 * 2**20)
    buf.seek(0)
    buf.truncate()
    buf.write(b"id,value1\n1,0.5\n")
    # THEN it reads back whole, in chunks, and from a position, like a file
    buf.seek(0)
    assert buf.read() == b"id,value1\n1,0.5\n"
    buf.seek(0)
    assert [buf.read(7), buf.read(7), buf.read(7), buf.read(7)] == [b"id,valu", b"e1\n1,0.", b"5\n", b""]
    buf.seek(3)
    assert buf.read(5) == b"value"
    # WHEN it is rewritten shorter, then written in place
    buf.seek(0)
    buf.truncate()
    buf.write(b"abc")
    buf.seek(1)
    buf.write(b"XY")
    buf.seek(0)
    assert buf.read() == b"aXY"
    # AND an empty value has no file
    buf.seek(0)
    buf.truncate()
    buf.seek(0)
    assert buf.read() == b"" and os.listdir(files.path) == []


def test_the_bytes_on_disk_are_sealed_private_and_gone_when_closed(files: ObjectFiles) -> None:
    secret = b"customer,jane.doe@example.com,42\n" * 10
    buf = SealedBuffer(files)
    buf.write(secret)
    (name,) = os.listdir(files.path)
    path = os.path.join(files.path, name)
    # THEN the directory and the file are the process user's alone, and hold no plaintext
    assert stat.S_IMODE(os.stat(files.path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path, "rb") as f:
        on_disk = f.read()
    assert b"jane.doe" not in on_disk and len(on_disk) == len(secret) + 12 + 16
    # AND another store's key (another process) cannot open it
    other = ObjectFiles()
    try:
        with pytest.raises(InvalidTag):
            other.read(path)
    finally:
        other.remove()
    # WHEN the buffer is closed (moto disposes a version no bucket holds)
    buf.close()
    assert os.listdir(files.path) == []
    with pytest.raises(ValueError):
        buf.read()


def test_a_file_moved_to_another_objects_name_does_not_open(files: ObjectFiles) -> None:
    a, b = SealedBuffer(files), SealedBuffer(files)
    a.write(b"part a")
    b.write(b"part b")
    pa, pb = a._path, b._path
    assert pa and pb
    os.replace(pa, pb)  # b's file now holds a's sealed bytes
    b.seek(0)
    with pytest.raises(InvalidTag):
        b.read()


class _Backend:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], str] = {}

    def put_object(self, bucket: str, key: str, value: str) -> None:
        self.objects[(bucket, key)] = value


def test_access_log_records_are_written_many_to_an_object_and_none_is_lost() -> None:
    backend, batches = _Backend(), AccessLogBatches(seconds=3600, most=100)
    # WHEN 250 records come for one target prefix, and 3 for another
    for i in range(250):
        batches.add(backend, "logs", f"data/2026-12-07-00-00-00-{i:016X}", f"record {i}")
    for i in range(3):
        batches.add(backend, "logs", f"other/x/2026-{i}", f"other {i}")
    # THEN two full batches were written as they filled; the rest waits for its time or a flush
    assert len(backend.objects) == 2
    assert batches.flush(backend) == 2
    lines = [line for v in backend.objects.values() for line in v.splitlines()]
    assert sorted(lines) == sorted([f"record {i}" for i in range(250)] + [f"other {i}" for i in range(3)])
    assert {k[1].rsplit("/", 1)[0] for k in backend.objects} == {"data", "other/x"}
    assert all(b == "logs" for b, _ in backend.objects)


def test_an_access_log_batch_is_written_once_its_time_is_up() -> None:
    backend, batches = _Backend(), AccessLogBatches(seconds=0.0, most=1000)
    batches.add(backend, "logs", "data/a", "one")
    assert list(backend.objects.values()) == ["one\n"]


def test_a_listing_from_the_sorted_names_pages_as_moto_does() -> None:
    import random

    from moto.s3.models import S3Backend, s3_backends

    from s3rollup import local
    from s3rollup.local_iam import ACCOUNT
    from s3rollup.local_objects import index_key_names

    local.untrack_moto_instances()
    index_key_names()
    ours = S3Backend.list_objects_v2
    theirs = ours._s3rollup_moto  # type: ignore[attr-defined]
    backend = s3_backends[ACCOUNT]["aws"]
    name = f"listing-{random.getrandbits(32):08x}"
    backend.create_bucket(name, "us-east-1")
    backend.put_bucket_versioning(name, "Enabled")
    rng = random.Random(7)
    alphabet = ["a", "b", "a/", "b/", "c/d", "!", "~", "é", "0"]
    written: list[str] = []
    # GIVEN keys added, overwritten, deleted (a delete marker) and removed for good
    for _ in range(400):
        key = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
        backend.put_object(name, key, b"x")
        written.append(key)
        roll = rng.random()
        if roll < 0.1:
            backend.delete_object(name, rng.choice(written))
        elif roll < 0.15:
            gone = rng.choice(written)
            for version in list(backend.get_bucket(name).keys.getlist(gone) or []):
                backend.delete_object(name, gone, version_id=version.version_id)
    bucket = backend.get_bucket(name)

    def walk(listing: Any, prefix: str, delimiter: str | None, size: int, start: str | None) -> list[Any]:
        pages, token = [], None
        while True:
            keys, truncated, token = listing(backend, bucket, prefix, delimiter, token, start, size)
            pages.append(([k if isinstance(k, str) else (k.name, k.version_id) for k in keys], truncated))
            start = None
            if not truncated:
                return pages

    # THEN every listing, page by page, is moto's own
    checked = 0
    for prefix in ["", "a", "a/", "b/", "c/", "zz", "é"]:
        for delimiter in [None, "/", "d"]:
            for size in [1, 3, 1000]:
                for start in [None, "a/", "b", "c/d"]:
                    assert walk(ours, prefix, delimiter, size, start) == walk(
                        theirs, prefix, delimiter, size, start
                    ), (prefix, delimiter, size, start)
                    checked += 1
    assert checked == 7 * 3 * 3 * 4


def test_the_directories_of_processes_that_are_gone_are_removed(tmp_path: Any) -> None:
    import subprocess
    import sys

    from s3rollup.local_objects import remove_orphans

    # GIVEN the directory of a process that was killed, one of a live process, and another
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead = tmp_path / f"s3rollup-objects-{int(gone.stdout)}-abc"
    alive = tmp_path / f"s3rollup-objects-{os.getpid()}-def"
    other = tmp_path / "s3rollup-objects-not-a-pid"
    for d in (dead, alive, other):
        d.mkdir()
        (d / "f").write_bytes(b"sealed")
    # WHEN orphans are removed
    removed = remove_orphans(str(tmp_path))
    # THEN only the dead process's directory is gone
    assert removed == [dead.name]
    assert not dead.exists() and alive.exists() and other.exists()
