"""S3 notifications → decisions on parts (the Lambda side; standard library and boto3 only).

Events are triggers, not truth: S3 delivers them at least once, unordered, and may drop
them. For every event the key is resolved to its *current* state in the bucket (HEAD), so
a late or repeated event can never undo a newer decision, and a missing delete event is
caught by reconciling against a listing.

For each current version of a part, exactly one decision is recorded: the state-table
registration and its audit record are written in one transaction that fails when that
version already has one.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from botocore.exceptions import ClientError

from . import validate
from .audit import AuditLog, Duplicate
from .aws import object_at
from .config import Settings
from .contract import (
    INCOMING,
    Contract,
    ContractError,
    PartKey,
    check_dataset,
    contract_key,
    load_contract,
    parse_part_key,
    quarantine_key,
)
from .errors import AwsError, S3RollupError, reason_code
from .launch import Launcher
from .state import AGGREGATED, PENDING, REJECTED, REMOVED, State

log = logging.getLogger(__name__)

UNROUTED_CHAIN = "_unrouted"  # audit chain for keys that name no valid dataset


@dataclass(frozen=True)
class S3Event:
    """One S3 notification record, decoded."""

    event_name: str
    bucket: str
    key: str
    size: int | None = None
    etag: str | None = None
    version_id: str | None = None
    sequencer: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What ingest decided about one event."""

    decision: str  # ACCEPTED, REJECTED, REMOVED, DUPLICATE, IGNORED, GONE
    dataset: str = ""
    reason: str = "OK"
    job: str = ""
    # The decision changed what the published result must hold (a change marker was written).
    changed: bool = False


def parse_notification(body: dict[str, Any]) -> list[S3Event]:
    """The S3 records of a notification; an s3:TestEvent has none."""
    if body.get("Event") == "s3:TestEvent":
        return []
    events = []
    for rec in body.get("Records", []):
        if rec.get("eventSource") != "aws:s3":
            continue
        obj = rec["s3"]["object"]
        events.append(
            S3Event(
                event_name=str(rec.get("eventName", "")),
                bucket=rec["s3"]["bucket"]["name"],
                # S3 URL-encodes keys in notifications ('+' is a space).
                key=unquote_plus(obj["key"]),
                size=obj.get("size"),
                etag=obj.get("eTag"),
                version_id=obj.get("versionId"),
                sequencer=obj.get("sequencer"),
            )
        )
    return events


def list_current(s3: Any, bucket: str, dataset: str) -> Iterable[dict[str, Any]]:
    """Current (latest, not deleted) object versions under incoming/<dataset>/."""
    for page in s3.get_paginator("list_object_versions").paginate(
        Bucket=bucket, Prefix=f"incoming/{dataset}/"
    ):
        for v in page.get("Versions", []):
            if v.get("IsLatest"):
                yield v


class RangeReader:
    """Ranged GETs of one object version, counting the bytes requested."""

    def __init__(self, s3: Any, bucket: str, key: str, version_id: str | None) -> None:
        self._s3, self.bucket, self.key, self.version_id = s3, bucket, key, version_id
        self.bytes_requested = 0

    def read(self, start: int, end: int) -> bytes:
        """Bytes start..end (inclusive)."""
        self.bytes_requested += end - start + 1
        where = object_at(self.bucket, self.key, self.version_id)
        body: bytes = self._s3.get_object(**where, Range=f"bytes={start}-{end}")["Body"].read()
        return body


class Ingest:
    """Decides on parts, records the decisions, and makes sure a job runs for the dataset.

    Without a launcher (the job's own reconcile, under the lease it holds) it decides and
    records only: it never touches a lease, since taking a free or expired one would make a
    job that never runs.
    """

    def __init__(
        self,
        settings: Settings,
        s3: Any,
        dynamodb: Any,
        launcher: Launcher | None,
        limits: validate.Limits | None = None,
        contract_ttl: float = 30.0,
    ) -> None:
        self.settings = settings
        self._s3 = s3
        self.audit = AuditLog(dynamodb, settings.audit_table)
        self.state = State(dynamodb, settings.state_table)
        self.launcher = launcher
        self.limits = limits or validate.Limits(max_part_bytes=settings.max_part_bytes)
        self._contracts: dict[str, tuple[float, Contract]] = {}
        self._contract_ttl = contract_ttl
        self.bytes_read = 0

    # ---- entry points -----------------------------------------------------------------------

    def handle(self, event: S3Event, actor: str) -> Outcome:
        """Decide on the key an event names (in the state the bucket has now)."""
        if event.bucket != self.settings.bucket:
            log.warning("event for another bucket ignored", extra={"reason": "OTHER_BUCKET"})
            return Outcome("IGNORED", reason="OTHER_BUCKET")
        try:
            part = parse_part_key(event.key)
        except ContractError as exc:
            if exc.code == "NOT_INCOMING":
                return Outcome("IGNORED", reason=exc.code)
            return self._unroutable(event, exc, actor)
        try:
            return self.sync(part, actor)
        except Exception as exc:
            # The message goes back to the queue (and, after its last try, to the DLQ): say so
            # in the dataset's chain, so no failed delivery is only a log line.
            self._audit_failure(part, exc, actor)
            raise

    def _audit_failure(self, part: PartKey, exc: Exception, actor: str) -> None:
        code = reason_code(exc)
        log.error("ingest failed", extra={"dataset": part.dataset, "part_id": part.part_id, "reason": code})
        try:
            self.audit.append(part.dataset, "INGEST_FAILED", actor, key=part.key, reason=code)
        except Exception as audit_exc:  # the audit table may be what is failing
            log.error(
                "ingest failure not audited",
                extra={"dataset": part.dataset, "reason": type(audit_exc).__name__},
            )

    def sync(self, part: PartKey, actor: str) -> Outcome:
        """Bring the registry in line with the key's current state, then ensure a job."""
        head = self._head(part.key)
        outcome = self._removed(part, actor) if head is None else self._decide(part, head, actor)
        if self.launcher is not None and (
            outcome.changed or (outcome.decision == "DUPLICATE" and outcome.reason == PENDING)
        ):
            job = self.ensure_job(part.dataset, actor)
            return Outcome(outcome.decision, outcome.dataset, outcome.reason, job, outcome.changed)
        return outcome

    def reconcile(self, dataset: str, actor: str) -> list[Outcome]:
        """Compare incoming/<dataset>/ with the registry and decide on every difference; then
        ensure a job while any registered part still waits for one."""
        listed = {o["Key"]: o for o in self.list_current(dataset)}
        registered = {p.key: p for p in self.state.parts(dataset)}
        outcomes = []
        for key in sorted(set(listed) | set(registered)):
            reg, obj = registered.get(key), listed.get(key)
            if (
                obj is not None
                and reg is not None
                and reg.version_id == obj["VersionId"]
                and reg.status != REMOVED
            ):
                continue
            if obj is None and (reg is None or reg.status == REMOVED):
                continue
            outcomes.append(self.sync(parse_part_key(key), actor))
        # A part whose launch failed for good (its message went to the DLQ) is still PENDING:
        # without this it would wait for the dataset's next event.
        if self.launcher is not None and not any(o.job for o in outcomes):
            # With no decision made, the registry is still what was just read.
            parts = self.state.parts(dataset) if outcomes else registered.values()
            if any(p.needs_partial for p in parts):
                self.ensure_job(dataset, actor)
        return outcomes

    def reconcile_all(self, actor: str, start: int = 0, deadline: float | None = None) -> list[str]:
        """Reconcile every dataset under incoming/; return the names whose reconcile failed.

        One dataset's failure (logged with its reason) does not stop the others. This is the
        safety net for lost events and for launches that failed for good: the local
        dispatcher runs it every few seconds, the function on a schedule.

        ``start`` rotates the order (dataset ``start % n`` first) and ``deadline`` (a
        ``time.monotonic()`` value) stops before a dataset that would begin after it: a run
        that cannot reach every dataset says how many it left (a warning), and a later run
        with another ``start`` leads with others, so no dataset is always the one left.
        """
        names = self.datasets()
        if names:
            names = names[start % len(names) :] + names[: start % len(names)]
        failed = []
        for done, dataset in enumerate(names):
            if deadline is not None and time.monotonic() >= deadline:
                log.warning("reconcile stopped at its deadline", extra={"left": len(names) - done})
                break
            try:
                self.reconcile(dataset, actor)
            except Exception as exc:
                code = reason_code(exc)
                log.error("reconcile failed", extra={"dataset": dataset, "reason": code})
                failed.append(dataset)
        return failed

    def datasets(self) -> list[str]:
        """The datasets that have a prefix under incoming/, by name."""
        prefixes: set[str] = set()
        for page in self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.settings.bucket, Prefix=INCOMING, Delimiter="/"
        ):
            prefixes.update(p["Prefix"][len(INCOMING) : -1] for p in page.get("CommonPrefixes", []))
        names = []
        for prefix in sorted(prefixes):
            try:
                names.append(check_dataset(prefix))
            except ContractError as exc:
                # Its keys were rejected (and audited) when their events came; the name itself
                # may be personal data, so only the reason is logged.
                log.warning("prefix names no dataset", extra={"reason": exc.code})
        return names

    def list_current(self, dataset: str) -> Iterable[dict[str, Any]]:
        """Current (latest, not deleted) object versions under incoming/<dataset>/."""
        return list_current(self._s3, self.settings.bucket, dataset)

    # ---- decisions --------------------------------------------------------------------------

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self._s3.head_object(Bucket=self.settings.bucket, Key=key)
            return head
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return None
            raise AwsError(f"HEAD failed: {exc.response['Error']['Code']}", "S3_HEAD") from exc

    def contract(self, dataset: str) -> Contract:
        """The dataset's contract (cached briefly); the default when there is none."""
        cached = self._contracts.get(dataset)
        if cached and time.monotonic() - cached[0] < self._contract_ttl:
            return cached[1]
        try:
            raw = self._s3.get_object(Bucket=self.settings.bucket, Key=contract_key(dataset))["Body"].read()
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("NoSuchKey", "404"):
                raise AwsError(f"contract read failed: {exc.response['Error']['Code']}", "S3_GET") from exc
            raw = None
        contract = load_contract(raw, self.settings.min_group_size)
        self._contracts[dataset] = (time.monotonic(), contract)
        return contract

    def _decide(self, part: PartKey, head: dict[str, Any], actor: str) -> Outcome:
        version = str(head.get("VersionId") or "null")
        etag = str(head.get("ETag", "")).strip('"')
        size = int(head.get("ContentLength", 0))
        existing = self.state.get_part(part.dataset, part.key)
        if existing and existing.version_id == version and existing.status != REMOVED:
            return Outcome("DUPLICATE", part.dataset, existing.status)
        try:
            contract = self.contract(part.dataset)
        except ContractError as exc:
            verdict = validate.Verdict(ok=False, code=exc.code, message=str(exc))
        else:
            verdict = self._validate(part, version, size, contract)
        status = PENDING if verdict.ok else REJECTED
        event = "PART_ACCEPTED" if verdict.ok else "PART_REJECTED"
        # A rejected version changes the result only when it replaces an accepted one.
        changed = verdict.ok or (existing is not None and existing.status in (PENDING, AGGREGATED))
        try:
            self.audit.append(
                part.dataset,
                event,
                actor,
                extra_items=[
                    self.state.register_item(
                        part.dataset,
                        part.key,
                        version,
                        etag,
                        size,
                        status,
                        "" if verdict.ok else verdict.code,
                    ),
                    *([self.state.change_item(part.dataset, part.key)] if changed else []),
                ],
                key=part.key,
                version_id=version,
                etag=etag,
                size=size,
                decision=status,
                reason=verdict.code,
                detail={"format": verdict.fmt, "line": verdict.line} if verdict.fmt or verdict.line else None,
            )
        except Duplicate:
            return Outcome("DUPLICATE", part.dataset, status)
        if not verdict.ok:
            self._quarantine(part, version, verdict)
            log.warning(
                "part rejected",
                extra={
                    "dataset": part.dataset,
                    "part_id": part.part_id,
                    "reason": verdict.code,
                    "line": verdict.line,
                },
            )
            return Outcome("REJECTED", part.dataset, verdict.code, changed=changed)
        log.info("part accepted", extra={"dataset": part.dataset, "part_id": part.part_id, "size": size})
        return Outcome("ACCEPTED", part.dataset, changed=True)

    def _validate(self, part: PartKey, version: str, size: int, contract: Contract) -> validate.Verdict:
        # At most limits.head_bytes in all: the head, and the footer window only for a
        # large Parquet part. The reads are pinned to the version HEAD returned.
        reader = RangeReader(self._s3, self.settings.bucket, part.key, version)
        ranges = validate.plan_reads(size, self.limits)
        head = reader.read(*ranges[0]) if ranges else b""
        tail = None
        if len(ranges) > 1 and validate.needs_tail(size, head, self.limits):
            tail = reader.read(*ranges[1])
        self.bytes_read += reader.bytes_requested
        verdict = validate.validate_part(size, head, tail, contract, self.limits)
        if verdict.code in validate.RETRYABLE_CODES:
            # The object changed under us: decide again on redelivery, quarantine nothing.
            raise AwsError(f"part changed while being validated ({verdict.code})", verdict.code)
        return verdict

    def _removed(self, part: PartKey, actor: str) -> Outcome:
        existing = self.state.get_part(part.dataset, part.key)
        if existing is None or existing.status == REMOVED:
            return Outcome("GONE", part.dataset, "NOT_REGISTERED")
        try:
            self.audit.append(
                part.dataset,
                "PART_REMOVED",
                actor,
                extra_items=[
                    self.state.remove_item(part.dataset, part.key),
                    self.state.change_item(part.dataset, part.key),
                ],
                key=part.key,
                version_id=existing.version_id,
                etag=existing.etag,
                decision=REMOVED,
                reason="DELETED",
            )
        except Duplicate:
            return Outcome("DUPLICATE", part.dataset, REMOVED)
        log.info("part removed", extra={"dataset": part.dataset, "part_id": part.part_id})
        return Outcome("REMOVED", part.dataset, "DELETED", changed=True)

    def _unroutable(self, event: S3Event, exc: ContractError, actor: str) -> Outcome:
        # The key names no valid dataset: nothing to register; the object stays where it is.
        self.audit.append(
            UNROUTED_CHAIN,
            "PART_REJECTED",
            actor,
            key=event.key,
            decision=REJECTED,
            reason=exc.code,
        )
        log.warning("key names no dataset", extra={"reason": exc.code})
        return Outcome("REJECTED", reason=exc.code)

    def _quarantine(self, part: PartKey, version: str, verdict: validate.Verdict) -> None:
        target = quarantine_key(part)
        sse = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self.settings.kms_key_arn}
        source = object_at(self.settings.bucket, part.key, version)
        try:
            self._s3.copy_object(Bucket=self.settings.bucket, Key=target, CopySource=source, **sse)
            reason = {
                "code": verdict.code,
                "message": verdict.message,
                "line": verdict.line,
                "key": part.key,
                "version_id": version,
            }
            self._s3.put_object(
                Bucket=self.settings.bucket,
                Key=target + ".reason.json",
                Body=json.dumps(reason, indent=2).encode(),
                ContentType="application/json",
                **sse,
            )
        except ClientError as exc:
            # The original version stays in incoming/ (versioned), so nothing is lost.
            raise AwsError(f"quarantine copy failed: {exc.response['Error']['Code']}", "QUARANTINE") from exc

    # ---- jobs -------------------------------------------------------------------------------

    def ensure_job(self, dataset: str, actor: str) -> str:
        """Start a job for the dataset unless one holds its lease (that one picks the part up)."""
        if self.launcher is None:
            raise S3RollupError("this Ingest has no launcher: it cannot start jobs", "NO_LAUNCHER")
        job_id = uuid.uuid4().hex
        if not self.state.acquire_lease(dataset, job_id, self.settings.lease_seconds):
            return ""
        try:
            task = self.launcher.launch(dataset, job_id)
        except Exception:
            self.state.release_lease(dataset, job_id)
            raise
        self.audit.append(dataset, "JOB_LAUNCHED", actor, job_id=job_id, detail={"task": task})
        return job_id
