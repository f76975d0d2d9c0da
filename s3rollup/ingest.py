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

import bisect
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
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
from .state import AGGREGATED, PENDING, REJECTED, REMOVED, Part, State

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


PAGE_KEYS = 1000  # keys per reconcile page: S3's largest listing page, and the registry's
SYNCS_PER_PAGE = 5  # a reconcile pass decides at most this many keys per page of its budget


@dataclass
class ReconcilePass:
    """What one reconcile pass over a dataset did."""

    dataset: str
    started_after: str  # the saved cursor it started from ("": the start of the prefix)
    next_after: str = ""  # where the next pass starts; "": this pass completed the sweep
    pages: int = 0  # S3 LIST and registry Query requests
    compared: int = 0  # keys listed or registered that it compared
    deferred: int = 0  # disagreeing objects younger than the grace window, left for later
    outcomes: list[Outcome] = field(default_factory=list)  # one per key decided


class _Pages:
    """One side of the walk: the unread rest of its last page, and the key that page ends at
    (None: the side is read to its end)."""

    def __init__(self, fetch: Callable[[str], tuple[list[tuple[str, Any]], bool]]) -> None:
        self._fetch = fetch
        self.rows: list[tuple[str, Any]] = []
        self.end: str | None = None
        self.loaded = False

    def load(self, after: str) -> None:
        self.rows, more = self._fetch(after)
        self.end = (self.rows[-1][0] if self.rows else after) if more else None
        self.loaded = True

    def take(self, upto: str | None) -> list[tuple[str, Any]]:
        """The rows up to ``upto`` (all of them for None), removed from the page."""
        if upto is None:
            taken, self.rows = self.rows, []
            return taken
        i = bisect.bisect_right([k for k, _ in self.rows], upto)
        taken, self.rows = self.rows[:i], self.rows[i:]
        return taken


def _least_end(a: str | None, b: str | None) -> str | None:
    if a is None:
        return b
    return a if b is None else min(a, b)


def _merge(
    listed: list[tuple[str, Any]], registered: list[tuple[str, Any]]
) -> Iterator[tuple[str, dict[str, Any] | None, Part | None]]:
    """(key, listing entry, registry entry) for every key on either side, in key order.
    Python orders str by code point, which is the UTF-8 byte order S3 and DynamoDB use."""
    objs, regs = dict(listed), dict(registered)
    for key in sorted(objs.keys() | regs.keys()):
        yield key, objs.get(key), regs.get(key)


def _agree(obj: dict[str, Any] | None, reg: Part | None) -> bool:
    """True when the registry already holds the listed object's decision (or its removal)."""
    if obj is None:
        return reg is None or reg.status == REMOVED
    if reg is None or reg.status == REMOVED:
        return False
    if reg.etag != str(obj.get("ETag", "")).strip('"') or reg.size != int(obj.get("Size", -1)):
        return False
    # HEAD's Last-Modified has whole seconds, a listing's may have milliseconds.
    return reg.modified < 0 or abs(obj["LastModified"].timestamp() - reg.modified) < 1


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
        self.page_keys = PAGE_KEYS  # keys per reconcile page (tests make pages small)

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

    def reconcile(self, dataset: str, actor: str) -> ReconcilePass:
        """One bounded pass of the dataset's sweep: walk the listing of incoming/<dataset>/
        and the registry side by side from the saved cursor, both in key order, and bring
        every key where they disagree in line (``sync``); then ensure a job while a part
        waits for one.

        A pass reads at most ``settings.reconcile_pages`` pages (S3 LIST and registry Query
        of ``page_keys`` keys, 1,000) and decides at most ``SYNCS_PER_PAGE`` keys per page of
        that budget, whatever the number of parts; it saves where it stopped, and the pass
        that reaches the end of both starts the next sweep over. A key where listing and
        registry agree (same ETag, size and LastModified; removed and not listed) costs no
        request of its own. A disagreeing object written less than
        ``settings.reconcile_grace_seconds`` ago is left to its own event, which is most
        likely still on its way; the next pass that reaches it decides it if the event never
        came.
        """
        start = self.state.reconcile_cursor(dataset)
        done = ReconcilePass(dataset, start)
        budget = self.settings.reconcile_pages
        syncs_left = SYNCS_PER_PAGE * budget
        grace = self.settings.reconcile_grace_seconds
        fresh_after = time.time() - grace
        prefix = f"{INCOMING}{dataset}/"
        listing = _Pages(lambda after: self._listing_page(prefix, after))
        registry = _Pages(lambda after: self._registry_page(dataset, after))
        cursor, stopped = start, False
        try:
            while not stopped:
                for side in (listing, registry):
                    if not side.loaded:
                        if done.pages >= budget:
                            stopped = True
                            break
                        side.load(cursor)
                        done.pages += 1
                if stopped:
                    break
                upto = _least_end(listing.end, registry.end)
                for key, obj, reg in _merge(listing.take(upto), registry.take(upto)):
                    done.compared += 1
                    if _agree(obj, reg):
                        cursor = key
                        continue
                    if grace and obj is not None and obj["LastModified"].timestamp() > fresh_after:
                        done.deferred += 1
                        cursor = key
                        continue
                    if syncs_left == 0:
                        stopped = True
                        break
                    syncs_left -= 1
                    try:
                        part = parse_part_key(key)
                    except ContractError as exc:
                        # A folder marker or the like: its event was refused and audited.
                        log.warning("key under incoming/ names no part", extra={"reason": exc.code})
                    else:
                        done.outcomes.append(self.sync(part, actor))
                    cursor = key
                if stopped:
                    break
                if upto is None:  # both sides read to their end: the sweep is complete
                    cursor = ""
                    break
                cursor = upto
                for side in (listing, registry):
                    if side.end == upto:
                        side.loaded = False
        finally:
            # Kept also when a decision failed: the next pass starts at the key that failed.
            done.next_after = cursor
            if cursor != start or not cursor:
                self.state.save_reconcile_cursor(dataset, cursor)
        # A part whose launch failed for good (its message went to the DLQ) still waits:
        # without this it would wait for the dataset's next event.
        if (
            self.launcher is not None
            and not any(o.job for o in done.outcomes)
            and self.state.waiting(dataset)
        ):
            self.ensure_job(dataset, actor)
        log.info(
            "reconcile pass",
            extra={
                "dataset": dataset,
                "pages": done.pages,
                "compared": done.compared,
                "decided": len(done.outcomes),
                "deferred": done.deferred,
                "sweep_done": not done.next_after,
            },
        )
        return done

    def _listing_page(self, prefix: str, after: str) -> tuple[list[tuple[str, Any]], bool]:
        kwargs: dict[str, Any] = {"Bucket": self.settings.bucket, "Prefix": prefix, "MaxKeys": self.page_keys}
        if after:
            kwargs["StartAfter"] = after
        page = self._s3.list_objects_v2(**kwargs)
        return [(o["Key"], o) for o in page.get("Contents", [])], bool(page.get("IsTruncated"))

    def _registry_page(self, dataset: str, after: str) -> tuple[list[tuple[str, Any]], bool]:
        parts, more = self.state.parts_page(dataset, after, self.page_keys)
        return [(p.key, p) for p in parts], more

    def reconcile_all(self, actor: str, start: int = 0, deadline: float | None = None) -> list[str]:
        """One reconcile pass over every dataset under incoming/; return the names whose pass
        failed.

        One dataset's failure (logged with its reason) does not stop the others. This is the
        safety net for lost events and for launches that failed for good: the local
        dispatcher runs it every few seconds, the function on a schedule. Each pass is
        bounded (``reconcile``), so a run costs what the number of datasets says, not the
        number of their parts.

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
        modified = int(head["LastModified"].timestamp()) if head.get("LastModified") else -1
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
                        modified,
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
