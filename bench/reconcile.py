"""Reconcile at scale: what one pass costs, and how many passes a sweep takes, at N parts.

Starts the embedded stack (moto on 127.0.0.1, template.yaml; no dispatcher, no workers) and,
for each N of ``--parts``, seeds a dataset of N small parts, each registered as the ingest
function registers it (the same object versions and registry items: version, ETag, size,
LastModified; written in-process into the endpoint's moto backends to go fast; no audit
record or job, which reconcile does not read). Then ``--lost`` more parts are uploaded as
a producer uploads them, with no event and no registration (events S3 dropped),
and passes of the scheduled reconcile (``Ingest.reconcile``, the function's settings, grace
0) run until one completes the sweep. Prints, per N: the passes, the most requests of any
pass by API, and the seconds per pass (median and max); checks that every dropped part was
registered and that nothing else was decided.

    .venv/bin/python bench/reconcile.py --parts 1000,5000,20000 --lost 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections import Counter
from typing import Any

from hotkeys import bare_stack  # bench/, next to this script

from s3rollup.aws import Aws
from s3rollup.config import Settings
from s3rollup.demo import generate_part, to_csv_bytes
from s3rollup.ingest import Ingest
from s3rollup.local import EmbeddedStack
from s3rollup.state import PENDING, State


def count_requests(client: Any, counter: Counter[str]) -> None:
    """Count every request a boto3 client makes, by API."""
    service = client.meta.service_model.service_name

    def before(model: Any, **_: Any) -> None:
        counter[f"{service}:{model.name}"] += 1

    client.meta.events.register("before-call", before)


def seed_registered(stack: EmbeddedStack, dataset: str, n: int) -> None:
    """N tiny parts under incoming/<dataset>/, each registered as the ingest function
    registers it. Written into the embedded endpoint's own S3 and DynamoDB in this process
    (the stack runs moto here): the same objects, versions and registry items, without N
    requests through HTTP and IAM."""
    import calendar

    from moto.dynamodb.models import dynamodb_backends
    from moto.s3.models import s3_backends

    assert stack.aws is not None and stack.info is not None
    account = stack.aws.client("sts").get_caller_identity()["Account"]
    s3 = s3_backends[account]["global"]
    db = dynamodb_backends[account][stack.info.region]
    bucket, table = stack.info.outputs["DataBucketName"], stack.info.outputs["StateTableName"]
    state = State(stack.aws.dynamodb, table)
    body = to_csv_bytes(generate_part(0, 3, seed=1))
    for i in range(n):
        key = s3.put_object(bucket, f"incoming/{dataset}/part-{i:07d}.csv", body, disable_notification=True)
        item = state.register_item(
            dataset,
            key.name,
            str(key.version_id),
            key.etag.strip('"'),
            key.size,
            PENDING,
            modified=calendar.timegm(key.last_modified.utctimetuple()),
        )["Put"]["Item"]
        db.put_item(table, item)


def upload_lost(stack: EmbeddedStack, dataset: str, n: int) -> list[str]:
    """N parts uploaded as a producer uploads them, with no event and no registration."""
    assert stack.aws is not None and stack.info is not None
    bucket = stack.info.outputs["DataBucketName"]
    body = to_csv_bytes(generate_part(1, 3, seed=2))
    keys = [f"incoming/{dataset}/part-{i:07d}.csv.lost" for i in range(0, n * 997, 997)]
    for key in keys:
        stack.aws.s3.put_object(Bucket=bucket, Key=key, Body=body)
    return keys


def sweep(stack: EmbeddedStack, dataset: str) -> dict[str, Any]:
    """Passes until one completes the sweep: their requests and seconds."""
    assert stack.aws is not None and stack.info is not None
    settings = Settings.from_env(stack.info.function_env).with_(reconcile_grace_seconds=0)
    counter: Counter[str] = Counter()
    aws = Aws(stack.info.region, stack.info.endpoint_url)
    count_requests(aws.s3, counter)
    count_requests(aws.dynamodb, counter)
    ingest = Ingest(settings, aws.s3, aws.dynamodb, launcher=None)
    passes, decided, seconds = 0, 0, []
    most: Counter[str] = Counter()
    while True:
        counter.clear()
        t0 = time.monotonic()
        done = ingest.reconcile(dataset, "bench:reconcile")
        seconds.append(time.monotonic() - t0)
        passes += 1
        decided += len(done.outcomes)
        if sum(counter.values()) > sum(most.values()):
            most = Counter(counter)
        if not done.next_after:
            return {"passes": passes, "seconds": seconds, "most": most, "decided": decided}


def main(argv: list[str] | None = None) -> int:
    """Seed, sweep and print the table for each N."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="1000,5000,20000", help="N values (comma separated)")
    parser.add_argument("--lost", type=int, default=10, help="parts whose events were dropped")
    args = parser.parse_args(argv)
    rows = []
    with bare_stack("s3rollup-reconcile") as stack:
        assert stack.aws is not None and stack.info is not None
        state = State(stack.aws.dynamodb, stack.info.outputs["StateTableName"])
        for n in (int(x) for x in args.parts.split(",")):
            dataset = f"rec{n}-{uuid.uuid4().hex[:6]}"
            t0 = time.monotonic()
            seed_registered(stack, dataset, n)
            lost = upload_lost(stack, dataset, args.lost)
            print(f"N={n}: seeded in {time.monotonic() - t0:.0f} s", file=sys.stderr)
            result = sweep(stack, dataset)
            missing = [k for k in lost if state.get_part(dataset, k) is None]
            if missing or result["decided"] != args.lost:
                raise SystemExit(
                    f"N={n}: {len(missing)} dropped parts not found, {result['decided']} decided"
                )
            rows.append((n, result))
    print("| N | passes per sweep | most requests in a pass (by API) | s per pass, median | max |")
    print("|---:|---:|---|---:|---:|")
    for n, r in rows:
        apis = ", ".join(f"{k.split(':')[1]} {v}" for k, v in sorted(r["most"].items()))
        print(
            f"| {n:,} | {r['passes']} | {sum(r['most'].values())}: {apis} | "
            f"{statistics.median(r['seconds']):.2f} | {max(r['seconds']):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
