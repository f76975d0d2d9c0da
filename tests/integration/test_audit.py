"""The audit chain in DynamoDB: concurrent appends stay one chain; tampering is detected."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from s3rollup.audit import AuditLog

pytestmark = pytest.mark.integration


def _log(stack: Any) -> AuditLog:
    return AuditLog(stack.aws.dynamodb, stack.info.outputs["AuditTableName"])


def _append_many(log: AuditLog, chain: str, threads: int, each: int) -> None:
    def work(t: int) -> None:
        for i in range(each):
            log.append(chain, "PART_RECEIVED", f"thread-{t}", key=f"incoming/{chain}/{t}-{i}.csv")

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()


def test_concurrent_appends_make_one_gap_free_chain(stack: Any, dataset: str) -> None:
    log = _log(stack)
    _append_many(log, dataset, threads=8, each=5)
    records = list(log.records(dataset))
    assert [r["seq"] for r in records] == list(range(1, 41))
    assert sorted(r["key"] for r in records) == sorted(
        f"incoming/{dataset}/{t}-{i}.csv" for t in range(8) for i in range(5)
    )
    assert log.verify(dataset) == (40, None)


def _tamper(stack: Any, chain: str, seq: int, change: Any) -> None:
    db, table = stack.aws.dynamodb, stack.info.outputs["AuditTableName"]
    item = db.get_item(TableName=table, Key={"chain": {"S": chain}, "seq": {"N": str(seq)}})["Item"]
    record = json.loads(item["record"]["S"])
    change(record)
    item["record"] = {"S": json.dumps(record)}
    db.put_item(TableName=table, Item=item)


@pytest.mark.parametrize("field", ["event", "actor", "key", "time", "prev_hash", "hash"])
def test_editing_any_field_is_detected_at_that_record(stack: Any, dataset: str, field: str) -> None:
    log = _log(stack)
    _append_many(log, dataset, threads=1, each=5)
    _tamper(stack, dataset, 3, lambda r: r.__setitem__(field, "x" + str(r[field])))
    _, problem = log.verify(dataset)
    assert problem is not None and problem.seq == 3


def test_deleting_a_record_is_detected(stack: Any, dataset: str) -> None:
    log = _log(stack)
    _append_many(log, dataset, threads=1, each=5)
    stack.aws.dynamodb.delete_item(
        TableName=stack.info.outputs["AuditTableName"],
        Key={"chain": {"S": dataset}, "seq": {"N": "4"}},
    )
    _, problem = log.verify(dataset)
    assert problem is not None and (problem.seq, problem.code) == (4, "GAP")


def test_swapping_two_records_is_detected(stack: Any, dataset: str) -> None:
    log = _log(stack)
    _append_many(log, dataset, threads=1, each=5)
    db, table = stack.aws.dynamodb, stack.info.outputs["AuditTableName"]
    items = {
        s: db.get_item(TableName=table, Key={"chain": {"S": dataset}, "seq": {"N": str(s)}})["Item"]
        for s in (2, 3)
    }
    for a, b in ((2, 3), (3, 2)):
        db.put_item(TableName=table, Item={**items[a], "record": items[b]["record"]})
    _, problem = log.verify(dataset)
    assert problem is not None and problem.seq == 2


def test_an_untouched_chain_verifies(stack: Any, dataset: str) -> None:
    log = _log(stack)
    _append_many(log, dataset, threads=2, each=3)
    assert log.verify(dataset) == (6, None)


def test_fields_that_could_carry_cell_values_are_refused(stack: Any, dataset: str) -> None:
    from s3rollup.errors import AuditError

    with pytest.raises(AuditError):
        _log(stack).append(dataset, "PART_RECEIVED", "test", value="alice@example.com")
