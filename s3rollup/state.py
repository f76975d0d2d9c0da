"""The state table: the registry of parts and the per-dataset job lease.

Items (pk, sk):
- ``PART#<dataset>``, ``<key>``: the part's current version, etag, size, status
  (PENDING, AGGREGATED, REJECTED, REMOVED), reason code, rows and the version its partial
  was computed from.
- ``CHANGE#<dataset>``, ``<key>``: the part's registry entry changed since the published
  result was made (accepted, rejected, removed, marked stale); written in the same transaction
  as the change, with a fresh ``token``. A job reads these few items instead of the whole
  registry, and deletes each one (if its token is still the one it read) once a result that
  reflects it is published.
- ``LEASE#<dataset>``, ``LEASE``: the job that holds the dataset, until ``expires``.
- ``RECONCILE#<dataset>``, ``CURSOR``: the key the dataset's next reconcile pass starts after
  (none: at the start of the prefix), and when the last full sweep ended.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from .errors import S3RollupError

log = logging.getLogger(__name__)

PENDING, AGGREGATED, REJECTED, REMOVED = "PENDING", "AGGREGATED", "REJECTED", "REMOVED"


@dataclass(frozen=True)
class Part:
    """A registered part as the state table knows it."""

    dataset: str
    key: str
    version_id: str
    etag: str
    size: int
    status: str
    reason: str = ""
    rows: int = -1
    partial_version: str = ""
    partial_sha256: str = ""
    sha256: str = ""
    modified: int = -1  # the version's LastModified (epoch seconds) when decided; -1: not recorded

    @property
    def current(self) -> bool:
        """True when the part belongs in the result: accepted, with the partial of its version."""
        return self.status == AGGREGATED and self.partial_version == self.version_id

    @property
    def needs_partial(self) -> bool:
        """True when the part is accepted but its partial is missing or stale."""
        return self.status in (PENDING, AGGREGATED) and self.partial_version != self.version_id


def _part_from_item(item: dict[str, Any]) -> Part:
    def s(name: str) -> str:
        return item[name]["S"] if name in item else ""

    def n(name: str, default: int = -1) -> int:
        return int(item[name]["N"]) if name in item else default

    return Part(
        dataset=item["pk"]["S"].split("#", 1)[1],
        key=item["sk"]["S"],
        version_id=s("version_id"),
        etag=s("etag"),
        size=n("size", 0),
        status=s("status"),
        reason=s("reason"),
        rows=n("rows"),
        partial_version=s("partial_version"),
        partial_sha256=s("partial_sha256"),
        sha256=s("sha256"),
        modified=n("modified"),
    )


def _conditional(call: Any, **request: Any) -> bool:
    """Make one conditional write; False when its condition does not hold (nothing written)."""
    try:
        call(**request)
        return True
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
            return False
        raise


class State:
    """Parts and leases in the state table."""

    def __init__(self, dynamodb: Any, table: str) -> None:
        self._db = dynamodb
        self.table = table

    # ---- parts ------------------------------------------------------------------------------

    @staticmethod
    def part_pk(dataset: str) -> dict[str, Any]:
        """Partition key value of a dataset's parts."""
        return {"S": f"PART#{dataset}"}

    def register_item(
        self,
        dataset: str,
        key: str,
        version_id: str,
        etag: str,
        size: int,
        status: str,
        reason: str = "",
        modified: int = -1,
    ) -> dict[str, Any]:
        """A transaction item that records a decision on one version of a part, exactly once.

        It fails (ConditionalCheckFailed) when this version already has a decision, so N
        deliveries of the same event decide once; a version that was removed and has come
        back (its delete marker was deleted) is decided again.
        """
        item = {
            "pk": self.part_pk(dataset),
            "sk": {"S": key},
            "version_id": {"S": version_id},
            "etag": {"S": etag},
            "size": {"N": str(size)},
            "status": {"S": status},
            "updated": {"N": str(int(time.time()))},
        }
        if reason:
            item["reason"] = {"S": reason}
        if modified >= 0:
            item["modified"] = {"N": str(modified)}
        return {
            "Put": {
                "TableName": self.table,
                "Item": item,
                "ConditionExpression": ("attribute_not_exists(pk) OR version_id <> :v OR #st = :removed"),
                "ExpressionAttributeNames": {"#st": "status"},
                "ExpressionAttributeValues": {":v": {"S": version_id}, ":removed": {"S": REMOVED}},
            }
        }

    def remove_item(self, dataset: str, key: str) -> dict[str, Any]:
        """A transaction item that marks a registered part REMOVED (once)."""
        return {
            "Update": {
                "TableName": self.table,
                "Key": {"pk": self.part_pk(dataset), "sk": {"S": key}},
                "UpdateExpression": "SET #st = :removed, updated = :t REMOVE partial_version",
                "ConditionExpression": "attribute_exists(pk) AND #st <> :removed",
                "ExpressionAttributeNames": {"#st": "status"},
                "ExpressionAttributeValues": {
                    ":removed": {"S": REMOVED},
                    ":t": {"N": str(int(time.time()))},
                },
            }
        }

    def _part_update(
        self,
        part: Part,
        update: str,
        condition: str,
        values: dict[str, Any],
        names: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """A conditional transaction update of one registered part (``updated`` is set too)."""
        set_clause, _, remove_clause = update.partition(" REMOVE ")
        return {
            "Update": {
                "TableName": self.table,
                "Key": {"pk": self.part_pk(part.dataset), "sk": {"S": part.key}},
                "UpdateExpression": f"{set_clause}, updated = :t"
                + (f" REMOVE {remove_clause}" if remove_clause else ""),
                "ConditionExpression": condition,
                "ExpressionAttributeNames": {"#st": "status", **(names or {})},
                "ExpressionAttributeValues": {**values, ":t": {"N": str(int(time.time()))}},
            }
        }

    def aggregated_item(self, part: Part, rows: int, sha256: str, partial_sha256: str) -> dict[str, Any]:
        """A transaction item that marks a part's version AGGREGATED with its partial."""
        return self._part_update(
            part,
            "SET #st = :agg, #rows = :rows, sha256 = :sha, partial_version = :v, partial_sha256 = :psha",
            # Only if the part is still at the version the partial was computed from.
            "version_id = :v AND #st IN (:pending, :agg)",
            {
                ":agg": {"S": AGGREGATED},
                ":pending": {"S": PENDING},
                ":rows": {"N": str(rows)},
                ":sha": {"S": sha256},
                ":v": {"S": part.version_id},
                ":psha": {"S": partial_sha256},
            },
            {"#rows": "rows"},
        )

    def rejected_item(self, part: Part, reason: str) -> dict[str, Any]:
        """A transaction item that marks a part's version REJECTED by the worker."""
        return self._part_update(
            part,
            "SET #st = :rej, reason = :r REMOVE partial_version",
            "version_id = :v AND #st <> :rej",
            {":rej": {"S": REJECTED}, ":r": {"S": reason}, ":v": {"S": part.version_id}},
        )

    def stale_item(self, part: Part) -> dict[str, Any]:
        """A transaction item that drops an accepted part's partial: the next job recomputes it."""
        return self._part_update(
            part,
            "SET #st = :pending REMOVE partial_version, partial_sha256",
            # Only the version that was read, and only while it is accepted.
            "version_id = :v AND #st IN (:pending, :agg)",
            {":pending": {"S": PENDING}, ":agg": {"S": AGGREGATED}, ":v": {"S": part.version_id}},
        )

    def get_part(self, dataset: str, key: str) -> Part | None:
        """The registered part at key, or None."""
        item = self._db.get_item(
            TableName=self.table,
            Key={"pk": self.part_pk(dataset), "sk": {"S": key}},
            ConsistentRead=True,
        ).get("Item")
        return _part_from_item(item) if item else None

    def parts(self, dataset: str) -> list[Part]:
        """Every registered part of a dataset, in key order."""
        out: list[Part] = []
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": "pk = :pk",
            "ExpressionAttributeValues": {":pk": self.part_pk(dataset)},
            "ConsistentRead": True,
        }
        while True:
            page = self._db.query(**kwargs)
            out.extend(_part_from_item(i) for i in page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return out
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def get_parts(self, dataset: str, keys: Iterable[str]) -> dict[str, Part]:
        """The registered parts at keys (consistent reads, 100 per request), by key."""
        wanted = sorted(set(keys))
        out: dict[str, Part] = {}
        for i in range(0, len(wanted), 100):
            request: dict[str, Any] = {
                self.table: {
                    "Keys": [{"pk": self.part_pk(dataset), "sk": {"S": k}} for k in wanted[i : i + 100]],
                    "ConsistentRead": True,
                }
            }
            for attempt in range(10):
                page = self._db.batch_get_item(RequestItems=request)
                for item in page.get("Responses", {}).get(self.table, []):
                    part = _part_from_item(item)
                    out[part.key] = part
                request = page.get("UnprocessedKeys") or {}
                if not request:
                    break
                time.sleep(min(1.0, 0.05 * 2**attempt))
            else:
                raise S3RollupError("registry reads stayed throttled", "THROTTLED")
        return out

    # ---- change markers ---------------------------------------------------------------------

    @staticmethod
    def change_pk(dataset: str) -> dict[str, Any]:
        """Partition key value of a dataset's change markers."""
        return {"S": f"CHANGE#{dataset}"}

    def change_item(self, dataset: str, key: str) -> dict[str, Any]:
        """A transaction item that marks key as changed since the published result (goes in the
        same transaction as the registry change it announces)."""
        return {
            "Put": {
                "TableName": self.table,
                "Item": {
                    "pk": self.change_pk(dataset),
                    "sk": {"S": key},
                    "token": {"S": uuid.uuid4().hex},
                    "updated": {"N": str(int(time.time()))},
                },
            }
        }

    def changes(self, dataset: str) -> dict[str, str]:
        """The dataset's change markers: key -> token."""
        out: dict[str, str] = {}
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": "pk = :pk",
            "ExpressionAttributeValues": {":pk": self.change_pk(dataset)},
            "ProjectionExpression": "sk, #t",
            "ExpressionAttributeNames": {"#t": "token"},
            "ConsistentRead": True,
        }
        while True:
            page = self._db.query(**kwargs)
            out.update({i["sk"]["S"]: i["token"]["S"] for i in page.get("Items", [])})
            if "LastEvaluatedKey" not in page:
                return out
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def clear_change(self, dataset: str, key: str, token: str) -> bool:
        """Delete key's marker if it is still the one read (token); False when it changed since,
        so the newer change stays announced."""
        return _conditional(
            self._db.delete_item,
            TableName=self.table,
            Key={"pk": self.change_pk(dataset), "sk": {"S": key}},
            ConditionExpression="#t = :t",
            ExpressionAttributeNames={"#t": "token"},
            ExpressionAttributeValues={":t": {"S": token}},
        )

    def waiting(self, dataset: str) -> bool:
        """True when a change to the dataset's parts is not in its published result yet (one
        marker read, whatever the number of parts)."""
        page = self._db.query(
            TableName=self.table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": self.change_pk(dataset)},
            ProjectionExpression="sk",
            ConsistentRead=True,
            Limit=1,
        )
        return bool(page.get("Items"))

    def parts_page(self, dataset: str, after: str, limit: int) -> tuple[list[Part], bool]:
        """One query page of a dataset's parts in key order: at most ``limit`` parts whose key
        sorts after ``after`` ("": from the first), and whether more may follow. DynamoDB
        orders string sort keys by their UTF-8 bytes, as S3 orders a listing."""
        condition, values = "pk = :pk", {":pk": self.part_pk(dataset)}
        if after:
            condition, values = "pk = :pk AND sk > :after", {**values, ":after": {"S": after}}
        page = self._db.query(
            TableName=self.table,
            KeyConditionExpression=condition,
            ExpressionAttributeValues=values,
            Limit=limit,
            ConsistentRead=True,
        )
        return [_part_from_item(i) for i in page.get("Items", [])], "LastEvaluatedKey" in page

    def _cursor_key(self, dataset: str) -> dict[str, Any]:
        return {"pk": {"S": f"RECONCILE#{dataset}"}, "sk": {"S": "CURSOR"}}

    def reconcile_cursor(self, dataset: str) -> str:
        """The key the dataset's next reconcile pass starts after ("": the start)."""
        item = self._db.get_item(
            TableName=self.table, Key=self._cursor_key(dataset), ConsistentRead=True
        ).get("Item")
        return item["start_after"]["S"] if item and "start_after" in item else ""

    def save_reconcile_cursor(self, dataset: str, after: str) -> None:
        """Where the next pass starts; "" when a sweep has just ended (its time is kept as
        ``swept``) and the next one starts over."""
        now = {":t": {"N": str(int(time.time()))}}
        if after:
            update, values = "SET start_after = :a, updated = :t", {**now, ":a": {"S": after}}
        else:
            update, values = "SET updated = :t, swept = :t REMOVE start_after", now
        self._db.update_item(
            TableName=self.table,
            Key=self._cursor_key(dataset),
            UpdateExpression=update,
            ExpressionAttributeValues=values,
        )

    # ---- lease ------------------------------------------------------------------------------

    def _lease_key(self, dataset: str) -> dict[str, Any]:
        return {"pk": {"S": f"LEASE#{dataset}"}, "sk": {"S": "LEASE"}}

    def acquire_lease(self, dataset: str, job_id: str, seconds: int) -> bool:
        """Take the dataset's lease for job_id if it is free, expired or already ours."""
        now = int(time.time())
        return _conditional(
            self._db.put_item,
            TableName=self.table,
            Item={
                **self._lease_key(dataset),
                "job_id": {"S": job_id},
                "expires": {"N": str(now + seconds)},
                "taken": {"N": str(now)},
            },
            ConditionExpression="attribute_not_exists(pk) OR expires < :now OR job_id = :me",
            ExpressionAttributeValues={":now": {"N": str(now)}, ":me": {"S": job_id}},
        )

    def renew_lease(self, dataset: str, job_id: str, seconds: int) -> bool:
        """Extend our lease; False when it is no longer ours."""
        return _conditional(
            self._db.update_item,
            TableName=self.table,
            Key=self._lease_key(dataset),
            UpdateExpression="SET expires = :e",
            ConditionExpression="job_id = :me",
            ExpressionAttributeValues={
                ":e": {"N": str(int(time.time()) + seconds)},
                ":me": {"S": job_id},
            },
        )

    def release_lease(self, dataset: str, job_id: str) -> bool:
        """Give the lease back if we hold it."""
        return _conditional(
            self._db.delete_item,
            TableName=self.table,
            Key=self._lease_key(dataset),
            ConditionExpression="job_id = :me",
            ExpressionAttributeValues={":me": {"S": job_id}},
        )

    def lease(self, dataset: str) -> dict[str, Any] | None:
        """The current lease item (job_id, expires) or None."""
        item = self._db.get_item(TableName=self.table, Key=self._lease_key(dataset), ConsistentRead=True).get(
            "Item"
        )
        if not item:
            return None
        return {"job_id": item["job_id"]["S"], "expires": int(item["expires"]["N"])}


class LeaseKeeper:
    """Renews a job's lease every third of its length while the job works, so a job longer
    than the lease keeps it; ``check`` fails once the lease is someone else's."""

    def __init__(self, state: State, dataset: str, job_id: str, seconds: int) -> None:
        self.state, self.dataset, self.job_id, self.seconds = state, dataset, job_id, seconds
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="s3rollup-lease", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(max(self.seconds / 3, 0.1)):
            try:
                if not self.state.renew_lease(self.dataset, self.job_id, self.seconds):
                    self.lost.set()
                    return
            except Exception as exc:  # a failed renewal is retried; the lease has time left
                log.warning(
                    "lease renewal failed", extra={"dataset": self.dataset, "error": type(exc).__name__}
                )

    def check(self) -> None:
        """Raise LEASE_LOST unless the lease is still ours (renewing it now)."""
        if self.lost.is_set() or not self.state.renew_lease(self.dataset, self.job_id, self.seconds):
            self.lost.set()
            raise S3RollupError("the job's lease was taken by another job", "LEASE_LOST")
