"""Soak: a bounded load of many small parts through the whole embedded stack.

Starts the embedded stack (moto on 127.0.0.1, template.yaml, dispatcher, local workers),
uploads ``--parts`` generated parts spread over ``--datasets`` datasets from ``--threads``
producer threads, at most ``--rate`` parts/s, and watches each dataset's manifest. Prints
throughput (parts/s and rows/s from the first upload until every part is published), the
upload-to-published lag of each part (p50/p95/max: from its PUT until the first manifest
that lists it at that version) and the jobs the datasets needed. Then checks every dataset:
the manifest lists each part once at its version, the audit chain accepted and aggregated
each version once and ran one job at a time, and the result equals pandas (1e-9).
Exit 0 when all holds, 1 otherwise.

    .venv/bin/python bench/soak.py --parts 1000 --datasets 4
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from s3rollup.audit import AuditLog, exactly_once_problems
from s3rollup.cli import read_result
from s3rollup.demo import compare, generate_part, to_csv_bytes, wait_until_idle
from s3rollup.local import EmbeddedStack
from s3rollup.ops import read_manifest
from s3rollup.reference import complex_operation
from s3rollup.state import State


def say(msg: str) -> None:
    """Progress on stderr."""
    print(msg, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def check_dataset(
    stack: EmbeddedStack, dataset: str, parts: dict[str, tuple[str, pd.DataFrame]]
) -> list[str]:
    """What is wrong with one dataset's published result and audit chain (empty: nothing)."""
    assert stack.aws is not None and stack.info is not None
    out = stack.info.outputs
    bucket = out["DataBucketName"]
    # As a user reads it: the manifest, then the exact aggregate version it names, checksummed.
    manifest, result = read_result(stack.aws, bucket, dataset)
    problems = []
    listed = Counter((p["key"], p["version_id"]) for p in manifest["parts"])
    if listed != Counter((k, v) for k, (v, _) in parts.items()):
        problems.append(f"{dataset}: manifest lists {len(listed)} part versions, expected {len(parts)}")
    records = list(AuditLog(stack.aws.dynamodb, out["AuditTableName"]).records(dataset))
    problems += [f"{dataset}: {p}" for p in exactly_once_problems(records)]
    expected = complex_operation(pd.concat([f for _, f in parts.values()], ignore_index=True))
    problems += [f"{dataset}: {p}" for p in compare(result, expected)]
    return problems


def run(args: argparse.Namespace) -> int:
    """The soak run; 0 when every dataset is complete and correct."""
    os.environ.setdefault("S3ROLLUP_LOG_LEVEL", "WARNING")
    datasets = [f"soak-{d}" for d in range(args.datasets)]
    say(f"generating {args.parts} parts x {args.rows} rows over {args.datasets} datasets")
    plan = [
        (datasets[i % args.datasets], f"incoming/{datasets[i % args.datasets]}/p{i:05d}.csv", i)
        for i in range(args.parts)
    ]
    frames = {i: generate_part(i, args.rows, seed=args.seed) for _, _, i in plan}
    bodies = {i: to_csv_bytes(f) for i, f in frames.items()}
    with EmbeddedStack(stack_name="s3rollup-soak", log_level="WARNING") as stack:
        assert stack.aws is not None and stack.info is not None
        s3, out = stack.aws.s3, stack.info.outputs
        bucket, key_arn = out["DataBucketName"], out["DataKeyArn"]
        uploaded: dict[str, tuple[str, float]] = {}  # key -> (version, time of its PUT)
        published: dict[str, float] = {}
        lock = threading.Lock()
        interval = 1.0 / args.rate if args.rate else 0.0
        t0 = time.perf_counter()

        def put(n: int) -> None:
            _, key, i = plan[n]
            if interval:  # a bounded producer rate: part n is sent no earlier than n/rate
                time.sleep(max(0.0, t0 + n * interval - time.perf_counter()))
            resp = s3.put_object(
                Bucket=bucket,
                Key=key,
                Body=bodies[i],
                ServerSideEncryption="aws:kms",
                SSEKMSKeyId=key_arn,
                ChecksumAlgorithm="SHA256",  # as `s3rollup put` uploads
            )
            with lock:
                uploaded[key] = (resp["VersionId"], time.perf_counter())

        say(f"uploading from {args.threads} threads" + (f" at {args.rate} parts/s" if args.rate else ""))
        with ThreadPoolExecutor(args.threads) as pool:
            futures = [pool.submit(put, n) for n in range(len(plan))]
            deadline = t0 + args.timeout
            while len(published) < len(plan) and time.perf_counter() < deadline:
                now = time.perf_counter()
                for ds in datasets:
                    manifest = read_manifest(stack.aws, bucket, ds)
                    if manifest is None:
                        continue
                    with lock:
                        for p in manifest["parts"]:
                            up = uploaded.get(p["key"])
                            if up and up[0] == p["version_id"] and p["key"] not in published:
                                published[p["key"]] = now
                say(f"  {len(uploaded)} uploaded, {len(published)} published, {now - t0:.0f}s")
                time.sleep(args.poll)
            for f in futures:
                f.result()
        t_end = time.perf_counter()
        t_up = max(t for _, t in uploaded.values())
        if len(published) < len(plan):
            print(f"TIMEOUT: {len(published)} of {len(plan)} parts published after {args.timeout}s")
            return 1
        lags = [published[k] - t for k, (_, t) in uploaded.items()]
        wall = max(published.values()) - t0
        log = AuditLog(stack.aws.dynamodb, out["AuditTableName"])
        state = State(stack.aws.dynamodb, out["StateTableName"])
        for ds in datasets:
            wait_until_idle(state, log, ds, timeout=120)
        jobs = {ds: sum(r["event"] == "JOB_STARTED" for r in log.records(ds)) for ds in datasets}
        print(f"parts: {len(plan)} x {args.rows} rows, {args.datasets} datasets, {args.threads} producers")
        print(f"upload: {t_up - t0:.1f}s ({len(plan) / (t_up - t0):.1f} parts/s offered)")
        print(
            f"throughput: {len(plan) / wall:.1f} parts/s, {len(plan) * args.rows / wall:,.0f} rows/s"
            f" (first upload to last part published: {wall:.1f}s)"
        )
        print(
            f"lag upload->published: p50 {percentile(lags, 0.5):.1f}s, p95 {percentile(lags, 0.95):.1f}s,"
            f" max {max(lags):.1f}s; last upload to last published {max(published.values()) - t_up:.1f}s"
        )
        print(f"jobs per dataset: {jobs}; measured until {t_end - t0:.1f}s")
        problems: list[str] = []
        for ds in datasets:
            parts = {k: (uploaded[k][0], frames[i]) for d, k, i in plan if d == ds}
            problems += check_dataset(stack, ds, parts)
        for p in problems:
            print(f"PROBLEM: {p}")
        if not problems:
            print("OK: every part published once at its version, one job at a time, results equal pandas")
        return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", type=int, default=1000)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--datasets", type=int, default=4)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--rate", type=float, default=0.0, help="producer rate limit, parts/s (0: none)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=float, default=1200.0)
    p.add_argument("--poll", type=float, default=1.0)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
