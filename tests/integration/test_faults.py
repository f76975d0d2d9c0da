"""Faults: duplicated, reordered and lost events; crashes of the dispatcher, the worker and a
Dask worker. Each ends with the published result equal to pandas over exactly the parts
that exist, every part version counted once."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from s3rollup.config import Settings
from s3rollup.demo import generate_part
from s3rollup.job import Job
from s3rollup.launch import LocalLauncher
from s3rollup.local import Dispatcher, FakeContext
from s3rollup.state import State
from tests.conftest import wait_for
from tests.helpers import (
    assert_result_is,
    audit_records,
    dask_processes,
    notification,
    put_version,
    queue_like_the_stacks,
    silent,
    sqs_event,
    task_aws,
    upload_silently,
)

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


@pytest.mark.parametrize("seed", [11, 12])
def test_duplicated_shuffled_events_with_overwrites_and_deletes(
    stack: Any, lambda_app: Any, dataset: str, seed: int
) -> None:
    rng = random.Random(seed)
    bucket = stack.info.outputs["DataBucketName"]
    keys = [f"incoming/{dataset}/part-{i}.csv" for i in range(6)]
    final: dict[str, tuple[str, pd.DataFrame]] = {}
    events: list[dict[str, Any]] = []
    # GIVEN 24 writes and deletes; S3 would send one event each, but moto sends none for
    # a delete and here half of them are lost on the way too
    with silent(stack):
        for step in range(24):
            key = rng.choice(keys) if step < 23 else keys[0]
            if key in final and rng.random() < 0.3:
                stack.aws.s3.delete_object(Bucket=bucket, Key=key)
                del final[key]
                if rng.random() < 0.5:
                    events.append(notification(bucket, key, "ObjectRemoved:DeleteMarkerCreated"))
                continue
            frame = generate_part(step, rng.randint(20, 300), seed=seed)
            final[key] = (put_version(stack, key, frame), frame)
            events.append(notification(bucket, key))
    # WHEN every event arrives 1-5 times, in any order, in batches of the function's size
    deliveries = [e for e in events for _ in range(rng.randint(1, 5))]
    rng.shuffle(deliveries)
    for i in range(0, len(deliveries), 10):
        assert lambda_app.handler(sqs_event(deliveries[i : i + 10]), FakeContext("IngestFunction")) == {
            "batchItemFailures": []
        }
    stack.dispatcher.reconcile()  # the periodic reconcile: lost delete events
    # THEN the result is exactly the parts that exist now
    assert_result_is(stack, dataset, final)


class Killed(BaseException):
    """The process dies here: nothing after this line runs, no handler catches it."""


def _drain(dispatcher: Any) -> None:
    """Poll until the queue has no message, visible or in flight."""
    sqs = dispatcher.aws.client("sqs")

    def empty() -> bool:
        dispatcher.poll_once(wait_seconds=1)
        attrs = sqs.get_queue_attributes(
            QueueUrl=dispatcher.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return all(v == "0" for v in attrs.values())

    wait_for(empty, timeout=60, interval=0)


def test_a_dispatcher_killed_mid_batch_loses_and_double_counts_nothing(stack: Any, dataset: str) -> None:
    sqs, bucket = stack.aws.client("sqs"), stack.info.outputs["DataBucketName"]
    # A queue of this test's own (1 s visibility timeout, DLQ after 5 receives, as the stack's)
    queue = queue_like_the_stacks(stack, dataset, max_receives=5)
    dlq = sqs.get_queue_url(QueueName=f"{dataset}-dlq")["QueueUrl"]
    final = upload_silently(stack, dataset, 12, 200, seed=13)
    for key in [*final, *final]:  # every event twice
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(notification(bucket, key)))

    first = Dispatcher(stack.info, stack.aws, reconcile_every=0)
    first.queue_url = queue
    service, calls = first.app.service(), []
    decide = service.handle

    def dies_on_the_sixth(event: Any, actor: str) -> Any:
        calls.append(event.key)
        if len(calls) == 6:
            raise Killed
        return decide(event, actor)

    service.handle = dies_on_the_sixth
    # WHEN the dispatcher dies in the middle of its first batch (5 handled, none deleted)
    with pytest.raises(Killed):
        first.poll_once()
    assert len(calls) == 6
    # THEN a new one (a fresh container) gets those messages again and finishes the queue
    second = Dispatcher(stack.info, stack.aws, reconcile_every=0)
    second.queue_url = queue
    _drain(second)
    assert (
        sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"][
            "ApproximateNumberOfMessages"
        ]
        == "0"
    )
    assert_result_is(stack, dataset, final)


def _partials(stack: Any, dataset: str) -> int:
    listing = stack.aws.s3.list_objects_v2(
        Bucket=stack.info.outputs["DataBucketName"], Prefix=f"partials/{dataset}/"
    )
    return len(listing.get("Contents", []))


def test_a_worker_killed_mid_job_is_taken_over_after_its_lease(stack: Any, dataset: str) -> None:
    state = State(stack.aws.dynamodb, stack.info.outputs["StateTableName"])
    final = upload_silently(stack, dataset, 16, 20_000, seed=17)
    settings = Settings.from_env(stack.dispatcher.env)
    launcher = LocalLauncher(settings, stack.aws.client("ecs"), extra_env={"S3ROLLUP_LEASE_SECONDS": "10"})
    launcher.launch(dataset, "job-killed")
    worker = launcher.processes[-1]
    # WHEN the worker process is SIGKILLed while it computes partials
    wait_for(lambda: _partials(stack, dataset) > 0, timeout=120, interval=0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    events = [r["event"] for r in audit_records(stack, dataset)]
    assert "JOB_STARTED" in events and "RESULT_WRITTEN" not in events
    # THEN its lease keeps other jobs out until it expires ...
    assert state.lease(dataset)["job_id"] == "job-killed"
    stack.dispatcher.reconcile()
    assert state.lease(dataset)["job_id"] == "job-killed"
    wait_for(lambda: state.lease(dataset)["expires"] < int(time.time()), timeout=20)  # whole seconds
    # ... and then the next look starts a job that publishes the whole, correct result
    stack.dispatcher.reconcile()
    assert_result_is(stack, dataset, final, crashed=("job-killed",))


def test_a_dask_worker_killed_mid_computation(stack: Any, dataset: str, tmp_path: Path) -> None:
    final = upload_silently(stack, dataset, 16, 20_000, seed=19)
    with dask_processes(tmp_path, workers=2) as (address, workers):
        settings = Settings.from_env(stack.dispatcher.env).with_(dask_scheduler=address)
        job = Job(settings, task_aws(stack), dataset, "job-dask-kill", actor="test:dask-kill")
        outcome: list[int] = []
        runner = threading.Thread(target=lambda: outcome.append(job.run()))
        runner.start()
        # WHEN one of the two Dask workers dies once partials are being written
        wait_for(lambda: _partials(stack, dataset) > 0, timeout=120, interval=0.05)
        written = _partials(stack, dataset)
        workers[0].send_signal(signal.SIGKILL)
        runner.join(timeout=300)
    # THEN the scheduler gives its tasks to the other worker and the job finishes correctly
    assert outcome == [0] and written < len(final)
    assert_result_is(stack, dataset, final)


def test_a_job_left_without_dask_workers_fails_cleanly_and_is_retried(
    stack: Any, dataset: str, tmp_path: Path
) -> None:
    final = upload_silently(stack, dataset, 3, 500, seed=31)
    with dask_processes(tmp_path, workers=1) as (address, workers):
        # GIVEN a scheduler whose only worker is dead (Dask would wait for one forever)
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait(timeout=30)
        settings = Settings.from_env(stack.dispatcher.env).with_(
            dask_scheduler=address, round_timeout_seconds=3
        )
        # WHEN a job runs there
        assert Job(settings, task_aws(stack), dataset, "job-no-workers", actor="test").run() == 1
    # THEN it fails on the record, gives the lease back and publishes nothing ...
    failed = [r for r in audit_records(stack, dataset) if r["event"] == "JOB_FAILED"]
    assert [(r["job_id"], r["reason"]) for r in failed] == [("job-no-workers", "ROUND_TIMEOUT")]
    assert State(stack.aws.dynamodb, settings.state_table).lease(dataset) is None
    # ... and the next reconcile runs the job again, to the correct result
    stack.dispatcher.reconcile()
    assert_result_is(stack, dataset, final)
