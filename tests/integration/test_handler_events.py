"""The ingest handler invoked with the events/ files `sam local invoke -e` would pass."""

from __future__ import annotations

import time
from typing import Any

import pytest

from s3rollup.local import FakeContext
from s3rollup.state import PENDING, State
from tests.conftest import load_event, retarget
from tests.helpers import audit_records, put_part, silent

pytestmark = pytest.mark.integration

GOOD = b"id,value1,value2,value3,category\n1,0.5,1.5,2.5,3\n"


def _no_job(stack: Any, dataset: str) -> None:
    # Hold the dataset's lease so these tests exercise ingest alone.
    State(stack.aws.dynamodb, stack.info.outputs["StateTableName"]).acquire_lease(
        dataset, "test-holds-lease", 600
    )


def test_bare_s3_put_event_registers_the_part_once(stack: Any, lambda_app: Any, dataset: str) -> None:
    _no_job(stack, dataset)
    bucket = stack.info.outputs["DataBucketName"]
    with silent(stack):
        key = put_part(stack, dataset, "part-00000.csv", GOOD)
    event = retarget(load_event("s3-put.json"), bucket, dataset)
    app = lambda_app
    for _ in range(3):  # the same event delivered three times
        assert app.handler(event, FakeContext("IngestFunction")) == {"batchItemFailures": []}
    part = State(stack.aws.dynamodb, stack.info.outputs["StateTableName"]).get_part(dataset, key)
    assert part is not None and part.status == PENDING
    accepted = [r for r in audit_records(stack, dataset) if r["event"] == "PART_ACCEPTED"]
    assert [r["key"] for r in accepted] == [key]


def test_sqs_batch_with_encoded_keys_and_test_event(stack: Any, lambda_app: Any, dataset: str) -> None:
    _no_job(stack, dataset)
    bucket = stack.info.outputs["DataBucketName"]
    with silent(stack):
        k1 = put_part(stack, dataset, "part-00000.csv", GOOD)
    with silent(stack):
        k2 = put_part(stack, dataset, "café part +1 100%.csv", GOOD)
    event = retarget(load_event("sqs-s3-batch.json"), bucket, dataset)
    response = lambda_app.handler(event, FakeContext("IngestFunction"))
    assert response == {"batchItemFailures": []}
    keys = sorted(r["key"] for r in audit_records(stack, dataset) if r["event"] == "PART_ACCEPTED")
    assert keys == sorted([k1, k2])


def test_s3_test_event_is_ignored(stack: Any, lambda_app: Any, dataset: str) -> None:
    event = load_event("sqs-s3-test-event.json")
    assert lambda_app.handler(event, FakeContext("IngestFunction")) == {"batchItemFailures": []}


def test_poison_record_is_reported_alone(stack: Any, lambda_app: Any, dataset: str) -> None:
    _no_job(stack, dataset)
    bucket = stack.info.outputs["DataBucketName"]
    with silent(stack):
        put_part(stack, dataset, "part-00000.csv", GOOD)
    event = retarget(load_event("sqs-s3-batch.json"), bucket, dataset)
    event["Records"][1]["body"] = "{not json"
    response = lambda_app.handler(event, FakeContext("IngestFunction"))
    assert response == {"batchItemFailures": [{"itemIdentifier": event["Records"][1]["messageId"]}]}


def test_delete_event_removes_a_registered_part(stack: Any, lambda_app: Any, dataset: str) -> None:
    _no_job(stack, dataset)
    bucket = stack.info.outputs["DataBucketName"]
    with silent(stack):
        key = put_part(stack, dataset, "part-00000.csv", GOOD)
    app = lambda_app
    app.handler(retarget(load_event("s3-put.json"), bucket, dataset), FakeContext("IngestFunction"))
    stack.aws.s3.delete_object(Bucket=bucket, Key=key)
    app.handler(retarget(load_event("s3-delete.json"), bucket, dataset), FakeContext("IngestFunction"))
    part = State(stack.aws.dynamodb, stack.info.outputs["StateTableName"]).get_part(dataset, key)
    assert part is not None and part.status == "REMOVED"
    events = [r["event"] for r in audit_records(stack, dataset)]
    assert events == ["PART_ACCEPTED", "PART_REMOVED"]


def test_the_scheduled_event_reconciles_every_dataset(stack: Any, lambda_app: Any, dataset: str) -> None:
    """Parts whose events never came are registered by the schedule, not the next upload."""
    other = f"{dataset}-b"
    for name in (dataset, other):
        _no_job(stack, name)
    with silent(stack):  # GIVEN parts in two datasets whose events were lost
        k1 = put_part(stack, dataset, "part-00000.csv", GOOD)
        k2 = put_part(stack, other, "part-00000.csv", GOOD)
    # WHEN the schedule fires
    assert lambda_app.handler(load_event("scheduled-reconcile.json"), FakeContext("IngestFunction")) == {
        "reconciled": True
    }
    # THEN both parts are registered and audited once
    state = State(stack.aws.dynamodb, stack.info.outputs["StateTableName"])
    for name, key in ((dataset, k1), (other, k2)):
        part = state.get_part(name, key)
        assert part is not None and part.status == PENDING
        assert [r["key"] for r in audit_records(stack, name) if r["event"] == "PART_ACCEPTED"] == [key]


def test_a_failed_scheduled_reconcile_fails_the_invocation_after_the_others(
    stack: Any, lambda_app: Any, dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from s3rollup.errors import S3RollupError

    broken, fine = dataset, f"{dataset}-ok"
    for name in (broken, fine):
        _no_job(stack, name)
    with silent(stack):
        put_part(stack, broken, "part-00000.csv", GOOD)
        key = put_part(stack, fine, "part-00000.csv", GOOD)
    service = lambda_app.service()
    real = service.reconcile

    def reconcile(name: str, actor: str) -> Any:
        if name == broken:
            raise S3RollupError("listing failed", "S3_LIST")
        return real(name, actor)

    monkeypatch.setattr(service, "reconcile", reconcile)
    with pytest.raises(S3RollupError) as failed:
        lambda_app.handler(load_event("scheduled-reconcile.json"), FakeContext("IngestFunction"))
    assert failed.value.code == "RECONCILE_FAILED" and broken in str(failed.value)
    # The other dataset was still reconciled.
    part = State(stack.aws.dynamodb, stack.info.outputs["StateTableName"]).get_part(fine, key)
    assert part is not None and part.status == PENDING


def test_a_scheduled_reconcile_rotates_and_stops_at_its_deadline(
    stack: Any, lambda_app: Any, dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = lambda_app.service()
    names = service.datasets()
    assert dataset not in names or names == sorted(names)
    seen: list[str] = []
    monkeypatch.setattr(service, "reconcile", lambda name, actor: seen.append(name))
    # Each run leads with another dataset, and still visits every one once ...
    assert service.reconcile_all("test", start=len(names) + 1) == []
    assert seen == names[1:] + names[:1]
    # ... unless its deadline has come: then it stops before starting another.
    seen.clear()
    assert service.reconcile_all("test", deadline=time.monotonic() - 1) == []
    assert seen == []
    # The function keeps RECONCILE_MARGIN_S of its time: with less left it starts none.
    short = int(lambda_app.RECONCILE_MARGIN_S * 1000) - 1
    event = load_event("scheduled-reconcile.json")
    assert lambda_app.handler(event, FakeContext("IngestFunction", remaining_ms=short)) == {
        "reconciled": True
    }
    assert seen == []
