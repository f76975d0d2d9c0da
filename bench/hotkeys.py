"""Hot keys: audit appends per second on one dataset's chain under contention.

Every decision on a part and every job event is one append to its dataset's audit chain:
read the chain head (seq 0), then one transaction that puts the record and moves the head,
conditioned on where it was read. So all writers of a dataset meet on one item. This starts
the embedded stack (moto on 127.0.0.1, template.yaml; no dispatcher, no workers), and
``--threads`` writers append to ONE chain for ``--seconds``; the same number of writers on
chains of their own is the control (what the endpoint does when nothing is contended). Each
setting runs ``--reps`` times, interleaved; it prints appends/s (median), the transactions
tried per append (retries after losing the race for the head), and latency p50/p95. Every
chain is verified afterwards (no fork, no gap, every append there once).

    .venv/bin/python bench/hotkeys.py --threads 1,4,16 --seconds 5 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from typing import Any

from s3rollup.audit import AuditLog
from s3rollup.aws import Aws
from s3rollup.local import EmbeddedStack


class Counting:
    """A DynamoDB client that counts transactions tried and cancelled."""

    def __init__(self, client: Any) -> None:
        self._client, self.tried, self.cancelled = client, 0, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def transact_write_items(self, **kwargs: Any) -> Any:
        self.tried += 1
        try:
            return self._client.transact_write_items(**kwargs)
        except self._client.exceptions.TransactionCanceledException:
            self.cancelled += 1
            raise


def bare_stack(name: str) -> EmbeddedStack:
    """The embedded stack alone (moto, the template's resources): no dispatcher, no periodic
    reconcile, no workers."""
    return EmbeddedStack(
        port=0, stack_name=name, dispatch=False, reconcile_every=0, run_tasks=False, log_level="WARNING"
    )


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def run(stack: EmbeddedStack, threads: int, seconds: float, shared: bool) -> dict[str, Any]:
    """``threads`` writers appending for ``seconds``, to one chain or to one chain each."""
    assert stack.info is not None
    table = stack.info.outputs["AuditTableName"]
    base = f"hot-{uuid.uuid4().hex[:8]}"
    chains = [base] * threads if shared else [f"{base}-{i}" for i in range(threads)]
    clients = [Counting(Aws(stack.info.region, stack.info.endpoint_url).dynamodb) for _ in range(threads)]
    latencies: list[list[float]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)
    deadline = 0.0

    def writer(i: int) -> None:
        log = AuditLog(clients[i], table, max_attempts=1000)
        start.wait()
        n = 0
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            log.append(chains[i], "PART_ACCEPTED", "bench", key=f"incoming/x/p-{i}-{n}", decision="PENDING")
            latencies[i].append(time.monotonic() - t0)
            n += 1

    pool = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    deadline = time.monotonic() + seconds
    began = time.monotonic()
    start.wait()
    for t in pool:
        t.join()
    elapsed = time.monotonic() - began
    appends = sum(len(lat) for lat in latencies)
    # The chains hold every append once, and verify.
    assert stack.aws is not None
    log = AuditLog(stack.aws.dynamodb, table)
    held = 0
    for chain in set(chains):
        count, problem = log.verify(chain)
        if problem is not None:
            raise SystemExit(f"chain {chain} does not verify: {problem}")
        held += count
    if held != appends:
        raise SystemExit(f"the chains hold {held} records for {appends} appends")
    flat = [x for lat in latencies for x in lat]
    return {
        "appends_per_s": appends / elapsed,
        "tries_per_append": sum(c.tried for c in clients) / max(appends, 1),
        "p50_ms": 1000 * percentile(flat, 0.5),
        "p95_ms": 1000 * percentile(flat, 0.95),
        "appends": appends,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the settings and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,4,16", help="writer counts (comma separated)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per run")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.threads.split(",")]
    settings = [(n, True) for n in counts] + [(n, False) for n in counts if n > 1]
    results: dict[tuple[int, bool], list[dict[str, Any]]] = {s: [] for s in settings}
    with bare_stack("s3rollup-hotkeys") as stack:
        for rep in range(args.reps):
            for n, shared in settings:
                results[(n, shared)].append(run(stack, n, args.seconds, shared))
                print(
                    f"rep {rep + 1}: {n} writers, {'one chain' if shared else 'own chains'}", file=sys.stderr
                )
    print("| writers | chains | appends/s (median) | runs | transactions per append | p50 ms | p95 ms |")
    print("|---:|---|---:|---|---:|---:|---:|")
    for (n, shared), runs in results.items():
        rates = [r["appends_per_s"] for r in runs]
        med = sorted(runs, key=lambda r: r["appends_per_s"])[len(runs) // 2]
        print(
            f"| {n} | {'one' if shared else f'{n}, one each'} | {statistics.median(rates):.0f} | "
            f"{', '.join(f'{r:.0f}' for r in rates)} | {med['tries_per_append']:.2f} | "
            f"{med['p50_ms']:.1f} | {med['p95_ms']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
