"""The `s3rollup` command line.

Every command uses the standard AWS configuration (AWS_ENDPOINT_URL, AWS_REGION, the
credential chain) and finds the bucket and tables from the stack's CloudFormation
outputs, so the same commands work against `s3rollup up` and against an AWS account.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError, NoCredentialsError, NoRegionError

from .aws import Aws
from .contract import ContractError, check_dataset, result_prefix
from .errors import S3RollupError

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


def read_result(aws: Aws, bucket: str, dataset: str) -> tuple[dict[str, Any], Any]:
    """The published manifest and the aggregate it names (exact versions, checksum-verified)."""
    import hashlib

    import pandas as pd

    prefix = result_prefix(dataset)
    try:
        manifest = json.loads(aws.s3.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
            raise CliError(f"no result for dataset {dataset!r} yet", EXIT_NOT_FOUND) from exc
        raise
    ref = manifest["objects"]["aggregate.parquet"]
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": ref["key"]}
    if ref.get("version_id") not in (None, "null"):
        kwargs["VersionId"] = ref["version_id"]
    data = aws.s3.get_object(**kwargs)["Body"].read()
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise CliError("the result does not match its manifest checksum", EXIT_MISMATCH)
    return manifest, pd.read_parquet(io.BytesIO(data))


def render(frame: Any, fmt: str) -> str:
    """A result table as table, json or csv text."""
    if fmt == "json":
        return str(frame.to_json(orient="records", double_precision=15))
    if fmt == "csv":
        return str(frame.to_csv(index=False))
    return str(frame.to_string(index=False, max_rows=60))


# ---- commands ---------------------------------------------------------------------------------


def cmd_query(args: argparse.Namespace) -> int:
    """Print a dataset's published result."""
    aws = Aws()
    dataset = check_dataset(args.dataset)
    outputs = _stack_outputs(aws, args.stack)
    manifest, frame = read_result(aws, outputs["DataBucketName"], dataset)
    print(render(frame, args.format))
    if args.format == "table":
        print(
            f"\n{len(frame)} groups from {len(manifest['parts'])} parts, {manifest['rows']} rows; "
            f"published {manifest['generated_at']}",
            file=sys.stderr,
        )
    return 0


def _audit_log(aws: Aws, outputs: dict[str, str]) -> Any:
    from .audit import AuditLog

    return AuditLog(aws.dynamodb, outputs["AuditTableName"])


def cmd_audit_show(args: argparse.Namespace) -> int:
    """Print a dataset's audit chain."""
    aws = Aws()
    dataset = check_dataset(args.dataset)
    records = [
        {k: v for k, v in r.items() if k != "_seq_key"}
        for r in _audit_log(aws, _stack_outputs(aws, args.stack)).records(dataset)
    ]
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

    aws = Aws()
    dataset = check_dataset(args.dataset)
    outputs = _stack_outputs(aws, args.stack)
    log = _audit_log(aws, outputs)
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
    from .local import EmbeddedStack

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with EmbeddedStack(port=args.port, stack_name=args.stack) as stack:
        assert stack.info is not None
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

    u = sub.add_parser("up", help="run the embedded stack (moto on 127.0.0.1) in the foreground")
    u.add_argument(
        "--port",
        type=int,
        default=4566,
        help="port of the endpoint (default 4566; 0 picks a free one)",
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
    q.add_argument("--format", choices=("table", "json", "csv"), default="table")
    q.set_defaults(func=cmd_query)
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
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
