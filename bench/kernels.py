"""The native kernels alone: sr_keys on one part's columns, four values at a time against
one at a time.

Generates one part in the seed's schema (``s3rollup.demo.generate_part``: ``category`` in
0..999, three standard normal values), then times ``native.rollup_keys`` on its key and
value columns with ``native.use_vector`` on and off, interleaved, in this one process.
Prints the medians, the ratio and whether the CPU has AVX2 (without it both runs are lane
by lane). Checks that both give the same bits.

    .venv/bin/python bench/kernels.py --rows 1000000 --reps 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from s3rollup import native
from s3rollup.demo import generate_part


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the part (default 1,000,000)")
    ap.add_argument("--reps", type=int, default=30, help="timed calls of each (default 30)")
    ap.add_argument("--seed", type=int, default=42, help="data seed, as s3rollup demo (default 42)")
    args = ap.parse_args()
    if native.LIB is None:
        print("librollup.so is not loaded: run make", file=sys.stderr)
        return 1
    part = generate_part(0, args.rows, args.seed)
    keys = part["category"].to_numpy(np.int64)
    values = [part[v].to_numpy(np.float64) for v in ("value1", "value2", "value3")]
    times: dict[bool, list[float]] = {True: [], False: []}
    results = {}
    for _ in range(args.reps):
        for vector in (True, False):
            native.use_vector = vector
            t0 = time.perf_counter()
            results[vector] = native.rollup_keys(keys, values)
            times[vector].append(time.perf_counter() - t0)
    native.use_vector = True
    same = all(
        np.array_equal(getattr(results[True], f), getattr(results[False], f), equal_nan=True)
        for f in ("keys", "rows", "count", "mean", "m2", "min", "max")
    )
    vec, lanes = (statistics.median(times[v]) * 1e3 for v in (True, False))
    print(f"sr_keys, {args.rows:,} rows, {len(np.unique(keys))} groups, 3 values; {args.reps} calls each")
    print(f"AVX2 on this CPU: {native.vector()}")
    print(f"four at a time: median {vec:.2f} ms (min {min(times[True]) * 1e3:.2f})")
    print(f"one at a time:  median {lanes:.2f} ms (min {min(times[False]) * 1e3:.2f})")
    print(f"ratio: {vec / lanes:.2f}x; same bits: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
