"""Ingest function: an SQS batch of S3 notifications in, one decision per part out.

Two decorators and one call, as powertools' batch utility intends: each SQS record is
handled alone and a failure is reported in ``batchItemFailures`` so only that message
returns to the queue (and reaches the DLQ after its receive limit). A bare S3
notification (what ``sam local invoke -e events/s3-put.json`` passes) is handled too.

On a schedule (an EventBridge "Scheduled Event", ``events/scheduled-reconcile.json``) the
function reconciles every dataset with the bucket instead: parts whose events were lost,
and parts whose job launch failed for good, are picked up without waiting for the
dataset's next upload.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer, single_metric
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from s3rollup.aws import Aws
from s3rollup.config import Settings
from s3rollup.errors import S3RollupError
from s3rollup.ingest import Ingest, Outcome, parse_notification
from s3rollup.launch import make_launcher

logger = Logger()
tracer = Tracer()
metrics = Metrics()
processor = BatchProcessor(event_type=EventType.SQS)

_ingest: Ingest | None = None


def service(aws: Aws | None = None) -> Ingest:
    """The ingest service, built once per container from the function's environment (and
    its execution role's credentials, which Lambda puts there too; the embedded stack's
    dispatcher passes them as ``aws``)."""
    global _ingest
    if _ingest is None:
        settings = Settings.from_env()
        aws = aws or Aws()
        _ingest = Ingest(settings, aws.s3, aws.dynamodb, make_launcher(settings, aws.client("ecs")))
    return _ingest


def _record(outcome: Outcome) -> None:
    metrics.add_metric(name=f"Parts{outcome.decision.title()}", unit=MetricUnit.Count, value=1)
    if outcome.decision == "REJECTED":
        # Reason codes are a small fixed set: safe as a dimension, and what operators alarm on.
        with single_metric(
            name="PartsRejectedByReason", unit=MetricUnit.Count, value=1, namespace=metrics.namespace
        ) as metric:
            metric.add_dimension(name="reason", value=outcome.reason)
    if outcome.job:
        metrics.add_metric(name="JobsLaunched", unit=MetricUnit.Count, value=1)
    logger.info(
        "part decided",
        extra={
            "decision": outcome.decision,
            "dataset": outcome.dataset,
            "reason": outcome.reason,
            "job_id": outcome.job,
        },
    )


def handle_notification(body: dict[str, Any], actor: str) -> None:
    """Decide on every S3 record of one notification."""
    for event in parse_notification(body):
        _record(service().handle(event, actor))


@tracer.capture_method
def record_handler(record: SQSRecord) -> None:
    """One SQS message: an S3 notification (or the s3:TestEvent, which is ignored)."""
    handle_notification(record.json_body, actor=f"lambda:{_request_id}")


_request_id = "-"
# Seconds kept free at the end of a scheduled run: one dataset's reconcile, and the reply.
RECONCILE_MARGIN_S = 10.0


def reconcile_all(actor: str, fired_at: str, context: LambdaContext) -> dict[str, Any]:
    """Reconcile every dataset; fail the invocation (errors metric, alarm) if any failed.

    Each run leads with another dataset (the schedule's minute picks it) and stops
    RECONCILE_MARGIN_S before the function's timeout rather than being cut off by it.
    """
    try:
        minute = int(datetime.fromisoformat(fired_at.replace("Z", "+00:00")).timestamp() // 60)
    except ValueError:
        minute = 0
    deadline = time.monotonic() + context.get_remaining_time_in_millis() / 1000 - RECONCILE_MARGIN_S
    failed = service().reconcile_all(actor, start=minute, deadline=deadline)
    metrics.add_metric(name="ReconcileFailures", unit=MetricUnit.Count, value=len(failed))
    if failed:
        raise S3RollupError(
            f"reconcile failed for {len(failed)} dataset(s): {', '.join(failed)}", "RECONCILE_FAILED"
        )
    return {"reconciled": True}


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Lambda entry point."""
    global _request_id
    _request_id = context.aws_request_id
    if event.get("source") == "aws.events" and event.get("detail-type") == "Scheduled Event":
        return reconcile_all(f"lambda:{_request_id}", str(event.get("time", "")), context)
    records = event.get("Records") or []
    if event.get("Event") == "s3:TestEvent" or (records and records[0].get("eventSource") == "aws:s3"):
        # A bare S3 notification (S3 -> Lambda, or `sam local invoke -e events/s3-put.json`).
        handle_notification(event, actor=f"lambda:{_request_id}")
        return {"batchItemFailures": []}
    response = process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
    return dict(response)
