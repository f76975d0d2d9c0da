"""The events the ingest function receives, shaped as AWS delivers them: an S3 event
notification (as `sam local generate-event s3 put` prints it) and Lambda's SQS event, whose
messages carry notifications (as `sam local generate-event sqs receive-message` prints it).

Pure builders: the embedded dispatcher, `s3rollup event put` and the tests all shape their
events here.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote_plus


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def s3_record(
    bucket: str,
    key: str,
    *,
    region: str = "us-east-1",
    event_name: str = "ObjectCreated:Put",
    size: int | None = None,
    etag: str | None = None,
    version_id: str | None = None,
    sequencer: str | None = None,
    event_time: str | None = None,
) -> dict[str, Any]:
    """One S3 notification record; the key URL-encoded as S3 sends it."""
    obj: dict[str, Any] = {"key": quote_plus(key, safe="/")}
    if size is not None:
        obj["size"] = size
    if etag:
        obj["eTag"] = etag
    if version_id and version_id != "null":
        obj["versionId"] = version_id
    # Increases with each event of a key, as S3's does (hex; compared as strings of one length).
    obj["sequencer"] = sequencer or f"{time.time_ns():018X}"
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": region,
        "eventTime": event_time or _now(),
        "eventName": event_name,
        "userIdentity": {"principalId": "EXAMPLE"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {
            "x-amz-request-id": "EXAMPLE123456789",
            "x-amz-id-2": "EXAMPLE123/5678abcdefghijklambdaisawesome/mnopqrstuvwxyzABCDEFGH",
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "incoming",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "EXAMPLE"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": obj,
        },
    }


def sqs_record(
    body: str,
    *,
    queue_arn: str,
    region: str,
    message_id: str | None = None,
    receipt_handle: str | None = None,
    attributes: Mapping[str, str] | None = None,
    message_attributes: Mapping[str, Any] | None = None,
    md5_of_body: str | None = None,
) -> dict[str, Any]:
    """One record of Lambda's SQS event: a received message and where it came from."""
    if attributes is None:
        sent = str(time.time_ns() // 1_000_000)
        attributes = {
            "ApproximateReceiveCount": "1",
            "SentTimestamp": sent,
            "SenderId": queue_arn.split(":")[4] if queue_arn.count(":") >= 5 else "123456789012",
            "ApproximateFirstReceiveTimestamp": sent,
        }
    return {
        "messageId": message_id or str(uuid.uuid4()),
        "receiptHandle": receipt_handle or uuid.uuid4().hex,
        "body": body,
        "attributes": dict(attributes),
        "messageAttributes": dict(message_attributes or {}),
        "md5OfBody": hashlib.md5(body.encode()).hexdigest() if md5_of_body is None else md5_of_body,  # noqa: S324 - SQS's checksum
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": region,
    }


def records(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """An event of these records (S3's notification and Lambda's SQS event alike)."""
    return {"Records": list(items)}
