"""Where the embedded endpoint keeps what S3 stores: object bytes in sealed files, access
logs in batches, key names sorted. These keep the endpoint's memory flat and a listing's
cost constant as parts accumulate.

moto keeps every version of every object in a buffer in memory, and writes one access-log
object per request to a logged bucket. A dataset of N parts holds N raw parts and N partials
(with their noncurrent versions), and each part's path makes about seven logged requests: the
endpoint's memory grew by about 90 KB per part, past 2 GiB before 20,000 parts.

- ``seal_object_bytes``: each version's bytes go to a file of their own in a private
  directory (0700, files 0600), sealed with AES-GCM under a key that exists only in this
  process's memory: plaintext personal data never reaches the disk, and the files are
  unreadable once the process is gone (the directory is removed at exit, or by the next
  process's start when it was killed). moto still
  holds each version's metadata; a GET reads and opens the file, which the page cache keeps
  fast.
- ``batch_access_logs``: access-log records are delivered as S3 delivers them, many records
  to an object, at most ``ACCESS_LOG_SECONDS`` late (S3 delivers them "within a few hours",
  best effort: Amazon S3 User Guide, "Server access log delivery").
- ``index_key_names``: a ListObjectsV2 page reads its own keys from a sorted index of each
  bucket's names, not every key of the bucket.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from typing import Any

ACCESS_LOG_SECONDS = 10.0  # the longest a record waits for its batch's object
ACCESS_LOG_RECORDS = 1000  # records per log object at most


_PREFIX = "s3rollup-objects-"


def remove_orphans(parent: str | None = None) -> list[str]:
    """Remove the object directories whose process is gone (killed before its exit could
    remove them; their files were unreadable anyway, the key went with the process).
    Returns the directories removed."""
    parent = parent or tempfile.gettempdir()
    removed = []
    for name in os.listdir(parent):
        pid = name[len(_PREFIX) :].split("-", 1)[0]
        if not name.startswith(_PREFIX) or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(name)
        except PermissionError:  # another user's process: alive, and not ours to touch
            continue
    return removed


class ObjectFiles:
    """The directory of sealed object files, and the key that seals them."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        remove_orphans()
        self.path = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")  # mode 0700
        self._aead = AESGCM(AESGCM.generate_key(bit_length=256))
        atexit.register(self.remove)

    def write(self, data: bytes) -> str:
        """Seal data into a new file; return its path."""
        nonce = secrets.token_bytes(12)
        path = os.path.join(self.path, secrets.token_hex(16))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(nonce + self._aead.encrypt(nonce, data, path.encode()))
        return path

    def read(self, path: str) -> bytes:
        """The bytes sealed in path (the path is authenticated with them)."""
        with open(path, "rb") as f:
            sealed = f.read()
        return self._aead.decrypt(sealed[:12], sealed[12:], path.encode())

    def remove(self) -> None:
        """Remove the directory and every file in it."""
        shutil.rmtree(self.path, ignore_errors=True)


class SealedBuffer:
    """What moto's FakeKey uses as its value buffer (a SpooledTemporaryFile there): the bytes
    in one sealed file, written whole, read from a position."""

    def __init__(self, files: ObjectFiles, *_: Any, **__: Any) -> None:
        self._files = files
        self._path: str | None = None
        self._size = 0
        self._pos = 0
        self._lock = threading.Lock()
        self.closed = False

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else self._size + pos if whence == 2 else self._pos + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        keep = self._pos if size is None else size
        with self._lock:
            self._replace(self._read_all()[:keep] if keep else b"")
        return keep

    def write(self, data: bytes) -> int:
        with self._lock:
            current = self._read_all()
            head = current[: self._pos].ljust(self._pos, b"\0")
            self._replace(head + data + current[self._pos + len(data) :])
        self._pos += len(data)
        return len(data)

    def read(self, n: int = -1) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        if self._pos >= self._size:
            return b""
        with self._lock:
            data = self._read_all()
        out = data[self._pos :] if n is None or n < 0 else data[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def close(self) -> None:
        with self._lock:
            self._replace(b"")
            self.closed = True

    def _read_all(self) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        return self._files.read(self._path) if self._path else b""

    def _replace(self, data: bytes) -> None:
        old, self._path, self._size = self._path, (self._files.write(data) if data else None), len(data)
        if old:
            os.unlink(old)


class _Tempfile:
    """moto.s3.models' ``tempfile`` module, whose SpooledTemporaryFile is a SealedBuffer."""

    def __init__(self, files: ObjectFiles) -> None:
        self._files = files

    def __getattr__(self, name: str) -> Any:
        return getattr(tempfile, name)

    def SpooledTemporaryFile(self, *args: Any, **kwargs: Any) -> SealedBuffer:  # moto's name
        return SealedBuffer(self._files, *args, **kwargs)


FILES: ObjectFiles | None = None  # once seal_object_bytes ran
BATCHES: AccessLogBatches | None = None  # once batch_access_logs ran


def seal_object_bytes() -> ObjectFiles:
    """Make moto keep each S3 object version's bytes in a sealed file (idempotent)."""
    global FILES
    from moto.s3 import models

    if FILES is None:
        FILES = ObjectFiles()
        models.tempfile = _Tempfile(FILES)  # type: ignore[assignment]
    return FILES


class _Captured:
    """Stands in for the S3 backend while moto formats one access-log record: the record is
    kept instead of being written as an object of its own."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.put: tuple[str, str, str] | None = None

    def get_bucket(self, name: str) -> Any:
        return self._backend.get_bucket(name)

    def put_object(self, bucket_name: str, key_name: str, value: str, **_: Any) -> None:
        self.put = (bucket_name, key_name, value)


class AccessLogBatches:
    """Access-log records by (target bucket, prefix), written as one object per batch."""

    def __init__(self, seconds: float = ACCESS_LOG_SECONDS, most: int = ACCESS_LOG_RECORDS) -> None:
        self.seconds, self.most = seconds, most
        self._lines: dict[tuple[str, str], list[str]] = defaultdict(list)
        self._since: float | None = None
        self._lock = threading.Lock()

    def add(self, backend: Any, bucket: str, key: str, line: str) -> None:
        """Keep one record (key: the object name moto chose; its prefix is the target's)."""
        prefix = key[: len(key) - len(key.rsplit("/", 1)[-1])]
        with self._lock:
            self._lines[(bucket, prefix)].append(line)
            if self._since is None:
                self._since = time.monotonic()
            due = (
                time.monotonic() - self._since >= self.seconds
                or len(self._lines[(bucket, prefix)]) >= self.most
            )
        if due:
            self.flush(backend)

    def flush(self, backend: Any) -> int:
        """Write every kept record; return how many objects were written."""
        with self._lock:
            batches, self._lines, self._since = self._lines, defaultdict(list), None
        for (bucket, prefix), lines in batches.items():
            name = time.strftime("%Y-%m-%d-%H-%M-%S-", time.gmtime()) + secrets.token_hex(8).upper()
            backend.put_object(bucket, prefix + name, value="\n".join(lines) + "\n")
        return len(batches)


def batch_access_logs() -> AccessLogBatches:
    """Make moto's S3 deliver access-log records in batches (idempotent)."""
    global BATCHES
    from moto.s3.models import S3Backend

    if BATCHES is not None:
        return BATCHES
    batches = BATCHES = AccessLogBatches()
    original = S3Backend.log_incoming_request

    def log_incoming_request(self: Any, request: Any, bucket_name: str) -> None:
        captured = _Captured(self)
        original(captured, request, bucket_name)  # type: ignore[arg-type]  # formats the record; swallows every error
        if captured.put is not None:
            batches.add(self, *captured.put)

    S3Backend.log_incoming_request = log_incoming_request  # type: ignore[method-assign]
    return batches


# ---- listings ---------------------------------------------------------------------------

_NAMES_LOCK = threading.RLock()


def _names(store: Any) -> list[str]:
    """The store's key names, sorted; built on first use, then kept in step by every write."""
    names: list[str] | None = store.__dict__.get("_s3rollup_names")
    if names is None:
        names = store.__dict__["_s3rollup_names"] = sorted(dict.keys(store))
    return names


def index_key_names() -> None:
    """Make moto's ListObjectsV2 read one page's worth of keys, not the whole bucket.

    moto walks, filters and sorts every key of the bucket for each page (0.4-0.6 s per page
    at 20,000 keys), where S3's listing cost does not grow with the bucket. Here each
    bucket's key store keeps its names sorted as keys are added and removed, and a page is
    read from the first name after its start, prefix, delimiter and page size as moto (and
    S3) define them. Idempotent.
    """
    import bisect

    from moto.s3.models import FakeDeleteMarker, FakeTableStorageBucket, S3Backend
    from moto.s3.utils import _VersionedKeyStore as Store

    if getattr(S3Backend.list_objects_v2, "_s3rollup_indexed", False):
        return
    setitem, setlist, pop = Store.__setitem__, Store.setlist, Store.pop
    original_list = S3Backend.list_objects_v2

    def added(store: Any, key: str) -> None:
        names = store.__dict__.get("_s3rollup_names")
        if names is not None:
            i = bisect.bisect_left(names, key)
            if i == len(names) or names[i] != key:
                names.insert(i, key)

    def store_setitem(self: Any, key: str, value: Any) -> None:
        with _NAMES_LOCK:
            setitem(self, key, value)
            added(self, key)

    def store_setlist(self: Any, key: str, list_: Any) -> None:
        with _NAMES_LOCK:
            setlist(self, key, list_)
            added(self, key)

    def store_pop(self: Any, key: str) -> None:
        with _NAMES_LOCK:
            pop(self, key)
            names = self.__dict__.get("_s3rollup_names")
            if names is not None:
                i = bisect.bisect_left(names, key)
                if i < len(names) and names[i] == key:
                    del names[i]

    def list_objects_v2(
        self: Any,
        bucket: Any,
        prefix: str | None,
        delimiter: str | None,
        continuation_token: str | None,
        start_after: str | None,
        max_keys: int,
    ) -> Any:
        if isinstance(bucket, FakeTableStorageBucket) or not isinstance(bucket.keys, Store):
            return original_list(self, bucket, prefix, delimiter, continuation_token, start_after, max_keys)
        prefix = prefix or ""
        after = (self._pagination_tokens.get(continuation_token) if continuation_token else start_after) or ""
        page: list[Any] = []
        with _NAMES_LOCK:
            names = _names(bucket.keys)
            i = bisect.bisect_left(names, max(prefix, after))
            # One more than the page, so that _truncate_result knows whether it is the last.
            while i < len(names) and len(page) <= max_keys:
                name = names[i]
                i += 1
                if not name.startswith(prefix):
                    break
                rest = name[len(prefix) :]
                if delimiter and delimiter in rest:
                    folder = prefix + rest.split(delimiter)[0] + delimiter
                    if folder > after and (not page or page[-1] != folder):
                        page.append(folder)
                    i = bisect.bisect_left(names, folder + "\U0010ffff", i)  # past its keys
                    continue
                if name <= after:
                    continue
                versions = dict.get(bucket.keys, name)
                if versions and not isinstance(versions[-1], FakeDeleteMarker):
                    page.append(versions[-1])
        return self._truncate_result(page, max_keys)

    list_objects_v2._s3rollup_indexed = True  # type: ignore[attr-defined]
    list_objects_v2._s3rollup_moto = original_list  # type: ignore[attr-defined]
    Store.__setitem__ = store_setitem  # type: ignore[method-assign]
    Store.setlist = store_setlist  # type: ignore[method-assign]
    Store.pop = store_pop  # type: ignore[method-assign]
    S3Backend.list_objects_v2 = list_objects_v2  # type: ignore[method-assign]
