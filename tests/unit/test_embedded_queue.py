"""The embedded SQS counts a queue's messages only when a request asks for the counts
(s3rollup.local.count_queues_when_asked): a send's or a receive's cost does not grow with
the backlog, and GetQueueAttributes still counts exactly."""

from __future__ import annotations

from typing import Any

import boto3
from moto import mock_aws

from s3rollup import local


def test_sends_and_receives_do_not_walk_the_backlog_and_the_counts_stay_exact(monkeypatch: Any) -> None:
    from moto.sqs.models import Message

    local.count_queues_when_asked()
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
        # WHEN 50 more are sent, and 10 received
        for i in range(50):
            sqs.send_message(QueueUrl=url, MessageBody=f"n{i}")
        assert checks == 0  # moto walks the backlog for each send: 3 x 200-250 checks each
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
        # THEN the receive walked the queue only to pick its messages, not once per message
        assert len(got) == 10 and checks <= 2 * 250
        # AND the counts a request asks for are exact, right away
        attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        assert (attrs["ApproximateNumberOfMessages"], attrs["ApproximateNumberOfMessagesNotVisible"]) == (
            "240",
            "10",
        )
        sqs.send_message(QueueUrl=url, MessageBody="one more")
        attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
        assert attrs["Attributes"]["ApproximateNumberOfMessages"] == "241"
