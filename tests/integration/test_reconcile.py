"""Reconcile at the embedded endpoint: bounded passes from a saved cursor find parts whose
events were dropped, deletes that sent no event, and overwrites, and the cursor wraps."""

from __future__ import annotations

import time
from typing import Any

import pytest

from s3rollup.config import Settings
from s3rollup.demo import generate_part, to_csv_bytes
from s3rollup.ingest import Ingest, ReconcilePass, S3Event
from s3rollup.state import PENDING, REMOVED
from tests.helpers import audit_records, put_part, silent

pytestmark = pytest.mark.integration


def _ingest(stack: Any, pages: int, page_keys: int, grace: int = 0) -> Ingest:
    settings = Settings.from_env(stack.info.function_env).with_(
        reconcile_pages=pages, reconcile_grace_seconds=grace
    )
    # No launcher: the test looks at decisions, not at jobs.
    ingest = Ingest(settings, stack.aws.s3, stack.aws.dynamodb, launcher=None)
    ingest.page_keys = page_keys
    return ingest


def _sweep(ingest: Ingest, dataset: str) -> list[ReconcilePass]:
    """Passes until one completes the sweep."""
    passes = [ingest.reconcile(dataset, "test:reconcile")]
    while passes[-1].next_after:
        passes.append(ingest.reconcile(dataset, "test:reconcile"))
        assert len(passes) < 50, "the sweep never completed"
    return passes


def test_small_passes_find_dropped_events_deletes_and_overwrites(stack: Any, dataset: str) -> None:
    bucket = stack.info.outputs["DataBucketName"]
    ingest = _ingest(stack, pages=2, page_keys=3)
    bodies = {f"part-{i:02d}.csv": to_csv_bytes(generate_part(i, 10, seed=i)) for i in range(10)}
    # GIVEN ten parts, decided as their events would have them decided
    with silent(stack):
        keys = {name: put_part(stack, dataset, name, body) for name, body in bodies.items()}
    for key in keys.values():
        assert ingest.handle(S3Event("ObjectCreated:Put", bucket, key), "test").decision == "ACCEPTED"
    # ... on which a whole sweep (several passes of one listing page and one registry page
    # of three keys) agrees with the listing: nothing is decided again.
    first = _sweep(ingest, dataset)
    assert len(first) >= 4 and all(p.pages <= 2 for p in first)
    assert [o for p in first for o in p.outcomes] == []
    assert ingest.state.reconcile_cursor(dataset) == ""

    # WHEN, with no event for any of it, two parts arrive, two are deleted, one is replaced
    # by other bytes and one by the same bytes (a new version, a second later)
    time.sleep(1.2)
    with silent(stack):
        lost = [put_part(stack, dataset, f"part-{i:02d}.csv", generate_part(i, 7, seed=i)) for i in (10, 11)]
        put_part(stack, dataset, "part-07.csv", generate_part(7, 12, seed=70))
        put_part(stack, dataset, "part-03.csv", bodies["part-03.csv"])
    for name in ("part-02.csv", "part-05.csv"):
        stack.aws.s3.delete_object(Bucket=bucket, Key=keys[name])

    # THEN the passes of the next sweep decide exactly those keys, and the cursor wraps
    second = _sweep(ingest, dataset)
    assert len(second) >= 4 and all(p.pages <= 2 for p in second)
    assert sorted(o.decision for p in second for o in p.outcomes) == ["ACCEPTED"] * 4 + ["REMOVED"] * 2
    assert ingest.state.reconcile_cursor(dataset) == ""
    state = ingest.state
    for key in (*lost, keys["part-07.csv"], keys["part-03.csv"]):
        part = state.get_part(dataset, key)
        head = stack.aws.s3.head_object(Bucket=bucket, Key=key)
        assert part is not None and (part.status, part.version_id) == (PENDING, head["VersionId"])
    for name in ("part-02.csv", "part-05.csv"):
        part = state.get_part(dataset, keys[name])
        assert part is not None and part.status == REMOVED
    accepted = [r["key"] for r in audit_records(stack, dataset) if r["event"] == "PART_ACCEPTED"]
    assert sorted(accepted) == sorted([*keys.values(), *lost, keys["part-07.csv"], keys["part-03.csv"]])
    # ... and the sweep after that finds nothing more.
    assert [o for p in _sweep(ingest, dataset) for o in p.outcomes] == []


def test_a_fresh_object_is_left_to_its_event_until_the_grace_window_passes(stack: Any, dataset: str) -> None:
    ingest = _ingest(stack, pages=4, page_keys=1000, grace=2)
    with silent(stack):  # GIVEN a part just written whose event never comes
        key = put_part(stack, dataset, "part-00.csv", generate_part(0, 10, seed=1))
    # WHEN a pass runs within the window THEN it leaves the part alone, and says so
    early = ingest.reconcile(dataset, "test:reconcile")
    assert (early.outcomes, early.deferred) == ([], 1)
    assert ingest.state.get_part(dataset, key) is None
    # WHEN the window has passed THEN the next pass decides it
    time.sleep(2.5)
    late = ingest.reconcile(dataset, "test:reconcile")
    assert [o.decision for o in late.outcomes] == ["ACCEPTED"] and late.deferred == 0
    part = ingest.state.get_part(dataset, key)
    assert part is not None and part.status == PENDING


def test_the_embedded_query_pages_one_partition_in_sort_key_order(stack: Any, dataset: str) -> None:
    """The endpoint's Query reads only the partition it names (local.partition_queries):
    pages by Limit and ExclusiveStartKey, or from a `>` bound, still hold exactly the
    partition's items in DynamoDB's order, strings by UTF-8 bytes and numbers by value."""
    db = stack.aws.dynamodb
    state_table, audit_table = stack.info.outputs["StateTableName"], stack.info.outputs["AuditTableName"]
    names = ["b", "a", "é", "Z", "a0", "ä", "zz", "€", "0", "a/b", "a-b", "日本"] * 2
    names = [f"{n}{i}" for i, n in enumerate(names)]
    for pk in (f"T1#{dataset}", f"T2#{dataset}"):  # a neighbouring partition is never returned
        for n in names:
            db.put_item(TableName=state_table, Item={"pk": {"S": pk}, "sk": {"S": n}})
    for seq in (1, 2, 10, 9, 100, 11, 3):
        db.put_item(TableName=audit_table, Item={"chain": {"S": f"t-{dataset}"}, "seq": {"N": str(seq)}})

    def pages(table: str, **kwargs: Any) -> list[list[Any]]:
        out, start = [], None
        while True:
            page = db.query(TableName=table, **kwargs, **({"ExclusiveStartKey": start} if start else {}))
            out.append(page["Items"])
            start = page.get("LastEvaluatedKey")
            if not start:
                return out

    by_utf8 = sorted(names, key=lambda n: n.encode())
    got = pages(
        state_table,
        KeyConditionExpression="pk = :pk",
        ExpressionAttributeValues={":pk": {"S": f"T1#{dataset}"}},
        Limit=5,
    )
    assert [len(p) for p in got[:-1]] == [5] * (len(got) - 1)
    assert [i["sk"]["S"] for p in got for i in p] == by_utf8
    after = by_utf8[7]
    got = pages(
        state_table,
        KeyConditionExpression="pk = :pk AND sk > :a",
        ExpressionAttributeValues={":pk": {"S": f"T1#{dataset}"}, ":a": {"S": after}},
        Limit=4,
    )
    assert [i["sk"]["S"] for p in got for i in p] == by_utf8[8:]
    got = pages(
        audit_table,
        KeyConditionExpression="chain = :c AND seq > :z",
        ExpressionAttributeValues={":c": {"S": f"t-{dataset}"}, ":z": {"N": "2"}},
        Limit=2,
    )
    assert [int(i["seq"]["N"]) for p in got for i in p] == [3, 9, 10, 11, 100]
