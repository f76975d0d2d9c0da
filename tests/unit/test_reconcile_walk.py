"""The reconcile walk: bounded requests per pass whatever the number of parts, and every key
where the listing and the registry disagree found within one sweep (in-memory S3 and
DynamoDB that answer as the services do: key order, StartAfter, Limit, LastEvaluatedKey)."""

from __future__ import annotations

import bisect
import math
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from s3rollup.config import Settings
from s3rollup.contract import PartKey
from s3rollup.ingest import PAGE_KEYS, SYNCS_PER_PAGE, Ingest, Outcome
from s3rollup.state import PENDING, REMOVED

OLD = datetime(2026, 1, 1, tzinfo=UTC)


class FakeS3:
    """Current objects of a bucket, listed as ListObjectsV2 lists them."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self._sorted: list[str] = []
        self.calls: Counter[str] = Counter()

    def put(self, key: str, etag: str, size: int, modified: datetime = OLD) -> None:
        if key not in self.objects:
            bisect.insort(self._sorted, key)
        self.objects[key] = {"Key": key, "ETag": f'"{etag}"', "Size": size, "LastModified": modified}

    def delete(self, key: str) -> None:
        del self.objects[key]
        self._sorted.remove(key)

    def list_objects_v2(self, Bucket: str, Prefix: str, MaxKeys: int, StartAfter: str = "") -> Any:
        self.calls["ListObjectsV2"] += 1
        i = bisect.bisect_right(self._sorted, max(StartAfter, Prefix))
        keys = []
        while i < len(self._sorted) and self._sorted[i].startswith(Prefix) and len(keys) <= MaxKeys:
            keys.append(self._sorted[i])
            i += 1
        page = keys[:MaxKeys]
        return {"Contents": [dict(self.objects[k]) for k in page], "IsTruncated": len(keys) > MaxKeys}


class FakeDynamoDB:
    """One table's items (DynamoDB JSON), queried in sort key order."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: Counter[str] = Counter()

    def query(
        self, TableName: str, KeyConditionExpression: str, ExpressionAttributeValues: Any, **kw: Any
    ) -> Any:
        self.calls["Query"] += 1
        pk = ExpressionAttributeValues[":pk"]["S"]
        after = ExpressionAttributeValues.get(":after", {"S": ""})["S"]
        assert KeyConditionExpression == ("pk = :pk AND sk > :after" if after else "pk = :pk")
        keys = sorted(sk for p, sk in self.items if p == pk and sk > after)
        limit = kw["Limit"]
        page = {"Items": [self.items[(pk, sk)] for sk in keys[:limit]]}
        if len(keys) > limit:  # DynamoDB may also say so when exactly Limit were left
            page["LastEvaluatedKey"] = {"pk": {"S": pk}, "sk": {"S": keys[limit - 1]}}
        return page

    def get_item(self, TableName: str, Key: Any, **kw: Any) -> Any:
        self.calls["GetItem"] += 1
        item = self.items.get((Key["pk"]["S"], Key["sk"]["S"]))
        return {"Item": item} if item else {}

    def update_item(
        self, TableName: str, Key: Any, UpdateExpression: str, ExpressionAttributeValues: Any
    ) -> Any:
        self.calls["UpdateItem"] += 1
        item = self.items.setdefault((Key["pk"]["S"], Key["sk"]["S"]), dict(Key))
        sets, _, removes = UpdateExpression.removeprefix("SET ").partition(" REMOVE ")
        for clause in sets.split(", "):
            name, value = clause.split(" = ")
            item[name] = ExpressionAttributeValues[value]
        for name in filter(None, removes.split(", ")):
            item.pop(name, None)
        return {}


def register(
    db: FakeDynamoDB, key: str, etag: str, size: int, status: str = PENDING, modified: int = -1
) -> None:
    dataset = key.split("/")[1]
    item = {
        "pk": {"S": f"PART#{dataset}"},
        "sk": {"S": key},
        "version_id": {"S": "v"},
        "etag": {"S": etag},
        "size": {"N": str(size)},
        "status": {"S": status},
    }
    if modified >= 0:
        item["modified"] = {"N": str(modified)}
    db.items[("PART#" + dataset, key)] = item


class Harness:
    """An Ingest over the fakes whose ``sync`` records the key and brings the registry in
    line with the bucket, as the real one does after its HEAD."""

    def __init__(self, pages: int, grace: int = 0) -> None:
        self.s3, self.db = FakeS3(), FakeDynamoDB()
        settings = Settings(
            bucket="b",
            kms_key_arn="k",
            audit_table="audit",
            state_table="state",
            reconcile_pages=pages,
            reconcile_grace_seconds=grace,
        )
        self.ingest = Ingest(settings, self.s3, self.db, launcher=None)
        self.synced: list[str] = []
        self.ingest.sync = self._sync  # type: ignore[method-assign]

    def _sync(self, part: PartKey, actor: str) -> Outcome:
        self.synced.append(part.key)
        obj = self.s3.objects.get(part.key)
        if obj is None:
            self.db.items[("PART#" + part.dataset, part.key)]["status"] = {"S": REMOVED}
            return Outcome("REMOVED", part.dataset)
        register(
            self.db,
            part.key,
            obj["ETag"].strip('"'),
            obj["Size"],
            modified=int(obj["LastModified"].timestamp()),
        )
        return Outcome("ACCEPTED", part.dataset)

    def requests(self) -> int:
        return sum(self.s3.calls.values()) + sum(self.db.calls.values())

    def reset(self) -> None:
        self.s3.calls.clear()
        self.db.calls.clear()


def _dataset(h: Harness, n: int, dataset: str = "d") -> list[str]:
    keys = [f"incoming/{dataset}/part-{i:07d}.csv" for i in range(n)]
    for i, key in enumerate(keys):
        h.s3.put(key, f"e{i}", 100 + i)
        register(h.db, key, f"e{i}", 100 + i, modified=int(OLD.timestamp()))
    return keys


@pytest.mark.parametrize("n", [10, 3_000, 60_000])
def test_a_pass_reads_at_most_its_page_budget_whatever_the_number_of_parts(n: int) -> None:
    h = Harness(pages=4)
    keys = _dataset(h, n)
    # A few disagreements, so some passes decide too.
    for key in random.Random(n).sample(keys, min(n, 30)):
        h.s3.put(key, "changed", 1)
    found, passes = 0, 0
    while True:
        h.reset()
        done = h.ingest.reconcile("d", "test")
        passes += 1
        # THEN each pass's pages stay within the budget, and everything else is a constant:
        # the cursor read and write, plus what its decisions cost (bounded in number).
        assert done.pages == h.s3.calls["ListObjectsV2"] + h.db.calls["Query"] <= 4
        assert h.db.calls["GetItem"] == 1 and h.db.calls["UpdateItem"] <= 1
        assert h.requests() <= 4 + 2
        assert len(done.outcomes) <= SYNCS_PER_PAGE * 4
        found += len(done.outcomes)
        if not done.next_after:
            break
    # ... and one sweep takes ceil(N / (pages/2 x 1,000)) passes when the sides agree.
    assert passes == max(1, math.ceil(n / (4 // 2 * PAGE_KEYS)))
    assert found == min(n, 30)


def test_every_kind_of_disagreement_is_found_within_one_sweep_and_nothing_else() -> None:
    rng = random.Random(7)
    h = Harness(pages=2)
    keys = _dataset(h, 4_500)
    other = _dataset(h, 50, dataset="other")  # a neighbouring dataset is never read
    lost = [f"incoming/d/part-{i:07d}.csv.new" for i in rng.sample(range(4_500), 40)]
    for key in lost:  # events dropped
        h.s3.put(key, "n", 5)
    deleted = rng.sample(keys, 40)
    for key in deleted:  # deletes without events
        h.s3.delete(key)
    rest = [k for k in keys if k not in set(deleted)]
    overwritten = rng.sample(rest, 60)
    for key in overwritten[:30]:  # a new version with other bytes
        h.s3.put(key, "other", 7)
    for i, key in enumerate(overwritten[30:]):  # the same bytes again, one second later or more
        obj = h.s3.objects[key]
        h.s3.put(key, obj["ETag"].strip('"'), obj["Size"], OLD + timedelta(seconds=1 + i))
    revived = rng.sample([k for k in rest if k not in set(overwritten)], 10)
    for key in revived:  # removed in the registry, listed again (a delete marker deleted)
        h.db.items[("PART#d", key)]["status"] = {"S": REMOVED}
    for key in deleted[:5]:  # deleted and already decided: nothing to do
        h.db.items[("PART#d", key)]["status"] = {"S": REMOVED}
    expected = set(lost) | set(deleted[5:]) | set(overwritten) | set(revived)

    # WHEN passes of two pages each run until the sweep is done
    passes = 0
    while True:
        done = h.ingest.reconcile("d", "test")
        passes += 1
        if not done.next_after:
            break
    # THEN exactly the disagreeing keys were decided, each once, within the passes the two
    # budgets allow: N / 1,000 keys (a page of each side per pass) and D / 10 decisions
    assert sorted(h.synced) == sorted(expected)
    assert passes <= math.ceil((4_500 + 40) / PAGE_KEYS) + math.ceil(len(expected) / (SYNCS_PER_PAGE * 2))
    assert not set(h.synced) & set(other)
    # ... and the next sweep starts over and finds nothing more.
    h.synced.clear()
    while True:
        done = h.ingest.reconcile("d", "test")
        assert done.pages <= 2
        if not done.next_after:
            break
    assert h.synced == []


def test_a_pass_that_runs_out_of_decisions_resumes_at_the_next_key() -> None:
    h = Harness(pages=2)  # at most 10 decisions per pass
    _dataset(h, 100)
    lost = [f"incoming/d/part-{i:07d}.csv.x" for i in range(25)]
    for key in lost:
        h.s3.put(key, "n", 5)
    first = h.ingest.reconcile("d", "test")
    # THEN it stops before the first key it could not decide (after the agreeing ones before it)
    assert len(first.outcomes) == SYNCS_PER_PAGE * 2
    assert first.next_after == "incoming/d/part-0000010.csv" and lost[9] < first.next_after < lost[10]
    second = h.ingest.reconcile("d", "test")
    assert second.started_after == first.next_after and len(second.outcomes) == 10
    third = h.ingest.reconcile("d", "test")
    assert len(third.outcomes) == 5 and third.next_after == ""
    assert h.synced == lost


def test_an_object_within_the_grace_window_is_left_to_its_event_then_found() -> None:
    h = Harness(pages=2, grace=60)
    _dataset(h, 20)
    key = "incoming/d/part-9999999.csv"
    # GIVEN an object written just now whose event never comes
    h.s3.put(key, "n", 5, datetime.now(UTC))
    done = h.ingest.reconcile("d", "test")
    # THEN the pass leaves it to its event, and says so
    assert h.synced == [] and done.deferred == 1
    # WHEN the window has passed THEN the next pass decides it
    h.s3.objects[key]["LastModified"] = datetime.now(UTC) - timedelta(seconds=61)
    done = h.ingest.reconcile("d", "test")
    assert h.synced == [key] and done.deferred == 0
    # A delete has no time to wait on: it is decided at once.
    h.s3.delete(key)
    h.ingest.reconcile("d", "test")
    assert h.synced == [key, key]
