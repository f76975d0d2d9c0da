"""The worker image's start: from `docker run` to the first partial computed, cold and warm.

Starts the embedded stack on Docker's bridge gateway (as tests/integration/
test_worker_image.py does: no dispatcher, the bench plays the function), and for each run
uploads one generated part to a fresh dataset, lets ingest accept it and take the lease,
then runs the job as Fargate runs it: `docker run --rm --read-only` with a fresh volume at
/tmp, uid 1000, the task definition's environment and the task role's credentials. Times,
from the moment `docker run` is called (host clock; containers share it):

- `started`: the job's JOB_STARTED audit record (interpreter, imports, lease taken);
- `first partial`: the PART_AGGREGATED record of the part, which the job writes as soon
  as the task that computed the part's partial has stored it (one part: the only partial);
- `exit`: `docker run` returns (result published, container removed).

Every run's published result is checked against pandas (s3rollup.reference, 1e-9).

Cold and warm: each repetition runs every image in turn (the order rotates), and for each
image first a cold run, then a warm one. Cold means this machine's page cache was dropped
at the start of the run (`sync; echo 3 > /proc/sys/vm/drop_caches`, root), before the
part's upload and ingest: those read the embedded stack's code back in (an endpoint that
is always up), nothing reads the image's files, the docker CLI's or the container
runtime's, which `docker run` then reads from disk. Dropping the cache affects every
process on the machine for a moment; --no-drop-caches skips it (then "cold" is only a new
container, like the warm run). Warm: the same image run again at once.

    .venv/bin/python bench/worker_image.py --image s3rollup-worker:test --reps 5

Writes a Markdown report (with the images' sizes by layer) and a .json of every run to
bench/results/<UTC date>-worker-image.md (or --out). Exit 1 when a run failed or a result
disagreed with pandas.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
import zlib
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from s3rollup.audit import AuditLog  # noqa: E402
from s3rollup.cli import read_result  # noqa: E402
from s3rollup.config import Settings  # noqa: E402
from s3rollup.contract import parse_part_key  # noqa: E402
from s3rollup.demo import compare, generate_part, to_csv_bytes  # noqa: E402
from s3rollup.ingest import Ingest  # noqa: E402
from s3rollup.launch import LocalLauncher  # noqa: E402
from s3rollup.local import EmbeddedStack, component_credentials, docker_bridge_address  # noqa: E402
from s3rollup.reference import complex_operation  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("cold", "warm")
FIRST = "first_partial"
MEASURES = ("started", FIRST, "exit")


def say(msg: str) -> None:
    """Progress on stderr."""
    print(msg, file=sys.stderr, flush=True)


def docker(*args: str) -> str:
    """A docker CLI command's stdout; raise on failure."""
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout


def layers(image: str) -> tuple[int, list[tuple[int, str]]]:
    """The image's size in bytes and its layers (bytes, the instruction), bottom first,
    leaving out the instructions that add no bytes."""
    size = int(docker("image", "inspect", image, "--format", "{{.Size}}").strip())
    rows = []
    for line in docker(
        "history", "--no-trunc", "--human=false", "--format", "{{.Size}}\t{{.CreatedBy}}", image
    ).splitlines():
        n, _, created = line.partition("\t")
        if int(n):
            created = " ".join(created.replace("/bin/sh -c #(nop)", "").split()) or "(imported base)"
            rows.append((int(n), created))
    return size, rows[::-1]


def compressed_size(image: str) -> int:
    """Bytes of the image's `docker save` archive compressed with gzip (level 6), about what
    a registry stores and a task downloads (layers are pushed gzip-compressed)."""
    save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
    assert save.stdout is not None
    gz = zlib.compressobj(6, zlib.DEFLATED, 31)
    n = 0
    while chunk := save.stdout.read(1 << 20):
        n += len(gz.compress(chunk))
    n += len(gz.flush())
    if save.wait() != 0:
        raise RuntimeError(f"docker save {image} failed")
    return n


def drop_caches() -> None:
    """Write dirty pages out and drop this machine's page cache, dentries and inodes."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def seconds_since(stamp: str, t0: float) -> float:
    """An audit record's time (ISO 8601, UTC) as seconds after the epoch time t0."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp() - t0


def one_run(
    stack: Any, image: str, body: bytes, expected: Any, credentials: dict[str, str], cold: bool
) -> dict[str, Any]:
    """Accept one part in a fresh dataset and run its job in a new container of image; when
    cold, drop the page cache first (the upload and ingest then read the embedded stack's
    code back, as an endpoint that is always up has it, but nothing of the image)."""
    if cold:
        drop_caches()
    out = stack.info.outputs
    bucket = out["DataBucketName"]
    dataset = "img" + uuid.uuid4().hex[:12]
    key = f"incoming/{dataset}/p0.csv"
    stack.aws.s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=body,
        ServerSideEncryption="aws:kms",
        SSEKMSKeyId=out["DataKeyArn"],
        ChecksumAlgorithm="SHA256",  # as `s3rollup put` uploads
    )
    settings = Settings.from_env(stack.info.function_env)
    launches: list[str] = []  # the job ingest launches: the bench runs it as a container

    def launch(_dataset: str, job: str) -> str:
        launches.append(job)
        return f"container:{job}"

    launcher = SimpleNamespace(launch=launch)
    outcome = Ingest(settings, stack.aws.s3, stack.aws.dynamodb, launcher).sync(
        parse_part_key(key), actor="bench:image"
    )
    if outcome.decision != "ACCEPTED" or len(launches) != 1:
        raise RuntimeError(f"ingest did not accept and launch: {outcome.decision}, {launches}")
    (job_id,) = launches
    env = {
        **LocalLauncher(settings, stack.aws.client("ecs"), agent=stack.aws).task_environment(dataset, job_id),
        "AWS_ENDPOINT_URL": stack.info.endpoint_url,
        "AWS_REGION": stack.info.region,
        "AWS_DEFAULT_REGION": stack.info.region,
        **credentials,
    }
    volume = f"s3rollup-bench-{uuid.uuid4().hex[:8]}"
    docker("volume", "create", volume)
    command = [
        "docker",
        "run",
        "--rm",
        "--read-only",
        "--mount",
        f"type=volume,source={volume},target=/tmp",
        "--user",
        "1000:1000",
        *[a for k, v in sorted(env.items()) for a in ("--env", f"{k}={v}")],
        image,
    ]
    try:
        load = os.getloadavg()[0]  # the machine is shared: how busy it was
        t0 = time.time()
        run = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
        ended = time.time() - t0
    finally:
        subprocess.run(["docker", "volume", "rm", "-f", volume], capture_output=True, check=False)
    result: dict[str, Any] = {
        "image": image,
        "dataset": dataset,
        "load": load,
        "exit": ended,
        "returncode": run.returncode,
    }
    if run.returncode != 0:
        result["check"] = f"container exited {run.returncode}: {run.stderr[-1500:]}"
        return result
    records = list(AuditLog(stack.aws.dynamodb, out["AuditTableName"]).records(dataset))
    times = {r["event"]: seconds_since(r["time"], t0) for r in records if r.get("job_id") == job_id}
    result["started"] = times.get("JOB_STARTED")
    result["first_partial"] = times.get("PART_AGGREGATED")
    _, frame = read_result(stack.aws, bucket, dataset)
    problems = compare(frame, expected)
    if result["first_partial"] is None:
        problems.insert(0, "no PART_AGGREGATED record")
    result["check"] = "; ".join(problems[:3]) if problems else "ok"
    return result


def median(runs: list[dict[str, Any]], image: str, mode: str, measure: str) -> float:
    """The median of measure over the successful runs of (image, mode)."""
    values = [
        r[measure] for r in runs if r["image"] == image and r["mode"] == mode and r.get(measure) is not None
    ]
    return statistics.median(values) if values else float("nan")


def render(
    args: argparse.Namespace, runs: list[dict[str, Any]], sizes: dict[str, Any], started: datetime
) -> str:
    """The Markdown report."""
    lines = [
        f"# Worker image: `docker run` to the first partial ({started:%Y-%m-%d %H:%M} UTC)",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'bench/worker_image.py', *sys.argv[1:]])}`",
        "",
        f"One part of {args.rows:,} rows (the demo's data, CSV, {args.part_bytes / 1e6:.1f} MB) per run, "
        f"a new dataset and a new container each time; {args.reps} repetitions, images interleaved. "
        + (
            "Cold: page cache dropped (`echo 3 > /proc/sys/vm/drop_caches`) at the start of the run, "
            "before its upload."
            if args.drop_caches
            else "Cold: page cache NOT dropped (--no-drop-caches): a new container only."
        )
        + " Warm: the same image again at once. Seconds from `docker run`, medians (min-max).",
        "",
        *[f"- {note}" for note in args.note],
        *([""] if args.note else []),
        "| image | size | gzip | run | JOB_STARTED | first partial | container exit | results checked |",
        "|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for image in args.image:
        for mode in MODES:
            mine = [r for r in runs if r["image"] == image and r["mode"] == mode]
            cells = []
            for m in MEASURES:
                values = [r[m] for r in mine if r.get(m) is not None]
                cells.append(
                    f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"
                    if values
                    else "-"
                )
            ok = sum(r.get("check") == "ok" for r in mine)
            gz = sizes[image].get("gzip")
            lines.append(
                f"| `{image}` | {sizes[image]['size'] / 1e6:.0f} MB | "
                + (f"{gz / 1e6:.0f} MB" if gz else "-")
                + f" | {mode} | "
                + " | ".join(cells)
                + f" | {ok}/{len(mine)} equal pandas |"
            )
    loads = [r["load"] for r in runs]
    lines += [
        "",
        f"1-minute load average at the runs' starts ({os.cpu_count()} CPUs): median "
        f"{statistics.median(loads):.1f} ({min(loads):.1f}-{max(loads):.1f}).",
    ]
    if len(args.image) > 1:
        base = args.image[0]
        lines += ["", f"Ratios to `{base}` (medians, first partial):", ""]
        for image in args.image[1:]:
            parts = [
                f"{mode} {median(runs, image, mode, FIRST) / median(runs, base, mode, FIRST):.2f}x"
                for mode in MODES
            ]
            lines.append(f"- `{image}`: " + ", ".join(parts))
    lines += ["", "## Sizes by layer", ""]
    for image in args.image:
        lines += [f"`{image}`: {sizes[image]['size'] / 1e6:.1f} MB", "", "| MB | layer |", "|---:|---|"]
        lines += [f"| {n / 1e6:.1f} | `{what[:110]}` |" for n, what in sizes[image]["layers"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--image", action="append", required=True, help="an image to run (repeat to compare)")
    p.add_argument("--reps", type=int, default=5, help="repetitions of (cold, warm) per image (5)")
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the part (1,000,000)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--no-drop-caches",
        dest="drop_caches",
        action="store_false",
        help="do not drop the page cache before a cold run (needs no root)",
    )
    p.add_argument("--note", action="append", default=[], help="a line for the report (what an image is)")
    p.add_argument(
        "--gzip", action="store_true", help="also report each image's gzip-compressed `docker save` size"
    )
    p.add_argument(
        "--out", type=Path, help="the report's path (default bench/results/<date>-worker-image.md)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the bench; 0 when every run succeeded and every result equals pandas'."""
    args = parse_args(argv)
    started = datetime.now(UTC)
    gateway = docker_bridge_address()
    if gateway is None:
        say("no Docker bridge here: run worker/build_local_base.sh (root) first")
        return 1
    sizes = {}
    for image in args.image:
        size, rows = layers(image)
        sizes[image] = {"size": size, "layers": rows}
        if args.gzip:
            sizes[image]["gzip"] = compressed_size(image)
    frame = generate_part(0, args.rows, seed=args.seed)
    body = to_csv_bytes(frame)
    args.part_bytes = len(body)
    expected = complex_operation(frame)
    os.environ.setdefault("S3ROLLUP_LOG_LEVEL", "WARNING")
    runs: list[dict[str, Any]] = []
    with EmbeddedStack(
        port=0,
        host=gateway,
        stack_name="s3rollup-imagebench",
        dispatch=False,
        reconcile_every=0,
        run_tasks=False,
    ) as stack:
        assert stack.aws is not None and stack.info is not None
        credentials = component_credentials(stack.aws, stack.info.stack_name, "worker")
        for rep in range(args.reps):
            order = args.image[rep % len(args.image) :] + args.image[: rep % len(args.image)]
            for image in order:
                for mode in MODES:
                    cold = mode == "cold" and args.drop_caches
                    run = {
                        "rep": rep,
                        "mode": mode,
                        **one_run(stack, image, body, expected, credentials, cold),
                    }
                    runs.append(run)
                    say(
                        f"rep {rep} {image} {mode}: started {run.get('started') or 0:.2f}s, first partial "
                        f"{run.get('first_partial') or 0:.2f}s, exit {run['exit']:.2f}s, {run['check'][:200]}"
                    )
    text = render(args, runs, sizes, started)
    stem = RESULTS / f"{started:%Y-%m-%d}-worker-image"
    names = (Path(f"{stem}-{k}.md" if k > 1 else f"{stem}.md") for k in itertools.count(1))
    out = args.out or next(p for p in names if not p.exists())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    raw = {"args": {k: str(v) for k, v in vars(args).items()}, "sizes": sizes, "runs": runs}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(text)
    say(f"written: {out} (+ .json with every run)")
    return 0 if all(r.get("check") == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
