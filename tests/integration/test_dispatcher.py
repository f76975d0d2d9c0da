"""The dispatcher survives bad input and loses no good part."""

from __future__ import annotations

from typing import Any

import pytest

from s3rollup.demo import generate_part
from s3rollup.state import State
from tests.helpers import put_part, silent, wait_manifest

pytestmark = pytest.mark.integration


def test_garbage_messages_do_not_stop_good_parts(stack: Any, dataset: str) -> None:
    sqs = stack.aws.client("sqs")
    url = stack.dispatcher.queue_url
    for body in ("not json", '{"Records": [{"eventSource": "aws:s3"}]}', "{}"):
        sqs.send_message(QueueUrl=url, MessageBody=body)
    key = put_part(stack, dataset, "good.csv", generate_part(0, 100, seed=1))
    manifest = wait_manifest(stack, dataset, {key})
    assert [p["rows"] for p in manifest["parts"]] == [100]
    assert stack.dispatcher._thread.is_alive()


def test_a_part_whose_event_never_came_is_found_by_reconcile(stack: Any, dataset: str) -> None:
    with silent(stack):  # GIVEN a part whose event S3 dropped
        key = put_part(stack, dataset, "lost.csv", generate_part(0, 50, seed=2))
    state = State(stack.aws.dynamodb, stack.info.outputs["StateTableName"])
    assert state.get_part(dataset, key) is None
    # WHEN the periodic reconcile runs THEN the part is registered and rolled up
    stack.dispatcher.reconcile()
    manifest = wait_manifest(stack, dataset, {key})
    assert manifest["rows"] == 50


def test_a_deleted_part_leaves_the_result(stack: Any, dataset: str) -> None:
    keep = put_part(stack, dataset, "keep.csv", generate_part(0, 40, seed=4))
    drop = put_part(stack, dataset, "drop.csv", generate_part(1, 60, seed=4))
    wait_manifest(stack, dataset, {keep, drop})
    # moto sends no delete event: the periodic reconcile is what notices.
    stack.aws.s3.delete_object(Bucket=stack.info.outputs["DataBucketName"], Key=drop)
    stack.dispatcher.reconcile()
    manifest = wait_manifest(stack, dataset, {keep})
    assert manifest["rows"] == 40
