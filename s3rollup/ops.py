"""What the user-side commands do beyond printing: upload parts, summarise a dataset's state,
request a rebuild, select from a result. Pure summaries are separate from the I/O.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import ClientError

from .aws import Aws
from .contract import ContractError, parse_part_key, result_key
from .errors import AwsError, S3RollupError
from .events import records, s3_record, sqs_record
from .progress import Progress, Waiting
from .state import AGGREGATED, PENDING, REJECTED, Part, State

MIB = 1 << 20


# ---- results -------------------------------------------------------------------------------


def read_manifest(aws: Aws, bucket: str, dataset: str, parts: bool = True) -> dict[str, Any] | None:
    """The dataset's published manifest, or None when nothing is published yet.

    With ``parts``, its ``"parts"`` lists every part behind the result (key order): the
    segments the root names are read at their versions and checked against their SHA-256
    (s3rollup.manifest), one read per FANOUT parts. Without, the root alone (one read):
    ``part_count`` says how many parts it holds, ``manifest.lookup`` finds one.
    """
    from .manifest import Objects, entries

    try:
        raw = aws.s3.get_object(Bucket=bucket, Key=result_key(dataset, "manifest.json"))["Body"].read()
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
            return None
        raise
    manifest: dict[str, Any] = json.loads(raw)
    if parts and "tree" in manifest:
        manifest["parts"] = entries(Objects(aws.s3, bucket), manifest["tree"])
    return manifest


def group_labels(frame: Any, group_by: Sequence[str]) -> Any:
    """How each row's group key is written on the command line and in a report: its values
    joined by ','."""
    return frame[list(group_by)].astype(str).agg(",".join, axis=1)


def select(frame: Any, group_by: Sequence[str], groups: Sequence[str], columns: Sequence[str]) -> Any:
    """Rows of the given groups (all when empty) and the group keys plus the given columns.

    Raises ContractError (code UNKNOWN_COLUMN or UNKNOWN_GROUP) naming what is missing.
    """
    if columns:
        unknown = [c for c in columns if c not in frame.columns]
        if unknown:
            raise ContractError(
                "UNKNOWN_COLUMN",
                f"no column {', '.join(unknown)}; the result has: {', '.join(map(str, frame.columns))}",
            )
        frame = frame[[*group_by, *(c for c in columns if c not in group_by)]]
    if groups:
        labels = group_labels(frame, group_by)
        missing = sorted(set(groups) - set(labels))
        if missing:
            raise ContractError(
                "UNKNOWN_GROUP",
                f"no group {', '.join(missing[:5])} in the result (group key: {', '.join(group_by)})",
            )
        frame = frame[labels.isin(set(groups))]
    return frame.reset_index(drop=True)


# ---- upload --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """One part file to upload and the key it goes to."""

    path: Path
    key: str
    size: int


def plan_uploads(paths: Iterable[str], dataset: str) -> list[Upload]:
    """Check every file before anything is uploaded: it exists, is a file, and names a valid key.

    Raises FileNotFoundError or ContractError; nothing is uploaded when one file is bad.
    """
    plan: list[Upload] = []
    seen: dict[str, Path] = {}
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise FileNotFoundError(f"{raw}: no such file")
        key = parse_part_key(f"incoming/{dataset}/{path.name}").key
        if key in seen:
            raise ContractError("DUPLICATE_NAME", f"{seen[key]} and {raw} would both upload to {key}")
        seen[key] = path
        plan.append(Upload(path, key, path.stat().st_size))
    return plan


def upload_parts(
    aws: Aws,
    bucket: str,
    key_arn: str,
    plan: Sequence[Upload],
    multipart_threshold: int = 64 * MIB,
    stream: TextIO | None = None,
) -> list[dict[str, Any]]:
    """Upload the planned files as SSE-KMS under the stack key (multipart above the threshold)."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(
        multipart_threshold=multipart_threshold,
        multipart_chunksize=max(5 * MIB, multipart_threshold // 4),
        use_threads=True,
    )
    done = []
    for up in plan:
        progress = Progress(f"upload {up.path.name}", up.size, stream=stream)
        try:
            _upload_file(aws, bucket, key_arn, up, config, progress)
        except S3UploadFailedError as exc:
            # boto3 wraps the service's answer (AccessDenied, ...): say that, not a traceback.
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ClientError):
                raise cause from None
            raise AwsError(f"upload of {up.path.name} failed: {exc}", "UPLOAD_FAILED") from exc
        progress.close()
        head = aws.s3.head_object(Bucket=bucket, Key=up.key)
        done.append(
            {
                "key": up.key,
                "bytes": up.size,
                "version_id": head.get("VersionId", "null"),
                "etag": str(head.get("ETag", "")).strip('"'),
                "multipart": "-" in str(head.get("ETag", "")),
            }
        )
    return done


def _upload_file(aws: Aws, bucket: str, key_arn: str, up: Upload, config: Any, progress: Progress) -> None:
    # boto3's managed transfer (multipart above the threshold, parts on threads) on the
    # shared botocore client: what boto3's client.upload_file does.
    from boto3.s3.transfer import S3Transfer

    with S3Transfer(aws.s3, config) as transfer:
        transfer.upload_file(
            str(up.path),
            bucket,
            up.key,
            callback=progress.add,
            # SHA-256 checksum: S3 checks the bytes on arrival and keeps the checksum, and
            # the worker's read is checked against it (a one-PUT upload: the audit records
            # this SHA-256, and the worker hashes the part once). A multipart upload's is a
            # checksum of checksums: the worker takes its own SHA-256.
            extra_args={
                "ServerSideEncryption": "aws:kms",
                "SSEKMSKeyId": key_arn,
                "ChecksumAlgorithm": "SHA256",
            },
        )


# ---- status --------------------------------------------------------------------------------


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def summarize(
    parts: Sequence[Part],
    records: Sequence[dict[str, Any]],
    manifest: dict[str, Any] | None,
    now: datetime,
    listed: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """A dataset's status from its registry, audit records, manifest and the (key, version) of
    each current object under incoming/<dataset>/ (no I/O).

    Up to date means: every current object has a decision and the published result holds
    exactly the accepted ones. Holds counts, reason codes, keys and times only: never a cell value.
    """
    by_state: dict[str, int] = {}
    for p in parts:
        by_state[p.status] = by_state.get(p.status, 0) + 1
    accepted_at: dict[tuple[str, str], str] = {}
    rejected_line: dict[tuple[str, str], int] = {}
    last_job: dict[str, Any] | None = None
    for r in records:
        ident = (str(r.get("key", "")), str(r.get("version_id", "")))
        if r["event"] == "PART_ACCEPTED":
            accepted_at[ident] = r["time"]
        elif r["event"] == "PART_REJECTED" and (r.get("detail") or {}).get("line"):
            rejected_line[ident] = int(r["detail"]["line"])
        elif r["event"] in ("JOB_LAUNCHED", "JOB_STARTED", "JOB_FINISHED", "JOB_FAILED"):
            last_job = {"job_id": r.get("job_id", ""), "event": r["event"], "time": r["time"]}
            if r.get("reason"):
                last_job["reason"] = r["reason"]
    current = [p for p in parts if p.status in (PENDING, AGGREGATED)]
    in_result = {(p["key"], p["version_id"]) for p in (manifest or {}).get("parts", [])}
    waiting = [p for p in current if (p.key, p.version_id) not in in_result]
    times = [accepted_at[(p.key, p.version_id)] for p in current if (p.key, p.version_id) in accepted_at]
    newest = max(times, key=_ts) if times else None
    result: dict[str, Any] | None = None
    if manifest is not None:
        result = {
            "generated_at": manifest["generated_at"],
            "job_id": manifest.get("job_id", ""),
            "parts": len(manifest["parts"]),
            "rows": manifest["rows"],
            "groups": manifest["groups"],
        }
    decided = {(p.key, p.version_id) for p in parts if p.status in (PENDING, AGGREGATED, REJECTED)}
    undecided = [ident for ident in listed if ident not in decided]
    lag: dict[str, Any] = {
        "up_to_date": not waiting and not undecided and manifest is not None,
        "waiting_parts": len(waiting),
        "undecided_parts": len(undecided),
    }
    if newest is not None and manifest is not None and not waiting:
        # How long the newest accepted part took to reach the published result.
        lag["seconds"] = round((_ts(manifest["generated_at"]) - _ts(newest)).total_seconds(), 3)
    elif newest is not None:
        # Not in the result yet: how long the newest accepted part has been waiting.
        lag["seconds"] = round((now - _ts(newest)).total_seconds(), 3)
    return {
        "parts": dict(sorted(by_state.items())),
        "newest_accepted": newest,
        "last_job": last_job,
        "result": result,
        "lag": lag,
        "quarantined": [
            {
                "key": p.key,
                "version_id": p.version_id,
                "reason": p.reason,
                **(
                    {"line": rejected_line[(p.key, p.version_id)]}
                    if (p.key, p.version_id) in rejected_line
                    else {}
                ),
            }
            for p in parts
            if p.status == REJECTED
        ],
    }


def status_lines(dataset: str, status: dict[str, Any]) -> list[str]:
    """The status as text lines for a terminal."""
    parts = ", ".join(f"{n} {s.lower()}" for s, n in status["parts"].items()) or "none"
    lines = [f"dataset {dataset}: parts {parts}"]
    job = status["last_job"]
    if job:
        why = f" ({job['reason']})" if job.get("reason") else ""
        lines.append(f"last job {job['job_id'][:12]}: {job['event']}{why} at {job['time']}")
    else:
        lines.append("last job: none")
    res = status["result"]
    if res:
        lines.append(
            f"result: {res['groups']} groups from {res['parts']} parts, {res['rows']} rows, "
            f"published {res['generated_at']}"
        )
    else:
        lines.append("result: none published yet")
    lag = status["lag"]
    if "seconds" in lag and lag["up_to_date"]:
        lines.append(f"lag: up to date; newest accepted part reached the result in {lag['seconds']:.1f}s")
    elif "seconds" in lag:
        lines.append(
            f"lag: {lag['waiting_parts']} accepted part(s) not in the result yet; "
            f"newest waiting {lag['seconds']:.1f}s"
        )
    if lag["undecided_parts"]:
        lines.append(f"undecided: {lag['undecided_parts']} part(s) in the bucket have no decision yet")
    for q in status["quarantined"]:
        where = f" line {q['line']}" if "line" in q else ""
        lines.append(f"quarantined {q['key']}: {q['reason']}{where}")
    return lines


# ---- rebuild -------------------------------------------------------------------------------


def mark_stale(state: State, audit: Any, dataset: str, actor: str, attempts: int = 5) -> list[Part]:
    """Mark every accepted part's partial stale, audited, in transactions of up to 49 parts
    (each with its change marker: DynamoDB takes 100 items per transaction, the audit 2).

    A part that changes meanwhile fails its transaction; the registry is read again and the
    rest retried. Returns the parts marked.
    """
    from .audit import Duplicate

    marked: dict[tuple[str, str], Part] = {}
    for _ in range(attempts):
        todo = [
            p
            for p in state.parts(dataset)
            if p.status in (PENDING, AGGREGATED) and (p.key, p.version_id) not in marked
        ]
        try:
            for i in range(0, len(todo), 49):
                chunk = todo[i : i + 49]
                audit.append(
                    dataset,
                    "REBUILD_REQUESTED",
                    actor,
                    extra_items=[
                        item
                        for p in chunk
                        for item in (state.stale_item(p), state.change_item(dataset, p.key))
                    ],
                    parts=len(chunk),
                )
                marked.update({(p.key, p.version_id): p for p in chunk})
        except Duplicate:
            continue  # a part changed under us: read the registry again
        return sorted(marked.values(), key=lambda p: p.key)
    raise S3RollupError(
        "parts kept changing while the rebuild was being requested: run `s3rollup rebuild` again",
        "REBUILD_CONTENDED",
    )


def s3_notification(bucket: str, key: str, region: str = "us-east-1") -> dict[str, Any]:
    """The S3 notification body S3 sends for a new object (the function HEADs the key itself)."""
    return records([s3_record(bucket, key, region=region)])


def part_events(
    aws: Aws, bucket: str, queue_url: str, uploaded: Sequence[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The events AWS would deliver for parts upload_parts uploaded: the S3 notification (one
    record per part) and Lambda's SQS event from the ingest queue (one message per part,
    each a notification, as S3 sends them)."""
    # A queue URL ends in /<account>/<name>: its ARN needs no call (nor a producer SQS rights).
    account, name = queue_url.rstrip("/").rsplit("/", 2)[-2:]
    queue_arn = f"arn:aws:sqs:{aws.region}:{account}:{name}"
    notified = [
        s3_record(
            bucket,
            part["key"],
            region=aws.region,
            size=part["bytes"],
            etag=part["etag"],
            version_id=part["version_id"],
        )
        for part in uploaded
    ]
    messages = [
        sqs_record(json.dumps(records([r])), queue_arn=queue_arn, region=aws.region) for r in notified
    ]
    return records(notified), records(messages)


def trigger_ingest(aws: Aws, queue_url: str, bucket: str, key: str) -> None:
    """Send the ingest queue a notification for key, as S3 would: the function starts a job."""
    sqs = aws.client("sqs")
    # The output names the queue; its URL is resolved on this endpoint (the embedded one too).
    url = sqs.get_queue_url(QueueName=queue_url.rsplit("/", 1)[-1])["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(s3_notification(bucket, key, aws.region)))


def wait_for_rebuild(
    aws: Aws,
    state: State,
    bucket: str,
    dataset: str,
    requested: set[tuple[str, str]],
    after: datetime,
    timeout: float,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Wait until no part is stale and a manifest published after `after` names every current part.

    Raises TimeoutError.
    """
    spinner = Waiting(f"rebuilding {dataset}", stream=stream)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            parts = state.parts(dataset)
            stale = sum(1 for p in parts if p.needs_partial)
            spinner.tick(f"{len(requested) - stale}/{len(requested)} partials recomputed")
            manifest = read_manifest(aws, bucket, dataset)
            if not stale and manifest is not None and _ts(manifest["generated_at"]) >= after:
                listed = {(p["key"], p["version_id"]) for p in manifest["parts"]}
                current = {(p.key, p.version_id) for p in parts if p.status == AGGREGATED}
                if listed == current:
                    return manifest
            time.sleep(0.3)
    finally:
        spinner.close()
    raise TimeoutError(f"the rebuild of {dataset!r} did not publish within {timeout:.0f}s")
