"""memory.configure: the allocator settings a computing process and its children run with."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from s3rollup import memory

pytestmark = pytest.mark.skipif(not memory.glibc(), reason="the settings are glibc's")

# In a fresh process: configure(), then what a child process it starts sees.
_PROBE = """
import json, os, subprocess, sys
from s3rollup import memory
taken = memory.configure()
show = "import os; print(os.environ.get('GLIBC_TUNABLES'), os.environ.get('OPENBLAS_NUM_THREADS'))"
child = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, check=True)
child = child.stdout.split()
print(json.dumps({"taken": taken, "child": child}))
"""


def _probe(**env: str) -> dict[str, object]:
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "OPENBLAS_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env={**base, **env}, capture_output=True, text=True, check=True
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_configure_sets_the_process_allocator_and_its_childrens() -> None:
    # WHEN a process without allocator settings of its own configures itself
    got = _probe()
    # THEN glibc took every setting, and a child starts with them and with one BLAS thread
    assert got["taken"] is True
    assert got["child"] == [memory.TUNABLES, "1"]
    assert "glibc.malloc.arena_max=1" in memory.TUNABLES


def test_configure_leaves_an_operators_allocator_settings_alone() -> None:
    # GIVEN an operator's own GLIBC_TUNABLES and OPENBLAS_NUM_THREADS
    got = _probe(GLIBC_TUNABLES="glibc.malloc.arena_max=4", OPENBLAS_NUM_THREADS="2")
    # THEN configure changes neither, for the process or its children
    assert got["taken"] is False
    assert got["child"] == ["glibc.malloc.arena_max=4", "2"]
