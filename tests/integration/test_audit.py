"""The audit chain in DynamoDB: concurrent appends stay one chain; tampering is detected."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from botocore.exceptions import ClientError

from s3rollup.audit import AuditLog
from tests.helpers import run_cli, user_env

pytestmark = pytest.mark.integration


def _log(stack: Any) -> AuditLog:
    return AuditLog(stack.aws.dynamodb, stack.info.outputs["AuditTableName"])


def _append_many(log: AuditLog, chain: str, threads: int, each: int) -> None:
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(each):
                log.append(chain, "PART_RECEIVED", f"thread-{t}", key=f"incoming/{chain}/{t}-{i}.csv")
        except BaseException as exc:  # a thread's exception must fail the test, not vanish
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert errors == []


def test_concurrent_appends_make_one_gap_free_chain(stack: Any, dataset: str) -> None:
    log = _log(stack)
    _append_many(log, dataset, threads=8, each=10)
    records = list(log.records(dataset))
    assert [r["seq"] for r in records] == list(range(1, 81))
    assert sorted(r["key"] for r in records) == sorted(
        f"incoming/{dataset}/{t}-{i}.csv" for t in range(8) for i in range(10)
    )
    assert log.verify(dataset) == (80, None)
    # AND the last record, read through the head, is the chain's last
    assert log.last(dataset) == records[-1]


def test_an_empty_chain_has_no_last_record(stack: Any, dataset: str) -> None:
    assert _log(stack).last(f"{dataset}-never-written") is None


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


def test_audit_verify_cli_passes_an_intact_pipeline_chain_and_names_a_tampered_record(
    stack: Any, dataset: str
) -> None:
    from s3rollup.demo import generate_part, wait_until_idle
    from s3rollup.state import State
    from tests.helpers import put_part, wait_manifest

    key = put_part(stack, dataset, "p.csv", generate_part(0, 100, seed=5))
    wait_manifest(stack, dataset, {key})
    state = State(stack.aws.dynamodb, stack.info.outputs["StateTableName"])
    assert wait_until_idle(state, AuditLog(stack.aws.dynamodb, stack.info.outputs["AuditTableName"]), dataset)
    ok = run_cli(["audit", "verify", dataset], user_env(stack, "reader"))
    assert ok.returncode == 0 and "intact" in ok.stdout, ok.stderr
    shown = run_cli(["audit", "show", dataset, "--format", "json"], user_env(stack, "reader"))
    events = [json.loads(line)["event"] for line in shown.stdout.splitlines()]
    assert events[0] == "PART_ACCEPTED" and "RESULT_WRITTEN" in events and events[-1] == "JOB_FINISHED"

    _tamper(stack, dataset, 1, lambda r: r.__setitem__("reason", "EDITED"))
    bad = run_cli(["audit", "verify", dataset], user_env(stack, "reader"))
    assert bad.returncode == 7 and "record 1" in bad.stderr


@pytest.mark.parametrize("name", ["aggregate.parquet", "aggregate.json", "manifest.json"])
def test_audit_verify_detects_a_result_that_no_longer_matches_its_checksum(
    stack: Any, dataset: str, name: str
) -> None:
    from s3rollup.audit import verify_results
    from s3rollup.contract import result_key

    log = _log(stack)
    s3, bucket = stack.aws.s3, stack.info.outputs["DataBucketName"]
    put = s3.put_object(Bucket=bucket, Key=result_key(dataset, name), Body=b"{}")
    record = log.append(
        dataset,
        "RESULT_WRITTEN",
        "test",
        objects={name: {"version_id": put["VersionId"], "sha256": "0" * 64}},
    )
    problem = verify_results([record], s3, bucket, dataset)
    assert problem is not None and (problem.seq, problem.code) == (1, "RESULT_CHANGED")


def test_a_consistent_rewrite_of_history_is_caught_by_the_locked_chain_head(stack: Any, dataset: str) -> None:
    from s3rollup.audit import GENESIS, record_hash, verify_dataset
    from s3rollup.demo import generate_part, wait_until_idle
    from s3rollup.state import State
    from tests.conftest import wait_for
    from tests.helpers import put_part, wait_manifest

    outputs = stack.info.outputs
    anchor_bucket, s3 = outputs["AuditAnchorBucketName"], stack.aws.s3
    key = put_part(stack, dataset, "p.csv", generate_part(0, 50, seed=6))
    wait_manifest(stack, dataset, {key})
    state = State(stack.aws.dynamodb, outputs["StateTableName"])
    assert wait_until_idle(state, AuditLog(stack.aws.dynamodb, stack.info.outputs["AuditTableName"]), dataset)
    log = _log(stack)
    # GIVEN the job exported its chain head, locked in COMPLIANCE mode
    # (the job exports it just after its last record: idle does not mean exported yet)
    anchors = wait_for(
        lambda: s3.list_objects_v2(Bucket=anchor_bucket, Prefix=f"audit-heads/{dataset}/").get("Contents")
    )
    head = s3.head_object(Bucket=anchor_bucket, Key=anchors[-1]["Key"])
    assert head["ObjectLockMode"] == "COMPLIANCE"
    with pytest.raises(ClientError):
        s3.delete_object(Bucket=anchor_bucket, Key=anchors[-1]["Key"], VersionId=head["VersionId"])
    assert verify_dataset(log, s3, outputs["DataBucketName"], anchor_bucket, dataset)[2] is None

    # WHEN an administrator edits record 1 and recomputes every hash and the head
    db, table = stack.aws.dynamodb, outputs["AuditTableName"]
    prev = GENESIS
    for record in list(log.records(dataset)):
        record.pop("_seq_key")
        if record["seq"] == 1:
            record["reason"] = "EDITED"
        record["prev_hash"] = prev
        record["hash"] = record_hash(record)
        prev = record["hash"]
        db.put_item(
            TableName=table,
            Item={
                "chain": {"S": dataset},
                "seq": {"N": str(record["seq"])},
                "record": {"S": json.dumps(record, sort_keys=True, separators=(",", ":"))},
            },
        )
        last = record["seq"]
    db.put_item(
        TableName=table,
        Item={
            "chain": {"S": dataset},
            "seq": {"N": "0"},
            "head_seq": {"N": str(last)},
            "head_hash": {"S": prev},
        },
    )
    # THEN the chain alone still verifies, but not against its locked head
    assert log.verify(dataset)[1] is None
    problem = verify_dataset(log, s3, outputs["DataBucketName"], anchor_bucket, dataset)[2]
    assert problem is not None and problem.code == "ANCHOR_MISMATCH"
