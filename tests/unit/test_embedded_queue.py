"""The embedded SQS counts a queue's messages at most once a second
(s3rollup.local.approximate_queue_counts), so a request's cost does not grow with the
backlog, and the counts it reports are still right once that second has passed."""

from __future__ import annotations

import time
from typing import Any

import boto3
from moto import mock_aws

from s3rollup import local


def test_sends_into_a_backlog_do_not_walk_it_and_the_counts_stay_right(monkeypatch: Any) -> None:
    from moto.sqs.models import Message

    local.approximate_queue_counts()
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        url = sqs.create_queue(QueueName="backlog")["QueueUrl"]
        for i in range(200):
            sqs.send_message(QueueUrl=url, MessageBody=f"m{i}")
        # GIVEN 200 queued messages, and every visibility check of a message counted
        checks = 0
        visible = Message.visible

        def counted(self: Any) -> bool:
            nonlocal checks
            checks += 1
            return bool(visible.fget(self))  # type: ignore[attr-defined]

        monkeypatch.setattr(Message, "visible", property(counted))
        # WHEN 50 more are sent within a second
        for i in range(50):
            sqs.send_message(QueueUrl=url, MessageBody=f"n{i}")
        # THEN the backlog was walked at most once (moto walks it for each send)
        assert checks <= 2 * 250
        # AND once the kept counts are a second old, they count every message
        time.sleep(local.QUEUE_COUNT_SECONDS + 0.1)
        attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        assert attrs["ApproximateNumberOfMessages"] == "250"
        assert attrs["ApproximateNumberOfMessagesNotVisible"] == "0"
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
        assert len(got) == 10
        time.sleep(local.QUEUE_COUNT_SECONDS + 0.1)
        attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        assert (attrs["ApproximateNumberOfMessages"], attrs["ApproximateNumberOfMessagesNotVisible"]) == (
            "240",
            "10",
        )
