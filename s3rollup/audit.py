"""The tamper-evident audit log: one hash chain per dataset in the audit table.

Each record holds its sequence number, UTC time, event type, actor, object identity and
decision, ``prev_hash`` and ``hash`` = SHA-256 over the canonical JSON of everything else.
The chain head (seq 0) holds the last sequence number and hash. An append is one DynamoDB
transaction that puts the record only if its seq is new and moves the head only if it still
points where the writer read it, so concurrent writers never fork the chain, leave a gap or
write a record twice; a writer that loses the race reads the head again and retries.

Callers may add their own items to the same transaction (e.g. registering a part), so a
decision and its audit record are written together or not at all.

Records never hold cell values or personal data: only keys, versions, checksums, counts
and reason codes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from .aws import object_at
from .contract import result_key
from .errors import AuditError

GENESIS = "0" * 64
HEAD_SEQ = 0
# Fields a record may carry besides the chain bookkeeping; anything else is refused so
# that no caller can put a cell value into the audit trail by accident.
FIELDS = (
    "key",
    "version_id",
    "etag",
    "sha256",
    "size",
    "rows",
    "decision",
    "reason",
    "job_id",
    "objects",
    "parts",
    "detail",
)


class Duplicate(Exception):
    """A condition on one of the caller's own transaction items failed."""

    def __init__(self, index: int, reason: dict[str, Any]) -> None:
        super().__init__(f"condition on transaction item {index} failed")
        self.index = index
        self.reason = reason


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes the record's hash is computed over (everything but ``hash``)."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical record."""
    return hashlib.sha256(canonical(record)).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Problem:
    """The first thing wrong with a chain."""

    seq: int
    code: str
    message: str


def _record(item: dict[str, Any]) -> dict[str, Any]:
    """A record as stored (a chain item), with its item's sequence key as ``_seq_key``."""
    record: dict[str, Any] = json.loads(item["record"]["S"])
    record["_seq_key"] = int(item["seq"]["N"])
    return record


class AuditLog:
    """Append to and read the audit chains of one table."""

    def __init__(self, dynamodb: Any, table: str, max_attempts: int = 60) -> None:
        self._db = dynamodb
        self.table = table
        self.max_attempts = max_attempts

    # ---- writing ----------------------------------------------------------------------------

    def _head(self, chain: str) -> tuple[int, str]:
        item = self._db.get_item(
            TableName=self.table,
            Key={"chain": {"S": chain}, "seq": {"N": str(HEAD_SEQ)}},
            ConsistentRead=True,
        ).get("Item")
        if not item:
            return 0, GENESIS
        return int(item["head_seq"]["N"]), item["head_hash"]["S"]

    def append(
        self,
        chain: str,
        event: str,
        actor: str,
        extra_items: Sequence[dict[str, Any]] = (),
        **fields: Any,
    ) -> dict[str, Any]:
        """Append one record (and the caller's extra transaction items) to a chain.

        Raises Duplicate when a condition on one of ``extra_items`` fails (nothing is
        written), AuditError when the chain stays contended past ``max_attempts``.
        """
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise AuditError(f"audit record fields not allowed: {sorted(unknown)}")
        body = {k: v for k, v in fields.items() if v is not None}
        for attempt in range(self.max_attempts):
            seq, prev = self._head(chain)
            record: dict[str, Any] = {
                "chain": chain,
                "seq": seq + 1,
                "time": _now(),
                "event": event,
                "actor": actor,
                **body,
                "prev_hash": prev,
            }
            record["hash"] = record_hash(record)
            head_condition = (
                {"ConditionExpression": "attribute_not_exists(seq)"}
                if seq == 0
                else {
                    "ConditionExpression": "head_seq = :s",
                    "ExpressionAttributeValues": {":s": {"N": str(seq)}},
                }
            )
            items = [
                {
                    "Put": {
                        "TableName": self.table,
                        "Item": {
                            "chain": {"S": chain},
                            "seq": {"N": str(seq + 1)},
                            "record": {"S": canonical_json(record)},
                        },
                        "ConditionExpression": "attribute_not_exists(seq)",
                    }
                },
                {
                    "Put": {
                        "TableName": self.table,
                        "Item": {
                            "chain": {"S": chain},
                            "seq": {"N": str(HEAD_SEQ)},
                            "head_seq": {"N": str(seq + 1)},
                            "head_hash": {"S": record["hash"]},
                        },
                        **head_condition,
                    }
                },
                *extra_items,
            ]
            try:
                self._db.transact_write_items(TransactItems=items)
                return record
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "TransactionCanceledException":
                    raise AuditError(f"audit append failed: {exc.response['Error']['Code']}") from exc
                reasons = exc.response.get("CancellationReasons") or []
                for i, reason in enumerate(reasons[2:], start=2):
                    if reason.get("Code") == "ConditionalCheckFailed":
                        raise Duplicate(i - 2, dict(reason)) from exc
                # Lost the race for the head (or a transaction conflict): read it again.
                time.sleep(min(0.5, 0.005 * (2 ** min(attempt, 6))) * random.random())
        raise AuditError(f"audit chain stayed contended for {self.max_attempts} attempts")

    # ---- reading ----------------------------------------------------------------------------

    def records(self, chain: str) -> Iterator[dict[str, Any]]:
        """All records of a chain in sequence order (the head is not a record)."""
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": "chain = :c AND seq > :z",
            "ExpressionAttributeValues": {":c": {"S": chain}, ":z": {"N": str(HEAD_SEQ)}},
            "ConsistentRead": True,
        }
        while True:
            page = self._db.query(**kwargs)
            for item in page.get("Items", []):
                yield _record(item)
            if "LastEvaluatedKey" not in page:
                return
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def last(self, chain: str) -> dict[str, Any] | None:
        """The chain's last record, read through its head: two reads however long the chain
        is. None when the chain is empty."""
        seq, _ = self._head(chain)
        if seq == 0:
            return None
        item = self._db.get_item(
            TableName=self.table,
            Key={"chain": {"S": chain}, "seq": {"N": str(seq)}},
            ConsistentRead=True,
        ).get("Item")
        if item is None:
            raise AuditError(f"audit chain {chain!r}: its head names record {seq}, which is missing")
        return _record(item)

    def head(self, chain: str) -> tuple[int, str]:
        """(last sequence number, last hash) of a chain; (0, GENESIS) when empty."""
        return self._head(chain)

    def verify(self, chain: str) -> tuple[int, Problem | None]:
        """Walk the chain: hashes, links, continuity and the head. Returns (records, problem).

        The head is read first and the records up to it are checked: record and head move in
        one transaction, so that prefix is consistent even while writers keep appending.
        """
        head_seq, head_hash = self._head(chain)
        expected_prev, expected_seq, count = GENESIS, 1, 0
        for record in self.records(chain):
            seq_key = record.pop("_seq_key")
            if seq_key > head_seq and count == head_seq:
                break  # appended after the head was read
            seq = record.get("seq")
            if seq_key != expected_seq:
                return count, Problem(expected_seq, "GAP", f"record {expected_seq} is missing")
            if seq != seq_key:
                return count, Problem(seq_key, "SEQ_MISMATCH", f"record {seq_key} says seq {seq}")
            if record.get("chain") != chain:
                return count, Problem(seq_key, "WRONG_CHAIN", f"record {seq_key} names another chain")
            if record.get("prev_hash") != expected_prev:
                return count, Problem(
                    seq_key, "BROKEN_LINK", f"record {seq_key} does not link to its predecessor"
                )
            if record_hash(record) != record.get("hash"):
                return count, Problem(seq_key, "BAD_HASH", f"record {seq_key} was altered")
            expected_prev, expected_seq, count = record["hash"], expected_seq + 1, count + 1
        if (head_seq, head_hash) != (count, expected_prev):
            return count, Problem(
                count + 1 if head_seq > count else head_seq,
                "HEAD_MISMATCH",
                f"chain head points at record {head_seq} but the chain ends at {count}",
            )
        return count, None


def verify_results(records: list[dict[str, Any]], s3: Any, bucket: str, dataset: str) -> Problem | None:
    """Check every RESULT_WRITTEN record's checksums against the object versions in S3.

    A version that no longer exists (removed by lifecycle) is not a failure; a version
    whose bytes differ from the recorded SHA-256 is.
    """
    for record in records:
        if record.get("event") != "RESULT_WRITTEN":
            continue
        for name, ref in sorted((record.get("objects") or {}).items()):
            where = object_at(bucket, result_key(dataset, name), ref.get("version_id"))
            try:
                data = s3.get_object(**where)["Body"].read()
            except ClientError as exc:
                if exc.response["Error"]["Code"] in ("NoSuchKey", "NoSuchVersion", "404"):
                    continue
                raise
            if hashlib.sha256(data).hexdigest() != ref.get("sha256"):
                return Problem(
                    int(record["seq"]),
                    "RESULT_CHANGED",
                    f"record {record['seq']}: {name} differs from its checksum",
                )
    return None


def verify_tree(records: list[dict[str, Any]], s3: Any, bucket: str, dataset: str) -> Problem | None:
    """Check the segments of the latest published manifest: each read at the version its
    parent names and checked against the SHA-256 there. The root's own SHA-256 is the latest
    RESULT_WRITTEN record's (verify_results), so every part the result names is covered."""
    from .manifest import ManifestError, Objects, entries

    latest = next((r for r in reversed(records) if r.get("event") == "RESULT_WRITTEN"), None)
    ref = ((latest or {}).get("objects") or {}).get("manifest.json")
    if latest is None or ref is None:
        return None
    try:
        data = s3.get_object(**object_at(bucket, result_key(dataset, "manifest.json"), ref.get("version_id")))
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("NoSuchKey", "NoSuchVersion", "404"):
            return None  # verify_results has said whether that may be
        raise
    tree = json.loads(data["Body"].read()).get("tree")
    if tree is None:
        return None  # a manifest of the previous format lists its parts itself
    try:
        entries(Objects(s3, bucket), tree)
    except ManifestError as exc:
        return Problem(int(latest["seq"]), exc.code, f"record {latest['seq']}: {exc}")
    return None


ANCHOR_PREFIX = "audit-heads/"


def export_head(log: AuditLog, s3: Any, bucket: str, chain: str) -> dict[str, Any]:
    """Write the chain head to the Object Lock bucket (its default retention locks it)."""
    seq, head_hash = log.head(chain)
    anchor = {"chain": chain, "seq": seq, "hash": head_hash, "time": _now()}
    body = json.dumps(anchor, sort_keys=True).encode()
    s3.put_object(
        Bucket=bucket,
        Key=f"{ANCHOR_PREFIX}{chain}/{seq:012d}.json",
        Body=body,
        # Object Lock buckets refuse writes without an integrity header.
        ContentMD5=base64.b64encode(hashlib.md5(body).digest()).decode(),  # noqa: S324
        ContentType="application/json",
    )
    return anchor


def verify_anchors(
    records: list[dict[str, Any]], s3: Any, bucket: str, chain: str
) -> tuple[int, Problem | None]:
    """Check that every exported chain head still matches the chain. Returns (anchors, problem)."""
    by_seq = {int(r["seq"]): r for r in records}
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{ANCHOR_PREFIX}{chain}/"
    ):
        for obj in page.get("Contents", []):
            anchor = json.loads(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
            count += 1
            seq = int(anchor["seq"])
            if seq == 0:
                continue
            record = by_seq.get(seq)
            if record is None:
                return count, Problem(
                    seq, "ANCHOR_MISSING", f"an exported head names record {seq}, which is gone"
                )
            if record.get("hash") != anchor["hash"]:
                return count, Problem(seq, "ANCHOR_MISMATCH", f"record {seq} differs from its exported head")
    return count, None


def verify_dataset(
    log: AuditLog, s3: Any, bucket: str, anchor_bucket: str, chain: str
) -> tuple[int, int, Problem | None]:
    """Everything `audit verify` checks: the chain, the result checksums it records, and the
    exported heads. Returns (records, anchors, first problem or None)."""
    count, problem = log.verify(chain)
    if problem is not None:
        return count, 0, problem
    records = list(log.records(chain))
    problem = verify_results(records, s3, bucket, chain) or verify_tree(records, s3, bucket, chain)
    if problem is not None or not anchor_bucket:
        return count, 0, problem
    anchors, problem = verify_anchors(records, s3, anchor_bucket, chain)
    return count, anchors, problem


def exactly_once_problems(records: Sequence[dict[str, Any]], crashed: Collection[str] = ()) -> list[str]:
    """What in a dataset's chain breaks exactly-once: a part version accepted or aggregated
    more than once, or a job started before the one before it ended (a job in ``crashed``,
    known dead, ends where the next one starts). Empty when nothing."""
    problems = []
    for event in ("PART_ACCEPTED", "PART_AGGREGATED"):
        seen: set[tuple[str, str]] = set()
        for r in records:
            if r.get("event") == event:
                version = (str(r.get("key")), str(r.get("version_id")))
                if version in seen:
                    problems.append(f"record {r['seq']}: a second {event} for one part version")
                seen.add(version)
    running = None
    for r in records:
        if r.get("event") == "JOB_STARTED":
            if running is not None and running not in crashed:
                problems.append(f"record {r['seq']}: job {r.get('job_id')} started while {running} ran")
            running = r.get("job_id")
        elif r.get("event") in ("JOB_FINISHED", "JOB_FAILED"):
            running = None
    return problems


def canonical_json(record: dict[str, Any]) -> str:
    """The stored form of a record: canonical JSON including its hash."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
