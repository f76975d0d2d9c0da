"""The `s3rollup` command line.

Every command uses the standard AWS configuration (AWS_ENDPOINT_URL, AWS_REGION, the
credential chain) and finds the bucket and tables from the stack's CloudFormation
outputs, so the same commands work against `s3rollup up` and against an AWS account.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

from botocore.exceptions import ClientError, NoCredentialsError, NoRegionError

from .aws import Aws, object_at
from .contract import ContractError, check_dataset
from .errors import S3RollupError
from .logs import exit_process

EXIT_USAGE, EXIT_NOT_FOUND, EXIT_MISMATCH, EXIT_AWS, EXIT_TIMEOUT, EXIT_TAMPERED = 2, 3, 4, 5, 6, 7


class CliError(Exception):
    """A one-line error for the user, with its exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _stack_outputs(aws: Aws, stack: str) -> dict[str, str]:
    from .local import stack_outputs

    try:
        return stack_outputs(aws, stack)
    except ClientError as exc:
        raise CliError(
            f"stack {stack!r} not found at {aws.endpoint_url or 'AWS'}: start `s3rollup up` "
            "and set AWS_ENDPOINT_URL, or deploy with `sam deploy`",
            EXIT_NOT_FOUND,
        ) from exc


def _context(args: argparse.Namespace) -> tuple[Aws, str, dict[str, str]]:
    """What every dataset command starts from: clients, the checked dataset, the stack outputs."""
    aws = Aws()
    dataset = check_dataset(args.dataset)
    return aws, dataset, _stack_outputs(aws, args.stack)


def read_result(aws: Aws, bucket: str, dataset: str) -> tuple[dict[str, Any], Any]:
    """The published manifest and the aggregate it names (exact versions, checksum-verified)."""
    import hashlib

    from .ops import read_manifest
    from .stats import table_from_parquet

    manifest = read_manifest(aws, bucket, dataset)
    if manifest is None:
        raise CliError(
            f"no result for dataset {dataset!r} yet: upload a part with `s3rollup put FILE --dataset "
            f"{dataset}` and check `s3rollup status {dataset}`",
            EXIT_NOT_FOUND,
        )
    ref = manifest["objects"]["aggregate.parquet"]
    data = aws.s3.get_object(**object_at(bucket, ref["key"], ref.get("version_id")))["Body"].read()
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise CliError(
            "the result does not match its manifest checksum: run `s3rollup audit verify` and "
            "`s3rollup rebuild`",
            EXIT_MISMATCH,
        )
    return manifest, table_from_parquet(data).to_pandas()


def render(frame: Any, fmt: str) -> str:
    """A result table as table, json or csv text."""
    if fmt == "json":
        return str(frame.to_json(orient="records", double_precision=15))
    if fmt == "csv":
        return str(frame.to_csv(index=False))
    return str(frame.to_string(index=False, max_rows=60))


# ---- commands ---------------------------------------------------------------------------------


def _split(values: list[str] | None) -> list[str]:
    """Values given as repeated words or comma lists, in order, without blanks."""
    return [v for raw in values or [] for v in raw.split(",") if v]


def cmd_query(args: argparse.Namespace) -> int:
    """Print a dataset's published result (optionally some groups and columns)."""
    from .ops import select

    aws, dataset, outputs = _context(args)
    manifest, frame = read_result(aws, outputs["DataBucketName"], dataset)
    group_by = list(manifest["contract"]["group_by"])
    frame = select(frame, group_by, args.group or [], _split(args.columns))
    print(render(frame, args.format))
    if args.format == "table":
        print(
            f"\n{len(frame)} groups from {len(manifest['parts'])} parts, {manifest['rows']} rows; "
            f"published {manifest['generated_at']}",
            file=sys.stderr,
        )
    return 0


def _upload(args: argparse.Namespace) -> tuple[Aws, dict[str, str], list[dict[str, Any]]]:
    """Upload args.files to incoming/<args.dataset>/ as `s3rollup put` does; every file is
    checked first. Returns the clients, the stack outputs and one line per uploaded part."""
    from .ops import MIB, plan_uploads, upload_parts

    aws = Aws()
    dataset = check_dataset(args.dataset)
    if args.multipart_threshold < 5:
        raise CliError("--multipart-threshold must be at least 5 (MiB; S3's smallest part)", EXIT_USAGE)
    try:
        plan = plan_uploads(args.files, dataset)
    except FileNotFoundError as exc:
        raise CliError(f"{exc}; nothing was uploaded", EXIT_NOT_FOUND) from exc
    outputs = _stack_outputs(aws, args.stack)
    done = upload_parts(
        aws,
        outputs["DataBucketName"],
        outputs["DataKeyArn"],
        plan,
        multipart_threshold=args.multipart_threshold * MIB,
    )
    print(
        f"uploaded {len(done)} part(s) to incoming/{dataset}/; `s3rollup status {dataset}` shows progress",
        file=sys.stderr,
    )
    return aws, outputs, done


def cmd_put(args: argparse.Namespace) -> int:
    """Upload part files to incoming/<dataset>/ (SSE-KMS under the stack key)."""
    for d in _upload(args)[2]:
        print(json.dumps(d, sort_keys=True))
    return 0


def cmd_event_put(args: argparse.Namespace) -> int:
    """Upload part files as `put` does and print the S3 and SQS events AWS would deliver."""
    from .ops import part_events

    for path in (args.s3_file, args.sqs_file):
        if path and not Path(path).parent.is_dir():
            raise CliError(f"{Path(path).parent}: no such directory for the event", EXIT_NOT_FOUND)
    aws, outputs, done = _upload(args)
    events = part_events(aws, outputs["DataBucketName"], outputs["IngestQueueUrl"], done)
    for event, path in zip(events, (args.s3_file, args.sqs_file), strict=True):
        print(json.dumps(event))
        if path:
            Path(path).write_text(json.dumps(event, indent=2) + "\n")
    return 0


def _status(aws: Aws, outputs: dict[str, str], dataset: str) -> dict[str, Any] | None:
    """The dataset's status now; None when it has no parts, records or objects at all."""
    from datetime import UTC, datetime

    from .ingest import list_current
    from .ops import read_manifest, summarize

    bucket = outputs["DataBucketName"]
    state, log = _tables(aws, outputs)
    parts, records = state.parts(dataset), list(log.records(dataset))
    listed = [(o["Key"], str(o.get("VersionId") or "null")) for o in list_current(aws.s3, bucket, dataset)]
    if not parts and not records and not listed:
        return None
    return summarize(parts, records, read_manifest(aws, bucket, dataset), datetime.now(UTC), listed)


def cmd_status(args: argparse.Namespace) -> int:
    """Print a dataset's parts by state, last job, lag and quarantined parts."""
    import time

    from .ops import status_lines
    from .progress import Waiting

    aws, dataset, outputs = _context(args)
    status = _status(aws, outputs, dataset)
    deadline = time.monotonic() + (args.wait or 0)
    spinner = Waiting(f"waiting for {dataset} to be up to date")
    while args.wait and (status is None or not status["lag"]["up_to_date"]) and time.monotonic() < deadline:
        spinner.tick(
            f"{status['lag']['waiting_parts'] + status['lag']['undecided_parts']} parts to go"
            if status
            else ""
        )
        time.sleep(0.5)
        status = _status(aws, outputs, dataset)
    spinner.close()
    if status is None:
        raise CliError(
            f"dataset {dataset!r} has no parts: upload one with `s3rollup put FILE --dataset {dataset}`",
            EXIT_NOT_FOUND,
        )
    if args.format == "json":
        print(json.dumps({"dataset": dataset, **status}, sort_keys=True))
    else:
        print("\n".join(status_lines(dataset, status)))
    if args.wait and not status["lag"]["up_to_date"]:
        raise CliError(
            f"{dataset!r} is not up to date after {args.wait:g}s: see the status above; try a longer --wait",
            EXIT_TIMEOUT,
        )
    return 0


def _actor(aws: Aws) -> str:
    """Who asks, for the audit trail: the caller's opaque IAM user id (no names)."""
    return "cli:" + str(aws.client("sts").get_caller_identity()["UserId"])


def cmd_rebuild(args: argparse.Namespace) -> int:
    """Recompute a dataset's result from all its current parts."""
    from datetime import UTC, datetime

    from .ops import mark_stale, trigger_ingest, wait_for_rebuild

    aws, dataset, outputs = _context(args)
    bucket = outputs["DataBucketName"]
    state, log = _tables(aws, outputs)
    requested_at = datetime.now(UTC)
    marked = mark_stale(state, log, dataset, _actor(aws))
    if not marked:
        raise CliError(
            f"dataset {dataset!r} has no accepted parts to rebuild from (`s3rollup status {dataset}`)",
            EXIT_NOT_FOUND,
        )
    trigger_ingest(aws, outputs["IngestQueueUrl"], bucket, marked[0].key)
    print(f"rebuild of {dataset!r} requested: {len(marked)} parts to recompute", file=sys.stderr)
    if args.no_wait:
        return 0
    try:
        manifest = wait_for_rebuild(
            aws,
            state,
            bucket,
            dataset,
            {(p.key, p.version_id) for p in marked},
            requested_at,
            args.timeout,
        )
    except TimeoutError as exc:
        raise CliError(f"{exc}; `s3rollup status {dataset}` shows where it is", EXIT_TIMEOUT) from exc
    print(
        f"rebuilt {dataset}: {manifest['groups']} groups from {len(manifest['parts'])} parts, "
        f"{manifest['rows']} rows; published {manifest['generated_at']} by job {manifest['job_id'][:12]}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write a self-contained HTML report of a dataset's published result."""
    from .report import render_report

    out = Path(args.output)
    if not out.parent.is_dir():
        raise CliError(f"{out.parent}: no such directory for the report", EXIT_NOT_FOUND)
    aws, dataset, outputs = _context(args)
    manifest, frame = read_result(aws, outputs["DataBucketName"], dataset)
    out.write_text(render_report(dataset, manifest, frame), encoding="utf-8")
    print(f"wrote {out} ({len(frame)} groups)", file=sys.stderr)
    return 0


def _tables(aws: Aws, outputs: dict[str, str]) -> tuple[Any, Any]:
    """The stack's parts registry (State) and audit log (AuditLog)."""
    from .audit import AuditLog
    from .state import State

    return State(aws.dynamodb, outputs["StateTableName"]), AuditLog(aws.dynamodb, outputs["AuditTableName"])


def cmd_audit_show(args: argparse.Namespace) -> int:
    """Print a dataset's audit chain."""
    aws, dataset, outputs = _context(args)
    chain = _tables(aws, outputs)[1].records(dataset)
    records = [{k: v for k, v in r.items() if k != "_seq_key"} for r in chain]
    if not records:
        raise CliError(f"no audit records for dataset {dataset!r}", EXIT_NOT_FOUND)
    if args.format == "json":
        for r in records:
            print(json.dumps(r, sort_keys=True))
        return 0
    for r in records:
        what = r.get("key") or r.get("job_id") or ""
        print(
            f"{r['seq']:>6}  {r['time']}  {r['event']:<16} {r.get('decision', ''):<10} "
            f"{r.get('reason', ''):<18} {what}"
        )
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Recompute a dataset's audit chain, the result checksums and the exported heads."""
    from .audit import verify_dataset

    aws, dataset, outputs = _context(args)
    log = _tables(aws, outputs)[1]
    count, anchors, problem = verify_dataset(
        log, aws.s3, outputs["DataBucketName"], outputs.get("AuditAnchorBucketName", ""), dataset
    )
    if problem is not None:
        print(
            f"s3rollup: audit chain of {dataset!r} is NOT intact: record {problem.seq}: "
            f"{problem.code}: {problem.message}",
            file=sys.stderr,
        )
        return EXIT_TAMPERED
    if count == 0:
        raise CliError(f"no audit records for dataset {dataset!r}", EXIT_NOT_FOUND)
    print(
        f"audit chain of {dataset!r} is intact: {count} records, {anchors} locked heads match, "
        f"head {log.head(dataset)[1][:16]}"
    )
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Run the embedded stack in the foreground until interrupted."""
    from .errors import ConfigError
    from .local import EmbeddedStack, check_listen_address

    try:
        check_listen_address(args.host)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # The stack runs the worker for every RunTask, whoever calls it (SAM's Lambda container).
    with EmbeddedStack(
        port=args.port, stack_name=args.stack, host=args.host, dispatch=not args.no_dispatch, run_tasks=True
    ) as stack:
        assert stack.info is not None
        print(stack.info.provision_note(), file=sys.stderr, flush=True)
        line = json.dumps(stack.info.as_json())
        print(line, flush=True)
        if args.ready_file:
            Path(args.ready_file).write_text(line + "\n")
        print(
            f"# ready: export AWS_ENDPOINT_URL={stack.info.endpoint_url}  (Ctrl-C stops)",
            file=sys.stderr,
            flush=True,
        )
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Start the embedded stack, upload seed-schema parts, wait for the result, check it."""
    from . import demo

    return demo.run(
        parts=args.parts,
        rows=args.rows,
        seed=args.seed,
        dataset=args.dataset,
        timeout=args.timeout,
        stack_name=args.stack,
    )


def _upload_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of the commands that upload parts (`put`, `event put`)."""
    p.add_argument("files", nargs="+", metavar="FILE", help="CSV, CSV.gz or Parquet part files")
    p.add_argument("--dataset", required=True, help="dataset to add the parts to")
    p.add_argument(
        "--multipart-threshold",
        type=int,
        default=64,
        metavar="MIB",
        help="upload files larger than this many MiB in parts (default 64, at least 5)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `s3rollup`."""
    p = argparse.ArgumentParser(
        prog="s3rollup",
        description="Secure, incremental per-group statistics over part files in S3.",
        epilog="AWS_ENDPOINT_URL, AWS_REGION and the standard credential chain apply to every command.",
    )
    p.add_argument(
        "--stack",
        default=os.environ.get("S3ROLLUP_STACK", "s3rollup"),
        help="CloudFormation stack name (default: $S3ROLLUP_STACK or s3rollup)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="run the whole flow on the embedded stack and check it against pandas")
    d.add_argument("--parts", type=int, default=8, help="part files to upload (default 8)")
    d.add_argument("--rows", type=int, default=200_000, help="rows per part (default 200000)")
    d.add_argument("--seed", type=int, default=42, help="random seed of the generated data (default 42)")
    d.add_argument("--dataset", default="demo", help="dataset name (default demo)")
    d.add_argument("--timeout", type=float, default=300, help="seconds to wait for the result (default 300)")
    d.set_defaults(func=cmd_demo)

    u = sub.add_parser(
        "up",
        help="run the embedded stack (moto on 127.0.0.1, or the Docker bridge's gateway) in the foreground",
    )
    u.add_argument(
        "--port",
        type=int,
        default=4566,
        help="port of the endpoint (default 4566; 0 picks a free one)",
    )
    u.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on: a loopback address (default 127.0.0.1) or the Docker bridge's "
        "gateway (172.31.250.1 with worker/build_local_base.sh's engine), where SAM's Lambda "
        "containers reach it; never 0.0.0.0",
    )
    u.add_argument(
        "--no-dispatch",
        action="store_true",
        help="do not run the ingest function on queued events (nor the periodic reconcile): "
        "it runs only when invoked, e.g. by `sam local invoke`",
    )
    u.add_argument("--ready-file", help="also write the ready JSON line to this file")
    u.set_defaults(func=cmd_up)

    a = sub.add_parser("audit", help="show or verify a dataset's hash-chained audit trail")
    asub = a.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    show = asub.add_parser("show", help="print the chain's records")
    show.add_argument("dataset")
    show.add_argument("--format", choices=("table", "json"), default="table")
    show.set_defaults(func=cmd_audit_show)
    ver = asub.add_parser(
        "verify",
        help="recompute every hash and link, check continuity and the result checksums; "
        "exit 0 when intact, 7 naming the first bad record",
    )
    ver.add_argument("dataset")
    ver.set_defaults(func=cmd_audit_verify)

    q = sub.add_parser("query", help="print a dataset's published result")
    q.add_argument("dataset")
    q.add_argument("--group", nargs="+", metavar="KEY", help="only these groups (several keys: 'a,b')")
    q.add_argument("--columns", nargs="+", metavar="COLUMN", help="only these columns (and the group key)")
    q.add_argument("--format", choices=("table", "json", "csv"), default="table")
    q.set_defaults(func=cmd_query)

    put = sub.add_parser("put", help="upload part files to incoming/<dataset>/ (SSE-KMS under the stack key)")
    _upload_arguments(put)
    put.set_defaults(func=cmd_put)

    ev = sub.add_parser("event", help="upload parts and print the events the ingest function gets for them")
    evsub = ev.add_subparsers(dest="event_command", required=True, metavar="ACTION")
    evput_help = (
        "upload part files as `put` does; print the S3 notification for them (line 1, as "
        "`sam local generate-event s3 put` makes it) and Lambda's SQS event from the ingest queue "
        "(line 2, as `sam local generate-event sqs receive-message` makes it), for `sam local invoke -e`"
    )
    evput = evsub.add_parser("put", help=evput_help, description=evput_help)
    _upload_arguments(evput)
    evput.add_argument("--s3-file", metavar="FILE", help="also write the S3 notification to this file")
    evput.add_argument("--sqs-file", metavar="FILE", help="also write the SQS event to this file")
    evput.set_defaults(func=cmd_event_put)

    st = sub.add_parser("status", help="parts by state, last job, lag, quarantined parts with reasons")
    st.add_argument("dataset")
    st.add_argument("--format", choices=("table", "json"), default="table")
    st.add_argument(
        "--wait",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait (up to SECONDS) until every part has a decision and the result holds "
        "every accepted part; exit 6 if not",
    )
    st.set_defaults(func=cmd_status)

    rb = sub.add_parser("rebuild", help="recompute a dataset's result from all its current parts")
    rb.add_argument("dataset")
    rb.add_argument("--no-wait", action="store_true", help="request the rebuild and return")
    rb.add_argument("--timeout", type=float, default=600, help="seconds to wait (default 600)")
    rb.set_defaults(func=cmd_rebuild)

    rp = sub.add_parser("report", help="write a self-contained HTML report (table and charts)")
    rp.add_argument("dataset")
    rp.add_argument("-o", "--output", required=True, help="the HTML file to write")
    rp.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a command; errors are one line on stderr with a distinct exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"s3rollup: {exc}", file=sys.stderr)
        return exc.exit_code
    except ContractError as exc:
        print(f"s3rollup: {exc} [{exc.code}]", file=sys.stderr)
        return EXIT_USAGE
    except (NoCredentialsError, NoRegionError) as exc:
        print(
            f"s3rollup: {exc}: configure AWS credentials or set AWS_ENDPOINT_URL for `s3rollup up`",
            file=sys.stderr,
        )
        return EXIT_AWS
    except ClientError as exc:
        print(
            f"s3rollup: AWS error {exc.response['Error']['Code']}: "
            f"{exc.response['Error'].get('Message', '')}",
            file=sys.stderr,
        )
        return EXIT_AWS
    except S3RollupError as exc:
        print(f"s3rollup: {exc} [{exc.code}]", file=sys.stderr)
        return 1
    except TimeoutError as exc:
        print(f"s3rollup: {exc}: try again with a longer --timeout", file=sys.stderr)
        return EXIT_TIMEOUT
    except KeyboardInterrupt:
        return 130


def run() -> NoReturn:
    """The console entry point: run ``main()`` and end the process with its exit code."""
    exit_process(main())


if __name__ == "__main__":
    run()
