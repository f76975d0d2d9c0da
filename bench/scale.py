"""Scale: what one more part costs as a dataset grows, on the embedded stack.

Starts the embedded stack (moto on 127.0.0.1, template.yaml, dispatcher, RunTask'd worker
processes; periodic reconcile off: the reconcile measure calls it), grows one dataset of
``--rows``-row parts (the demo's schema) to each N of ``--n`` and measures there:

- ``plus1``: one more part, from the producer's upload to the manifest naming it at its
  version, through the whole path (S3 notification, queue, dispatcher and handler, RunTask,
  the job's process, publish); ``--reps`` times, each right after a +1 on a control dataset
  that stays at ``--control-n`` parts, so that the machine's load weighs on both alike; and
  the requests each +1 made at the endpoint, by API, of the job (worker task role) and of the
  function (execution role);
- at every N, peak RSS of this process (the endpoint, dispatcher and handler; the seeding's
  in-process ingest too) and of the job processes, over each N's stage;
- ``delete``: at N = ``--delete-n``, a part deleted (and its event delivered, as S3 sends
  it: moto sends none): seconds until the manifest no longer names it; ``--reps`` times,
  each followed by a +1 on the same dataset, timed side by side;
- ``reconcile``: at N = ``--reconcile-n``, ``--dropped`` parts uploaded with no event, then
  scheduled reconcile passes (``Ingest.reconcile_all``, as the function runs it) until the
  registry has them all: seconds and requests per pass, passes needed;
- ``bulk``: afterwards, ``--bulk-parts`` parts uploaded into a fresh dataset by
  ``--threads`` producer threads: parts/s, upload-to-published lag p50/p95, every part
  published once at its version (the audit's exactly-once check), result equal to pandas.

Seeding calls the real code in-process to go fast: parts are uploaded as the producer with
their notifications off, each is decided by ``Ingest.sync`` (what the handler calls, with
the execution role's clients; no job launched), and then one job per ``--seed-batch`` parts
runs as the RunTask'd worker process does. Registry, audit records and partials are those
of the real path. Seeding 20,000 parts takes long: progress goes to stderr.

    make scale ARGS="--n 50,1000 --only plus1,rss"
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import psutil  # noqa: E402
from soak import check_dataset, percentile, say  # noqa: E402

from s3rollup import local, local_iam  # noqa: E402
from s3rollup.audit import AuditLog  # noqa: E402
from s3rollup.config import Settings  # noqa: E402
from s3rollup.contract import parse_part_key  # noqa: E402
from s3rollup.demo import generate_part, to_csv_bytes, wait_until_idle  # noqa: E402
from s3rollup.ingest import Ingest  # noqa: E402
from s3rollup.local import LIFECYCLE_DAY_SECONDS, EmbeddedStack, component_role  # noqa: E402
from s3rollup.ops import read_manifest, trigger_ingest  # noqa: E402
from s3rollup.state import State  # noqa: E402
from tests.helpers import silent  # noqa: E402

MEASURES = ("plus1", "delete", "reconcile", "bulk")  # peak RSS is reported at every N
DEFAULT_N = (50, 1000, 5000, 20000)


def published_version(aws: Any, bucket: str, dataset: str, key: str) -> str | None:
    """The version of key the dataset's published manifest names, or None: the one place the
    bench asks whether a part is published."""
    from s3rollup.manifest import Objects, lookup

    root = read_manifest(aws, bucket, dataset, parts=False)
    if root is None:
        return None
    if "tree" not in root:  # a manifest of the previous format lists its parts itself
        return next((str(p["version_id"]) for p in root["parts"] if p["key"] == key), None)
    entry = lookup(Objects(aws.s3, bucket), root["tree"], key)
    return None if entry is None else str(entry["version_id"])


def published_parts(aws: Any, bucket: str, dataset: str) -> dict[str, str]:
    """Every part the published manifest names, key -> version (for the bulk load)."""
    manifest = read_manifest(aws, bucket, dataset)
    return {p["key"]: p["version_id"] for p in (manifest or {}).get("parts", [])}


class Rss:
    """Samples the RSS of this process and of its children (the job processes)."""

    def __init__(self, every: float = 0.2) -> None:
        self.me = psutil.Process()
        self.every = every
        self.peak_self = self.peak_jobs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> None:
        """One sample: this process, and the sum over its live children."""
        jobs = 0
        for child in self.me.children(recursive=True):
            try:
                jobs += child.memory_info().rss
            except psutil.Error:
                continue
        self.peak_self = max(self.peak_self, self.me.memory_info().rss)
        self.peak_jobs = max(self.peak_jobs, jobs)

    def reset(self) -> tuple[int, int, int]:
        """(peak of this process, peak of the job processes, this process now), since the
        last reset; starts a new window."""
        self.sample()
        out = (self.peak_self, self.peak_jobs, self.me.memory_info().rss)
        self.peak_self = self.peak_jobs = 0
        return out

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()


Counts = dict[str, dict[tuple[str, str], int]]


def counts() -> Counts:
    """The endpoint's counts so far: requests and bytes, by (principal, API)."""
    return {"requests": local_iam.requests(), "bytes": local_iam.transferred()}


def requests_since(before: Counts, label: str, what: str = "requests") -> dict[str, int]:
    """Requests (or their bytes) at the endpoint since ``before`` from one principal, by API."""
    now, then = counts()[what], before[what]
    out = {api: n - then.get((who, api), 0) for (who, api), n in now.items() if who == label}
    return {api: n for api, n in sorted(out.items()) if n > 0}


def wait(predicate: Callable[[], bool], timeout: float, poll: float, what: str) -> float:
    """Poll until predicate holds; return when it did (perf_counter); raise on timeout."""
    deadline = time.perf_counter() + timeout
    while True:
        now = time.perf_counter()
        if predicate():
            return now
        if now > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(poll)


@dataclass
class Grown:
    """A dataset the bench grows: its name, parts in it, the index of its next part."""

    name: str
    count: int = 0
    next_index: int = 0


class Bench:
    """One embedded stack, one growing dataset, and what is measured on them."""

    def __init__(self, stack: EmbeddedStack, args: argparse.Namespace) -> None:
        assert stack.aws and stack.info and stack.dispatcher and stack.tasks
        self.stack, self.args = stack, args
        out = stack.info.outputs
        self.out, self.bucket, self.key_arn = out, out["DataBucketName"], out["DataKeyArn"]
        self.aws = stack.aws  # the operator: reads, deletes
        self.producer = stack.aws_as(stack.info.persona_roles["producer"])
        self.function = stack.dispatcher.app.service()  # the handler's Ingest (its launcher too)
        self.seeder = Ingest(
            Settings.from_env(stack.dispatcher.env),
            stack.dispatcher.function_aws.s3,
            stack.dispatcher.function_aws.dynamodb,
            launcher=None,
        )
        self.state = State(self.aws.dynamodb, out["StateTableName"])
        self.audit = AuditLog(self.aws.dynamodb, out["AuditTableName"])
        self.launcher = stack.tasks.launcher
        self.worker = "role/" + component_role(self.aws, stack.info.stack_name, "worker").rsplit("/", 1)[1]
        self.fn_role = "role/" + stack.info.function_role_arn.rsplit("/", 1)[1]
        self.grown = Grown("scale")  # the dataset grown to each N
        self.control = Grown("scale-control")  # stays at --control-n parts, measured alongside
        self.rss = Rss()
        self.results: dict[str, Any] = {"plus1": {}, "rss": {}, "delete": {}, "reconcile": {}, "bulk": {}}

    # ---- parts -------------------------------------------------------------------------------

    def part(self, dataset: str, i: int) -> tuple[str, bytes, pd.DataFrame]:
        """Part i of a dataset: its key, CSV body and frame."""
        frame = generate_part(i, self.args.rows, seed=self.args.seed)
        return f"incoming/{dataset}/p{i:06d}.csv", to_csv_bytes(frame), frame

    def put(self, key: str, body: bytes) -> str:
        """Upload as the producer does (SSE-KMS under the stack's key, SHA-256 checksum)."""
        resp = self.producer.s3.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=body,
            ServerSideEncryption="aws:kms",
            SSEKMSKeyId=self.key_arn,
            ChecksumAlgorithm="SHA256",
        )
        return str(resp["VersionId"])

    def published_at(self, key: str, version: str | None, dataset: str = "") -> Callable[[], bool]:
        """Whether the dataset's manifest names key at version (None: does not name it)."""
        dataset = dataset or self.grown.name
        return lambda: published_version(self.aws, self.bucket, dataset, key) == version

    def jobs_done(self) -> bool:
        """No job process is running, and the dataset's chain ends a job with no lease held."""
        return all(p.poll() is not None for p in list(self.launcher.processes))

    def idle(self, dataset: str) -> None:
        """Wait until the dataset's jobs have finished (their processes too)."""
        if not wait_until_idle(self.state, self.audit, dataset, timeout=self.args.timeout):
            raise TimeoutError(f"{dataset}: a job still runs after {self.args.timeout:.0f}s")
        wait(self.jobs_done, self.args.timeout, 0.1, "job processes")

    # ---- seeding -----------------------------------------------------------------------------

    def seed(self, target: int, ds: Grown | None = None) -> None:
        """Grow a dataset (the grown one by default) to target parts through the real ingest
        and job code."""
        ds = ds or self.grown
        started = time.perf_counter()
        while ds.count < target:
            batch = range(ds.next_index, ds.next_index + min(self.args.seed_batch, target - ds.count))
            parts = [self.part(ds.name, i)[:2] for i in batch]
            with silent(self.stack), ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda kb: self.put(*kb), parts))
            # A few deciders at once, as concurrent function invocations: each decision appends to
            # the dataset's audit chain, whose head is one item (more threads only retry more).
            with ThreadPoolExecutor(self.args.seed_threads) as pool:
                outcomes = list(
                    pool.map(lambda kb: self.seeder.sync(parse_part_key(kb[0]), "bench:seed"), parts)
                )
            accepted = sum(o.decision == "ACCEPTED" for o in outcomes)
            if accepted != len(parts):
                raise RuntimeError(f"seeding: {accepted} of {len(parts)} parts accepted: {outcomes[:3]}")
            self.launcher.launch(ds.name, f"seed-{uuid.uuid4().hex}")
            self.idle(ds.name)
            ds.next_index += len(parts)
            ds.count += len(parts)
            published = len(published_parts(self.aws, self.bucket, ds.name))
            if published != ds.count:
                raise RuntimeError(f"seeding: {published} parts published, {ds.count} expected")
            say(f"  seeded {ds.name} {ds.count}/{target} parts ({time.perf_counter() - started:.0f}s)")

    # ---- measures ----------------------------------------------------------------------------

    def plus1(self, n: int) -> None:
        """One more part, upload to published, --reps times; each run right after one on the
        control dataset (--control-n parts), so the two are timed side by side."""
        runs: list[float] = []
        control: list[float] = []
        job_reqs: list[dict[str, int]] = []
        fn_reqs: list[dict[str, int]] = []
        job_bytes: list[dict[str, int]] = []
        for rep in range(self.args.reps):
            if self.control.count:
                control.append(self.one_more(self.control)[0])
            seconds, before = self.one_more(self.grown)
            runs.append(seconds)
            job_reqs.append(requests_since(before, self.worker))
            fn_reqs.append(requests_since(before, self.fn_role))
            job_bytes.append(requests_since(before, self.worker, "bytes"))
            side = f", control {control[-1]:.2f}s" if control else ""
            say(f"  +1 at N={self.grown.count - 1}: {runs[-1]:.2f}s{side} ({rep + 1}/{self.args.reps})")
        self.results["plus1"][n] = {
            "seconds": runs,
            "control_seconds": control,
            "control_n": self.control.count - len(control),
            "job": job_reqs,
            "function": fn_reqs,
            "job_bytes": job_bytes,
        }

    def one_more(self, ds: Grown) -> tuple[float, Counts]:
        """One more part into ds, upload to published: (seconds, the counts before it)."""
        key, body, _ = self.part(ds.name, ds.next_index)
        before = counts()
        t0 = time.perf_counter()
        version = self.put(key, body)
        t1 = wait(
            self.published_at(key, version, ds.name),
            self.args.timeout,
            self.args.poll,
            f"+1 at N={ds.count} ({ds.name})",
        )
        self.idle(ds.name)
        ds.next_index += 1
        ds.count += 1
        return t1 - t0, before

    def delete(self, n: int) -> None:
        """A part deleted, its event delivered: seconds until published without it; --reps
        times (parts 0, 1, ...), each followed by a +1 on the same dataset, so the two are
        timed side by side."""
        runs: list[float] = []
        plus1: list[float] = []
        jobs: list[dict[str, int]] = []
        functions: list[dict[str, int]] = []
        for rep in range(self.args.reps):
            key = self.part(self.grown.name, rep)[0]
            if published_version(self.aws, self.bucket, self.grown.name, key) is None:
                raise RuntimeError(f"delete: {key} is not published")
            before = counts()
            t0 = time.perf_counter()
            self.aws.s3.delete_object(Bucket=self.bucket, Key=key)
            # moto sends no delete notifications: send the queue the one S3 would.
            trigger_ingest(self.aws, self.out["IngestQueueUrl"], self.bucket, key)
            t1 = wait(
                self.published_at(key, None),
                self.args.timeout,
                self.args.poll,
                f"delete at N={self.grown.count}",
            )
            self.idle(self.grown.name)
            runs.append(t1 - t0)
            jobs.append(requests_since(before, self.worker))
            functions.append(requests_since(before, self.fn_role))
            say(f"  delete at N={self.grown.count}: {runs[-1]:.2f}s")
            self.grown.count -= 1
            plus1.append(self.one_more(self.grown)[0])
            say(f"  then +1 at N={self.grown.count - 1}: {plus1[-1]:.2f}s")
        self.results["delete"][n] = {
            "seconds": runs,
            "plus1_seconds": plus1,
            "job": jobs,
            "function": functions,
        }

    def reconcile(self, n: int) -> None:
        """Parts whose events were dropped, found by scheduled reconcile passes."""
        dropped = {}
        with silent(self.stack):
            for _ in range(self.args.dropped):
                key, body, _ = self.part(self.grown.name, self.grown.next_index)
                dropped[key] = self.put(key, body)
                self.grown.next_index += 1

        def found() -> int:
            parts = (self.state.get_part(self.grown.name, k) for k in dropped)
            return sum(p is not None and p.version_id == dropped[p.key] for p in parts)

        passes: list[dict[str, Any]] = []
        while found() < len(dropped) and len(passes) < self.args.max_passes:
            before = counts()
            t0 = time.perf_counter()
            failed = self.function.reconcile_all(actor="bench:reconcile", start=len(passes))
            seconds = time.perf_counter() - t0
            passes.append(
                {
                    "seconds": seconds,
                    "requests": requests_since(before, self.fn_role),
                    "found": found(),
                    "failed": failed,
                }
            )
            say(f"  reconcile pass {len(passes)} at N={self.grown.count}: {seconds:.2f}s, {found()} found")
        for key, version in dropped.items():
            wait(
                self.published_at(key, version), self.args.timeout, self.args.poll, "dropped parts published"
            )
        self.idle(self.grown.name)
        self.grown.count += len(dropped)
        self.results["reconcile"][n] = {
            "passes": passes,
            "dropped": len(dropped),
            "all_found": found() == len(dropped),
        }

    def bulk(self) -> None:
        """--bulk-parts parts by --threads producers into a fresh dataset, through the whole path."""
        dataset, n = "scale-bulk", self.args.bulk_parts
        plan = [self.part(dataset, i) for i in range(n)]
        uploaded: dict[str, tuple[str, float]] = {}
        seen: dict[str, float] = {}
        lock = threading.Lock()

        def put(i: int) -> None:
            key, body, _ = plan[i]
            version = self.put(key, body)
            with lock:
                uploaded[key] = (version, time.perf_counter())

        before = counts()
        t0 = time.perf_counter()
        timed_out, said = False, 0.0
        with ThreadPoolExecutor(self.args.threads) as pool:
            futures = [pool.submit(put, i) for i in range(n)]
            while len(seen) < n:
                now = time.perf_counter()
                if now - t0 > self.args.bulk_timeout:
                    timed_out = True
                    break
                listed = published_parts(self.aws, self.bucket, dataset)
                with lock:
                    for key, version in listed.items():
                        if key not in seen and uploaded.get(key, ("", 0.0))[0] == version:
                            seen[key] = now
                if now - said > 10:
                    say(f"  bulk: {len(uploaded)} uploaded, {len(seen)} published, {now - t0:.0f}s")
                    said = now
                time.sleep(max(self.args.poll, 0.5))  # the whole manifest is read each time
            for f in futures:
                f.result()
        wall = (max(seen.values()) if seen else time.perf_counter()) - t0
        lags = [seen[k] - t for k, (_, t) in uploaded.items() if k in seen]
        result: dict[str, Any] = {
            "parts": n,
            "threads": self.args.threads,
            "published": len(seen),
            "timed_out": timed_out,
            "seconds": wall,
            "parts_per_s": len(seen) / wall if wall else 0.0,
            "lag_p50": percentile(lags, 0.5) if lags else None,
            "lag_p95": percentile(lags, 0.95) if lags else None,
            "lag_max": max(lags) if lags else None,
        }
        if not timed_out:
            self.idle(dataset)
            jobs = sum(r["event"] == "JOB_STARTED" for r in self.audit.records(dataset))
            parts = {key: (uploaded[key][0], frame) for key, _, frame in plan}
            result.update(jobs=jobs, problems=check_dataset(self.stack, dataset, parts))
            result["function"] = requests_since(before, self.fn_role)
            result["job"] = requests_since(before, self.worker)
        self.results["bulk"] = result

    # ---- the run -----------------------------------------------------------------------------

    def run(self) -> None:
        """Every selected measure at every N, then the bulk load."""
        only, ns = self.args.only, self.args.n
        stops = set(ns)
        if "delete" in only:
            stops.add(self.args.delete_n)
        if "reconcile" in only:
            stops.add(self.args.reconcile_n)
        self.rss.reset()
        if "plus1" in only and self.args.control_n:
            say(f"control: seeding {self.args.control_n} parts")
            self.seed(self.args.control_n, self.control)
        for n in sorted(stops):
            say(f"N={n}: seeding")
            self.seed(n)
            if "plus1" in only and n in ns:
                self.plus1(n)
            if "delete" in only and n == self.args.delete_n:
                self.delete(n)
            if "reconcile" in only and n == self.args.reconcile_n:
                self.reconcile(n)
            peak_self, peak_jobs, now = self.rss.reset()
            self.results["rss"][n] = {"stack_peak": peak_self, "jobs_peak": peak_jobs, "stack_now": now}
            say(f"N={n}: stack RSS peak {peak_self / 2**20:.0f} MiB, jobs peak {peak_jobs / 2**20:.0f} MiB")
            if self.args.tracemalloc:
                top(self.results, n)
        if "bulk" in only:
            say(f"bulk: {self.args.bulk_parts} parts from {self.args.threads} threads")
            self.bulk()
        self.rss.stop()


def top(results: dict[str, Any], n: int, limit: int = 15) -> None:
    """The largest live allocations of this process by line (with --tracemalloc)."""
    import tracemalloc

    stats = tracemalloc.take_snapshot().statistics("lineno")[:limit]
    results.setdefault("tracemalloc", {})[n] = [
        f"{s.size / 2**20:.1f} MiB {s.count} {s.traceback}" for s in stats
    ]


# ---- the report ------------------------------------------------------------------------------


def _median_requests(runs: list[dict[str, int]]) -> dict[str, float]:
    apis = sorted({api for r in runs for api in r})
    return {api: statistics.median(r.get(api, 0) for r in runs) for api in apis}


def _by_api_table(title: str, columns: dict[str, dict[str, float]]) -> list[str]:
    apis = sorted({api for c in columns.values() for api in c})
    lines = [f"| {title} | " + " | ".join(columns) + " |"]
    lines.append("|---|" + "---:|" * len(columns))
    for api in apis:
        lines.append(f"| `{api}` | " + " | ".join(_num(c.get(api, 0)) for c in columns.values()) + " |")
    lines.append(
        "| **total** | " + " | ".join(f"**{_num(sum(c.values()))}**" for c in columns.values()) + " |"
    )
    return lines


def _num(x: float) -> str:
    return f"{x:,.0f}" if x == int(x) else f"{x:,.1f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def report(results: dict[str, Any], args: argparse.Namespace, commit: str) -> list[str]:
    """The results as Markdown."""
    lines = [
        f"# Scale on the embedded stack ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {commit})",
        "",
        f"`bench/scale.py {' '.join(args.argv)}`: one dataset of {args.rows}-row parts (the demo's "
        f"schema, seed {args.seed}); {args.reps} runs per N; {os.cpu_count()} CPUs (shared); load average "
        f"{results['load'][0]:.1f} at the start, {results['load'][1]:.1f} at the end.",
        "",
    ]
    plus1 = results["plus1"]
    if plus1:
        lines += ["## +1 part, upload to published manifest", ""]
        control_n = next(iter(plus1.values())).get("control_n")
        if control_n:
            lines += [
                f"Each run is timed right after a +1 on a control dataset of {control_n} parts (and the "
                "few added since), in the same stack: `x control` is the ratio of the medians of "
                "those side-by-side runs.",
                "",
            ]
        lines += [
            "| parts already in the dataset | runs (s) | median (s) | x median at the first N "
            "| control runs (s) | control median (s) | x control |"
        ]
        lines += ["|---:|---|---:|---:|---|---:|---:|"]
        first = statistics.median(next(iter(plus1.values()))["seconds"])
        for n, r in plus1.items():
            med = statistics.median(r["seconds"])
            runs = ", ".join(f"{s:.2f}" for s in r["seconds"])
            ctl = r.get("control_seconds") or []
            side = "| | |"
            if ctl:
                cmed = statistics.median(ctl)
                side = f"{', '.join(f'{s:.2f}' for s in ctl)} | {cmed:.2f} | {med / cmed:.2f} |"
            lines.append(f"| {n:,} | {runs} | {med:.2f} | {med / first:.2f} | {side}")
        lines += [
            "",
            "Requests per +1 at the endpoint (median over the runs), the job (worker task role):",
            "",
        ]
        lines += _by_api_table("job: API", {f"N={n:,}": _median_requests(r["job"]) for n, r in plus1.items()})
        lines += ["", "Bytes per +1 job (request and response bodies, median over the runs):", ""]
        lines += _by_api_table(
            "job: API (bytes)", {f"N={n:,}": _median_requests(r["job_bytes"]) for n, r in plus1.items()}
        )
        lines += [
            "",
            "... and the ingest function (execution role: handler, RunTask, the dispatcher's polls):",
            "",
        ]
        lines += _by_api_table(
            "function: API", {f"N={n:,}": _median_requests(r["function"]) for n, r in plus1.items()}
        )
        lines.append("")
    if results["rss"]:
        lines += ["## Peak RSS per N (over seeding and the measures at that N)", ""]
        lines += [
            "| N | endpoint process (peak) | endpoint process (at the end) | job processes (peak, summed) |"
        ]
        lines += ["|---:|---:|---:|---:|"]
        for n, r in results["rss"].items():
            lines.append(
                f"| {n:,} | {_mib(r['stack_peak'])} | {_mib(r['stack_now'])} | {_mib(r['jobs_peak'])} |"
            )
        lines.append("")
    for n, r in results["delete"].items():
        runs, plus1 = r["seconds"], r["plus1_seconds"]
        med, p1 = statistics.median(runs), statistics.median(plus1)
        lines += [
            f"## One part deleted at N = {n:,}",
            "",
            "Each delete is followed by a +1 on the same dataset; seconds until published without "
            "the part, and with the new one:",
            "",
            "| | runs (s) | median (s) |",
            "|---|---|---:|",
            f"| delete | {', '.join(f'{s:.2f}' for s in runs)} | {med:.2f} |",
            f"| +1 | {', '.join(f'{s:.2f}' for s in plus1)} | {p1:.2f} |",
            "",
            f"Delete / +1: **{med / p1:.2f}x**.",
            "",
            "Requests per delete (median over the runs):",
            "",
        ]
        lines += _by_api_table(
            "requests: API", {"job": _median_requests(r["job"]), "function": _median_requests(r["function"])}
        )
        lines.append("")
    for n, r in results["reconcile"].items():
        found = "all found" if r["all_found"] else "NOT all found"
        lines += [f"## Scheduled reconcile at N = {n:,}, {r['dropped']} events dropped", ""]
        passes = f"{len(r['passes'])} pass" + ("" if len(r["passes"]) == 1 else "es")
        lines += [
            f"{passes}, {found}.",
            "",
            "| pass | seconds | found | requests (function) |",
        ]
        lines += ["|---:|---:|---:|---|"]
        for i, p in enumerate(r["passes"], 1):
            reqs = ", ".join(f"{api} {k}" for api, k in p["requests"].items())
            lines.append(
                f"| {i} | {p['seconds']:.2f} | {p['found']} | {reqs} (total {sum(p['requests'].values())}) |"
            )
        lines.append("")
    bulk = results["bulk"]
    if bulk:
        lines += [f"## {bulk['parts']:,} parts uploaded by {bulk['threads']} threads", ""]
        if bulk["timed_out"]:
            lines.append(f"TIMED OUT after {bulk['seconds']:.0f} s: {bulk['published']} published.")
        lag = "no part published"
        if bulk["lag_p50"] is not None:
            lag = f"lag upload->published p50 {bulk['lag_p50']:.1f} s, p95 {bulk['lag_p95']:.1f} s"
            lag += f", max {bulk['lag_max']:.1f} s"
        lines.append(
            f"{bulk['parts_per_s']:.2f} parts/s ({bulk['published']} in {bulk['seconds']:.0f} s); {lag}."
        )
        if "problems" in bulk:
            verdict = "; ".join(bulk["problems"]) or (
                "every part published once at its version (audit exactly-once), result equal to pandas (1e-9)"
            )
            lines += ["", f"Jobs: {bulk['jobs']}. Check: {verdict}."]
        lines.append("")
    return lines


def _commit() -> str:
    import subprocess

    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def _out_path(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    base = ROOT / "bench" / "results" / f"{datetime.now(UTC):%Y-%m-%d}-scale"
    path, i = base.with_suffix(".md"), 2
    while path.exists():
        path, i = Path(f"{base}-{i}.md"), i + 1
    return path


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(x) for x in text.split(",") if x]


def main(argv: Iterable[str] | None = None) -> int:
    """Command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--n", type=_csv(int), default=list(DEFAULT_N), help="parts already in the dataset (50,1000,...)"
    )
    p.add_argument("--only", type=_csv(str), default=list(MEASURES), help=f"measures: {','.join(MEASURES)}")
    p.add_argument("--reps", type=int, default=5, help="+1 runs per N (the median is reported)")
    p.add_argument(
        "--control-n",
        type=int,
        default=50,
        help="parts of the control dataset, +1'd alongside each +1 run (0: no control)",
    )
    p.add_argument("--rows", type=int, default=100)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--seed-batch", type=int, default=1000, help="parts per seeding job")
    p.add_argument("--seed-threads", type=int, default=4, help="parts decided at once while seeding")
    p.add_argument("--delete-n", type=int, default=5000)
    p.add_argument("--reconcile-n", type=int, default=20000)
    p.add_argument("--dropped", type=int, default=10, help="parts whose events the reconcile measure drops")
    p.add_argument("--max-passes", type=int, default=20)
    p.add_argument("--bulk-parts", type=int, default=5000)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--bulk-timeout", type=float, default=7200.0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds any one wait may take")
    p.add_argument("--poll", type=float, default=0.1, help="seconds between manifest reads")
    p.add_argument("--tracemalloc", action="store_true", help="also list this process's largest allocations")
    p.add_argument(
        "--moto-unbounded",
        action="store_true",
        help="for comparison: moto as it comes (tracks every instance it makes, copies whole tables per "
        "transaction) and no noncurrent version expires",
    )
    p.add_argument("--out", help="report file (default bench/results/<UTC date>-scale[-k].md; .json beside)")
    args = p.parse_args(argv)
    args.argv = argv
    unknown = set(args.only) - set(MEASURES)
    if unknown:
        p.error(f"--only: no measure {sorted(unknown)}; choose from {','.join(MEASURES)}")
    # A run started in the background inherits SIGINT ignored: `kill -INT` still stops it with
    # the report of what was measured so far (written in the finally below).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start()
    os.environ.setdefault("S3ROLLUP_LOG_LEVEL", "WARNING")
    commit = _commit()
    day = LIFECYCLE_DAY_SECONDS
    if args.moto_unbounded:
        local.untrack_moto_instances = local.light_transactions = lambda: None
        day = 1e7  # 90 "days" are 28 years: nothing expires during a run
    with EmbeddedStack(
        stack_name="s3rollup-scale", log_level="WARNING", reconcile_every=0, lifecycle_day_seconds=day
    ) as stack:
        bench = Bench(stack, args)
        bench.results["load"] = [os.getloadavg()[0]]
        try:
            bench.run()
        finally:
            bench.results["load"].append(os.getloadavg()[0])
            lines = report(bench.results, args, commit)
            path = _out_path(args)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n")
            path.with_suffix(".json").write_text(json.dumps(bench.results, indent=1, default=str) + "\n")
            print("\n".join(lines))
            say(f"report: {path}")
    return 0 if not bench.results["bulk"].get("problems") else 1


if __name__ == "__main__":
    sys.exit(main())
