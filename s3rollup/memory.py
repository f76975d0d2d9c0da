"""How the job's process takes its memory.

A job is a fresh process: memory it touches for the first time costs it a page fault each
4 KiB (about 2 us on Fargate's and this machine's Firecracker VMs), and memory it gives back
to the system and takes again costs that once more. With glibc's defaults a round's
threads did exactly that for every part: each thread's arena grew 64 MiB heaps for a
part's large blocks (its moments, its partial's bytes) and deleted them when the part was
done (on 20 parts of 100,000 groups: about 200,000 faults and 0.8-1.4 s of system time).

``configure()``, called first thing in the job's process, sets glibc's allocator so freed
blocks are reused instead: one arena (the round's threads allocate a few large blocks per
part; their small objects come from Python's and Arrow's own allocators), blocks up to
32 MiB from it rather than from mmap, and up to 1 GiB of free memory kept rather than
trimmed: a job ends when its rounds do. Where GLIBC_TUNABLES is set (an operator's
choice), or elsewhere than glibc, it leaves the allocator alone. It sets this process's
allocator only (mallopt), not its children's.

A Dask worker keeps Dask's own policy: its nanny starts it with MALLOC_TRIM_THRESHOLD_ set
low, so that memory freed goes back to the system, which the worker's memory limits count
on; the job's settings would work against them.

It also asks OpenBLAS for one thread (as Dask's nanny does for its workers): s3rollup
computes no linear algebra, and NumPy's OpenBLAS otherwise starts a thread per CPU at
import that spins on a CPU the import needs (about 20 ms of a job's start here).
"""

from __future__ import annotations

import ctypes
import os

# mallopt's parameters (glibc's malloc.h) and the values set.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
ARENAS = 1
MMAP_THRESHOLD = 32 << 20  # glibc's largest
TRIM_THRESHOLD = 1 << 30


def glibc() -> bool:
    """Whether this process runs on glibc (whose allocator configure() sets)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):
        return False


def configure() -> bool:
    """Set this process's allocator (see the module); before NumPy is imported and before
    threads start. True when glibc took every setting."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if "GLIBC_TUNABLES" in os.environ or not glibc():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Each is tried whatever the others did.
    taken = [
        mallopt(_M_ARENA_MAX, ARENAS),
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ]
    return taken == [1, 1, 1]
