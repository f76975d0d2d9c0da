"""The same parts through the job's own threads and through a task cluster, side by side.

Runs the embedded stack and, per repetition and per mode, the job's own process as the
embedded ECS starts it (its task definition's environment, its task role): once with the
stack's settings (every round on the job's own threads), once as a stack deployed with
DaskThresholdBytes=1 and DaskWorkers=N (every round on a task cluster: a `dask scheduler`
and N `dask worker` processes, each started by RunTask of its task definition). Each run
gets a fresh dataset holding copies of the same parts; every result is checked against
pandas (complex_operation) at 1e-9.

Reported: the cluster's start (RunTask to every task RUNNING, from the job's log), the
job's time (lease to JOB_FINISHED, from its log) and the process's wall time; medians over
the repetitions, both modes alternating in one run. Two shared cores give no speed-up:
this measures the cluster's overhead, and the per-worker throughput of the tasks.

    .venv/bin/python bench/cluster.py --parts 20 --rows 100000 --workers 2 --reps 3
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from s3rollup.config import Settings  # noqa: E402
from s3rollup.demo import compare, generate_part, to_csv_bytes  # noqa: E402
from s3rollup.launch import LocalLauncher  # noqa: E402
from s3rollup.local import EmbeddedStack  # noqa: E402
from s3rollup.ops import read_manifest  # noqa: E402
from s3rollup.reference import complex_operation  # noqa: E402


def run_job(stack: Any, dataset: str, extra: dict[str, str]) -> dict[str, Any]:
    """Run the job for a dataset to its end; its timings, from outside and from its log."""
    with tempfile.TemporaryFile() as out:
        launcher = LocalLauncher(
            Settings.from_env(stack.info.function_env),
            stack.aws.client("ecs"),
            extra_env={"AWS_ENDPOINT_URL": stack.info.endpoint_url, **extra},
            agent=stack.aws,
            output=out,
        )
        started = time.perf_counter()
        launcher.launch(dataset, "bench-" + uuid.uuid4().hex[:8])
        code = launcher.processes[-1].wait(timeout=1800)
        wall = time.perf_counter() - started
        out.seek(0)
        lines = [json.loads(line) for line in out.read().decode().splitlines() if line.startswith("{")]
    if code != 0:
        raise SystemExit(f"job failed ({code}) for {dataset}: {lines[-3:]}")
    by_message = {line.get("message"): line for line in lines}
    finished = by_message["job finished"]
    cluster = by_message.get("dask cluster started")
    return {
        "wall": wall,
        "job": float(finished["seconds"]),
        "cluster_start": float(cluster["seconds"]) if cluster else None,
        "task_seconds": sum(finished["part_seconds"].values()),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the bench; print the report (and write it with --out)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=int, default=20)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, help="write the Markdown report here too")
    args = ap.parse_args(argv)

    frames = [generate_part(i, args.rows, seed=args.seed) for i in range(args.parts)]
    bodies = [to_csv_bytes(f) for f in frames]
    expected = complex_operation(pd.concat(frames, ignore_index=True))
    cluster_env = {
        "S3ROLLUP_FARGATE_THRESHOLD_BYTES": "1",
        "S3ROLLUP_FARGATE_WORKERS": str(args.workers),
        "S3ROLLUP_FARGATE_WORKER_CPU": "1024",  # one Dask thread per worker
        "S3ROLLUP_FARGATE_WORKER_MEM": "2048",
    }
    runs: dict[str, list[dict[str, Any]]] = {"local": [], "cluster": []}
    with EmbeddedStack(port=0, stack_name="s3rollup-bench", dispatch=False, reconcile_every=0) as stack:
        assert stack.info is not None and stack.aws is not None
        bucket, key_arn = stack.info.outputs["DataBucketName"], stack.info.outputs["DataKeyArn"]
        for rep in range(args.reps):
            modes = ("local", "cluster") if rep % 2 == 0 else ("cluster", "local")
            for mode in modes:
                dataset = f"b{mode[0]}{rep}{uuid.uuid4().hex[:8]}"
                for i, body in enumerate(bodies):
                    stack.aws.s3.put_object(
                        Bucket=bucket,
                        Key=f"incoming/{dataset}/p{i:03d}.csv",
                        Body=body,
                        ServerSideEncryption="aws:kms",
                        SSEKMSKeyId=key_arn,
                    )
                result = run_job(stack, dataset, cluster_env if mode == "cluster" else {})
                manifest = read_manifest(stack.aws, bucket, dataset)
                assert manifest is not None and manifest["rows"] == args.parts * args.rows
                parquet = manifest["objects"]["aggregate.parquet"]["key"]
                body = stack.aws.s3.get_object(Bucket=bucket, Key=parquet)["Body"].read()
                published = pd.read_parquet(io.BytesIO(body))
                problems = compare(published, expected)
                if problems:
                    raise SystemExit(f"{mode} result differs from pandas: {problems[:3]}")
                runs[mode].append(result)
                print(f"rep {rep} {mode}: {json.dumps(result)}", file=sys.stderr, flush=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    csv_mb = sum(len(b) for b in bodies) / 1e6
    lines = [
        f"# Task cluster against the job's own threads ({datetime.now(UTC):%Y-%m-%d})",
        "",
        f"{args.parts} parts x {args.rows:,} rows ({csv_mb:.1f} MB of CSV), {args.workers} workers "
        f"(1 thread each) against the job's own threads; medians of {args.reps} runs each, "
        "alternating, in one run of `bench/cluster.py` on the embedded stack (2 shared cores).",
        "",
        "| | job's threads | task cluster | ratio |",
        "|---|---:|---:|---:|",
        f"| cluster start (RunTask to all RUNNING), s | - | {med('cluster', 'cluster_start'):.2f} | |",
        f"| job (lease to JOB_FINISHED), s | {med('local', 'job'):.2f} | {med('cluster', 'job'):.2f} "
        f"| {med('cluster', 'job') / med('local', 'job'):.2f} |",
        f"| process wall time, s | {med('local', 'wall'):.2f} | {med('cluster', 'wall'):.2f} "
        f"| {med('cluster', 'wall') / med('local', 'wall'):.2f} |",
        "| tasks' own time (read + aggregate + encode, summed over parts), s "
        f"| {med('local', 'task_seconds'):.2f} "
        f"| {med('cluster', 'task_seconds'):.2f} | |",
        f"| per-worker throughput (CSV MB per task-second) | - | "
        f"{csv_mb / med('cluster', 'task_seconds'):.1f} | |",
        "",
        "Every result equals pandas (complex_operation) at 1e-9.",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
        record = {"args": {**vars(args), "out": str(args.out)}, "runs": runs}
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
