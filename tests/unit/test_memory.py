"""memory.configure: the allocator settings the job's process runs with."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from s3rollup import memory

pytestmark = pytest.mark.skipif(not memory.glibc(), reason="the settings are glibc's")

# In a fresh process: configure() or not, then where a 16 MiB block comes from (the heap,
# below the program break, or a mapping of its own above it) and what a child process sees.
_PROBE = """
import ctypes, json, subprocess, sys
from s3rollup import memory
taken = memory.configure() if sys.argv[1] == "configure" else None
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.sbrk.argtypes = [ctypes.c_ssize_t]
block = libc.malloc(16 << 20)
from_heap = block < libc.sbrk(0)
show = "import os; print(os.environ.get('GLIBC_TUNABLES'), os.environ.get('OPENBLAS_NUM_THREADS'))"
child = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, check=True)
print(json.dumps({"taken": taken, "from_heap": from_heap, "child": child.stdout.split()}))
"""


def _probe(mode: str, **env: str) -> dict[str, object]:
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "OPENBLAS_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], env={**base, **env}, capture_output=True, text=True, check=True
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_configure_keeps_large_blocks_in_the_heap_for_reuse() -> None:
    # GIVEN glibc's defaults: a 16 MiB block is a mapping of its own, given back when freed
    assert _probe("defaults")["from_heap"] is False
    # WHEN the process configures its allocator
    got = _probe("configure")
    # THEN glibc took every setting and the block comes from the heap (freed, it stays for
    # the next); a child gets one BLAS thread and no allocator settings of this process's
    assert got["taken"] is True
    assert got["from_heap"] is True
    assert got["child"] == ["None", "1"]


def test_configure_leaves_an_operators_allocator_settings_alone() -> None:
    # GIVEN an operator's own GLIBC_TUNABLES and OPENBLAS_NUM_THREADS
    got = _probe("configure", GLIBC_TUNABLES="glibc.malloc.arena_max=4", OPENBLAS_NUM_THREADS="2")
    # THEN configure changes neither, for the process or its children
    assert got["taken"] is False
    assert got["from_heap"] is False
    assert got["child"] == ["glibc.malloc.arena_max=4", "2"]
