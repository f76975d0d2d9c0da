"""AWS faults through a fault-injecting proxy in front of the embedded endpoint: S3 5xx and
slow reads, DynamoDB 5xx, throttling and cancelled transactions, RunTask capacity failures
and throttling. Transient faults end in a correct result; lasting ones leave the message in
the DLQ and a record in the audit chain, never a silent loss."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config

from s3rollup.aws import Aws
from s3rollup.config import Settings
from s3rollup.ingest import Ingest, S3Event
from s3rollup.launch import EcsLauncher, LocalLauncher
from s3rollup.local import Dispatcher
from s3rollup.state import State
from tests.conftest import wait_for
from tests.faultproxy import FaultProxy, Request, Rule, json_error, s3_error
from tests.helpers import (
    assert_result_is,
    audit_records,
    notification,
    queue_like_the_stacks,
    upload_silently,
)

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

DDB = "com.amazonaws.dynamodb.v20120810#"
RUN_TASK = "AmazonEC2ContainerServiceV20141113.RunTask"
JSON11, XML = "application/x-amz-json-1.1", "application/xml"


@pytest.fixture()
def proxy(stack: Any) -> Iterator[FaultProxy]:
    """A fault proxy in front of the embedded endpoint (no rules yet)."""
    with FaultProxy(stack.info.endpoint_url).running() as p:
        yield p


def _cancelled(req: Request) -> bytes:
    """TransactionCanceledException as DynamoDB sends it: one reason per transaction item."""
    items = json.loads(req.body).get("TransactItems", [])
    return json.dumps(
        {
            "__type": DDB + "TransactionCanceledException",
            "message": "Transaction cancelled [TransactionConflict]",
            "CancellationReasons": [{"Code": "TransactionConflict", "Message": "conflict"} for _ in items],
        }
    ).encode()


def test_transient_s3_and_dynamodb_faults_end_in_the_correct_result(
    stack: Any, dataset: str, proxy: FaultProxy
) -> None:
    def s3(r: Request) -> bool:
        return not r.target and f"/{dataset}/" in r.path

    def ddb(r: Request) -> bool:
        return r.target.startswith("DynamoDB") and dataset.encode() in r.body

    for rule in (
        Rule("s3 503 SlowDown", s3, 503, s3_error("SlowDown"), XML, every=4, transient=True),
        Rule("s3 500 InternalError", s3, 500, s3_error("InternalError"), XML, every=7, transient=True),
        Rule("dynamodb 500", ddb, 500, json_error(DDB + "InternalServerError"), every=9, transient=True),
        Rule(
            "dynamodb throttled", ddb, 400, json_error(DDB + "ThrottlingException"), every=11, transient=True
        ),
        Rule(
            "transaction cancelled",
            lambda r: ddb(r) and r.target.endswith("TransactWriteItems"),
            400,
            _cancelled,
            every=3,
        ),
        Rule("slow part read", lambda r: r.method == "GET" and f"/incoming/{dataset}/" in r.path, delay=0.3),
    ):
        proxy.add(rule)
    final = upload_silently(stack, dataset, 6, 500, seed=23)
    # GIVEN ingest and the worker talking to AWS through the faults
    settings = Settings.from_env(stack.dispatcher.env)
    aws = Aws(stack.info.region, proxy.url)
    launcher = LocalLauncher(settings, stack.aws.client("ecs"), extra_env={"AWS_ENDPOINT_URL": proxy.url})
    ingest = Ingest(settings, aws.s3, aws.dynamodb, launcher)
    # WHEN each part's event is handled (a failed delivery would be delivered again)
    for key in sorted(final):
        ingest.handle(S3Event("ObjectCreated:Put", settings.bucket, key), actor="test:faults")
    # THEN the result is correct, each version counted once, and every fault did happen
    assert_result_is(stack, dataset, final)
    launcher.wait(timeout=120)  # every worker it started has exited
    print(f"\ninjected faults: {dict(proxy.injected)}")
    assert set(proxy.injected) == {rule.name for rule in proxy.rules}
    events = [r["event"] for r in audit_records(stack, dataset)]
    assert events.count("JOB_FINISHED") == events.count("JOB_STARTED") >= 1
    assert "INGEST_FAILED" not in events and "JOB_FAILED" not in events


def test_run_task_capacity_failures_and_throttling_are_retried_with_one_client_token(
    stack: Any, proxy: FaultProxy
) -> None:
    capacity = json.dumps({"tasks": [], "failures": [{"reason": "RESOURCE:MEMORY"}]}).encode()
    proxy.add(Rule("capacity", lambda r: r.target == RUN_TASK, 200, capacity, JSON11, times=2))
    proxy.add(
        Rule(
            "throttled",
            lambda r: r.target == RUN_TASK,
            400,
            json_error("ThrottlingException"),
            JSON11,
            times=2,
        )
    )
    settings = Settings.from_env(stack.info.function_env)  # launcher: ecs, as in AWS
    ecs = Aws(stack.info.region, proxy.url).client("ecs")
    arn = EcsLauncher(settings, ecs, attempts=5, base_delay=0.01).launch("sales", "job-capacity")
    tokens = [json.loads(r.body)["clientToken"] for r in proxy.seen if r.target == RUN_TASK]
    assert proxy.injected == {"capacity": 2, "throttled": 2}
    assert tokens == ["job-capacity"] * 5
    assert ":task/" in arn


def _private_queue(stack: Any, name: str) -> tuple[str, str]:
    """A queue like the stack's (DLQ after 3 receives) with a 1 s visibility timeout."""
    queue = queue_like_the_stacks(stack, name, max_receives=3)
    return queue, stack.aws.client("sqs").get_queue_url(QueueName=f"{name}-dlq")["QueueUrl"]


def _count(sqs: Any, url: str) -> int:
    attrs = sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return sum(int(v) for v in attrs.values())


@pytest.mark.parametrize("fault", ["run_task_capacity", "s3_head_500"])
def test_lasting_faults_leave_the_message_in_the_dlq_and_on_the_record(
    stack: Any, dataset: str, proxy: FaultProxy, fault: str
) -> None:
    sqs, bucket = stack.aws.client("sqs"), stack.info.outputs["DataBucketName"]
    queue, dlq = _private_queue(stack, dataset)
    (key,) = upload_silently(stack, dataset, 1, 50, seed=29)
    dispatcher = Dispatcher(stack.info, stack.aws, reconcile_every=0)
    dispatcher.queue_url = queue
    service = dispatcher.app.service()
    settings = Settings.from_env(stack.info.function_env)
    # A client that gives up at once, so each delivery fails fast (the queue retries)
    fast = Config(retries={"mode": "standard", "max_attempts": 1})
    session = boto3.session.Session(region_name=stack.info.region)
    if fault == "run_task_capacity":
        capacity = json.dumps({"tasks": [], "failures": [{"reason": "RESOURCE:MEMORY"}]}).encode()
        proxy.add(Rule(fault, lambda r: r.target == RUN_TASK, 200, capacity, JSON11))
        ecs = session.client("ecs", endpoint_url=proxy.url, config=fast)
        service.launcher, reason = (
            EcsLauncher(settings, ecs, attempts=3, base_delay=0.01),
            "RUN_TASK_EXHAUSTED",
        )
    else:
        proxy.add(Rule(fault, lambda r: r.method == "HEAD" and dataset in r.path, 500, b"", XML))
        service._s3, reason = session.client("s3", endpoint_url=proxy.url, config=fast), "S3_HEAD"
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(notification(bucket, key)))
    # WHEN every delivery fails
    wait_for(
        lambda: dispatcher.poll_once(wait_seconds=1) >= 0 and _count(sqs, queue) == 0, timeout=60, interval=0
    )
    # THEN the message waits in the DLQ and each failed delivery is on the record
    assert _count(sqs, dlq) == 1
    records = audit_records(stack, dataset)
    failed = [r for r in records if r["event"] == "INGEST_FAILED"]
    assert len(failed) == 3 and {(r["key"], r["reason"]) for r in failed} == {(key, reason)}
    # ... and once the fault is gone, the next reconcile picks the part up
    proxy.clear()
    service.reconcile(dataset, actor="test:reconcile")
    events = [r["event"] for r in audit_records(stack, dataset)]
    assert events.count("PART_ACCEPTED") == 1 and "JOB_LAUNCHED" in events
    lease = State(stack.aws.dynamodb, settings.state_table).lease(dataset)
    assert lease is not None
