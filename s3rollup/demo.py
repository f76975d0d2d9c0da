"""`s3rollup demo`: the whole flow on the embedded stack, checked against pandas.

Generates parts in the reference analysis's schema (seeded), uploads them through the S3
API as a producer would (SSE-KMS), waits until the published manifest lists them all,
prints the head of the result and the timings, and compares every aggregate with pandas
running the reference ``complex_operation`` over the same rows (1e-9 relative).
"""

from __future__ import annotations

import io
import os
import sys
import time
from typing import Any

import numpy as np
import pandas as pd

from .aws import Aws

N_CATEGORIES = 1000
RTOL = 1e-9


def generate_part(index: int, rows: int, seed: int) -> pd.DataFrame:
    """One part in the reference schema (id, value1..3, category), reproducible from seed."""
    rng = np.random.default_rng([seed, index])
    return pd.DataFrame(
        {
            "id": np.arange(index * rows, (index + 1) * rows, dtype=np.int64),
            "value1": rng.standard_normal(rows),
            "value2": rng.standard_normal(rows),
            "value3": rng.standard_normal(rows),
            "category": rng.integers(0, N_CATEGORIES, rows),
        }
    )


def to_csv_bytes(frame: pd.DataFrame) -> bytes:
    """CSV bytes whose floats round-trip exactly (shortest repr); NaN as an empty cell."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    buf = io.BytesIO()
    # A plain header, as most producers write it (Arrow quotes header names, and a quoted
    # file is parsed serially); Arrow writes the rows ~8x faster than pandas' to_csv.
    buf.write((",".join(frame.columns) + "\n").encode())
    pacsv.write_csv(
        pa.Table.from_pandas(frame, preserve_index=False), buf, pacsv.WriteOptions(include_header=False)
    )
    return buf.getvalue()


def compare(result: pd.DataFrame, expected: pd.DataFrame, rtol: float = RTOL) -> list[str]:
    """Differences between a published result (flat) and the reference (seed shape)."""
    from .reference import compare_frames
    from .stats import to_reference_shape

    got = to_reference_shape(result.drop(columns=["rows"], errors="ignore"), _contract())
    return compare_frames(got, expected, rtol)


def _contract() -> Any:
    from .contract import DEFAULT_CONTRACT

    return DEFAULT_CONTRACT


def wait_for_manifest(
    aws: Aws,
    bucket: str,
    dataset: str,
    keys: set[str],
    timeout: float,
    label: str = "",
    poll: float = 0.25,
) -> dict[str, Any]:
    """Poll every ``poll`` seconds until the published manifest lists exactly these keys;
    raise TimeoutError.

    With a label, a spinner shows how many of the keys the result holds (on a terminal only).
    """
    from .ops import read_manifest
    from .progress import Waiting

    spinner = Waiting(label) if label else None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            manifest = read_manifest(aws, bucket, dataset)
            listed = {p["key"] for p in manifest["parts"]} if manifest else set()
            if manifest is not None and listed == keys:
                return manifest
            if spinner:
                spinner.tick(f"{len(listed & keys)}/{len(keys)} parts in the result")
            time.sleep(poll)
    finally:
        if spinner:
            spinner.close()
    raise TimeoutError(f"no result listing all {len(keys)} parts after {timeout:.0f}s")


def run(parts: int, rows: int, seed: int, dataset: str, timeout: float, stack_name: str) -> int:
    """Run the demo; 0 when the published result equals pandas, 4 on a mismatch."""
    from .cli import read_result, render
    from .local import EmbeddedStack
    from .progress import Progress
    from .reference import complex_operation

    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    say("starting the embedded stack (moto on 127.0.0.1) from template.yaml ...")
    # The demo prints its own summary; the function's and the worker's logs stay at WARNING.
    os.environ.setdefault("S3ROLLUP_LOG_LEVEL", "WARNING")
    with EmbeddedStack(stack_name=stack_name, log_level=os.environ["S3ROLLUP_LOG_LEVEL"]) as stack:
        assert stack.info is not None and stack.aws is not None
        aws, info = stack.aws, stack.info
        bucket, key_arn = info.outputs["DataBucketName"], info.outputs["DataKeyArn"]
        t_stack = time.perf_counter()
        say(info.provision_note())
        say(f"stack ready in {t_stack - t0:.1f}s at {info.endpoint_url}")
        say(f"generating {parts} parts x {rows:,} rows")
        generating = Progress("generate", parts, unit="parts")
        frames = []
        for i in range(parts):
            frames.append(generate_part(i, rows, seed))
            generating.add(1)
        generating.close()
        # A NaN cell, as real data has: the statistics must skip it as pandas does.
        if rows:
            frames[0].loc[0, "value2"] = np.nan
        keys = set()
        t_up = time.perf_counter()
        bodies = [to_csv_bytes(frame) for frame in frames]
        uploading = Progress("upload", sum(len(b) for b in bodies))
        for i, body in enumerate(bodies):
            key = f"incoming/{dataset}/part-{i:05d}.csv"
            aws.s3.put_object(
                Bucket=bucket,
                Key=key,
                Body=body,
                ServerSideEncryption="aws:kms",
                SSEKMSKeyId=key_arn,
                ChecksumAlgorithm="SHA256",  # as `s3rollup put` uploads (ops.upload)
            )
            uploading.add(len(body))
            keys.add(key)
        uploading.close()
        t_uploaded = time.perf_counter()
        say(f"uploaded in {t_uploaded - t_up:.1f}s; waiting for the result ...")
        manifest = wait_for_manifest(aws, bucket, dataset, keys, timeout, label="waiting for the result")
        t_result = time.perf_counter()
        _, result = read_result(aws, bucket, dataset)

        t_pd = time.perf_counter()
        expected = complex_operation(pd.concat(frames, ignore_index=True))
        t_pd_done = time.perf_counter()
        problems = compare(result, expected)

        print(render(result.head(10), "table"))
        print()
        print(f"groups: {len(result)}   parts: {len(manifest['parts'])}   rows: {manifest['rows']:,}")
        print(
            f"stack start {t_stack - t0:.2f}s | upload {t_uploaded - t_up:.2f}s | "
            f"upload-to-result {t_result - t_uploaded:.2f}s | pandas reference {t_pd_done - t_pd:.2f}s"
        )
        if problems:
            print("MISMATCH against pandas complex_operation:")
            for p in problems:
                print(f"  - {p}")
            return 4
        print(f"OK: every aggregate equals pandas complex_operation (rtol {RTOL:g}), NaNs included")
        count, problem = _verify_audit(aws, info.outputs, dataset)
        if problem:
            print(f"AUDIT CHAIN NOT INTACT: {problem}")
            return 7
        print(f"OK: audit chain intact ({count} records, every result checksum matches)")
    return 0


def wait_until_idle(state: Any, log: Any, dataset: str, timeout: float = 60) -> bool:
    """Wait until no job holds the dataset and the chain's last record ends a job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state.lease(dataset) is None:
            last = log.last(dataset)
            if last is not None and last["event"] in ("JOB_FINISHED", "JOB_FAILED"):
                return True
        time.sleep(0.2)
    return False


def _verify_audit(aws: Aws, outputs: dict[str, str], dataset: str) -> tuple[int, str]:
    """Verify the dataset's audit trail once its job has finished (lease given back)."""
    from .audit import AuditLog, verify_dataset
    from .state import State

    log = AuditLog(aws.dynamodb, outputs["AuditTableName"])
    wait_until_idle(State(aws.dynamodb, outputs["StateTableName"]), log, dataset)
    count, _, problem = verify_dataset(
        log, aws.s3, outputs["DataBucketName"], outputs["AuditAnchorBucketName"], dataset
    )
    return count, (f"record {problem.seq}: {problem.code}: {problem.message}" if problem else "")
