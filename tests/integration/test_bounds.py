"""What a job costs in AWS requests is counted, and the embedded stack's memory stays bounded."""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any

import pytest
from botocore.exceptions import ClientError

from s3rollup import local_iam
from s3rollup.aws import Aws
from s3rollup.config import Settings
from s3rollup.demo import generate_part
from s3rollup.job import Job
from s3rollup.local import NoncurrentExpiry, component_role
from tests.conftest import wait_for
from tests.helpers import put_part, register_quietly, silent, task_aws, wait_published

pytestmark = pytest.mark.integration


def _delta(before: dict[tuple[str, str], int], label: str) -> dict[str, int]:
    after = local_iam.requests()
    out = {api: n - before.get((who, api), 0) for (who, api), n in after.items() if who == label}
    return {api: n for api, n in sorted(out.items()) if n}


def test_every_request_is_counted_by_api_by_the_client_and_at_the_endpoint(stack: Any, dataset: str) -> None:
    # GIVEN fresh clients of the operator (the account root at the endpoint)
    aws = Aws(stack.region, stack.info.endpoint_url)
    out = stack.info.outputs
    bucket, sse = out["DataBucketName"], {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": out["DataKeyArn"]}
    before, bytes_before = local_iam.requests(), local_iam.transferred()
    # WHEN it makes a known sequence of calls: 3 PUTs, a GET, a listing in pages of one
    # key (3 pages), a HEAD of a missing key (404) and 2 reads of a DynamoDB item
    for i in range(3):
        aws.s3.put_object(Bucket=bucket, Key=f"scratch/{dataset}/k{i}", Body=b"x", **sse)
    aws.s3.get_object(Bucket=bucket, Key=f"scratch/{dataset}/k0")["Body"].read()
    pages = aws.s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"scratch/{dataset}/", PaginationConfig={"PageSize": 1}
    )
    assert sum(len(p.get("Contents", [])) for p in pages) == 3
    with pytest.raises(ClientError):
        aws.s3.head_object(Bucket=bucket, Key=f"scratch/{dataset}/missing")
    for _ in range(2):
        aws.dynamodb.get_item(TableName=out["StateTableName"], Key={"pk": {"S": "x"}, "sk": {"S": "y"}})
    # THEN the clients counted each request once, by API
    expected = {
        "dynamodb.GetItem": 2,
        "s3.GetObject": 1,
        "s3.HeadObject": 1,
        "s3.ListObjectsV2": 3,
        "s3.PutObject": 3,
    }
    assert aws.requests() == expected
    # AND the endpoint counted the same requests for the root (among its other calls)
    seen = _delta(before, "root")
    assert {api: seen.get(api, 0) for api in expected} == expected
    # AND the bytes of the one GET's response: the object's one byte
    got = local_iam.transferred()[("root", "s3.GetObject")] - bytes_before.get(("root", "s3.GetObject"), 0)
    assert got == 1


def test_a_job_logs_its_requests_by_api_as_the_endpoint_counted_them(
    stack: Any, dataset: str, caplog: pytest.LogCaptureFixture
) -> None:
    # GIVEN two parts no event announced, and a job with clients of its own (the task role's)
    frames = [generate_part(i, 100, seed=8) for i in range(2)]
    with silent(stack):
        keys = [put_part(stack, dataset, f"p{i}.csv", f) for i, f in enumerate(frames)]
    register_quietly(stack, dataset)
    aws = task_aws(stack)
    # ... and no other job running (the endpoint counts the task role's requests, any job's)
    wait_for(lambda: all(p.poll() is not None for p in stack.tasks.launcher.processes), timeout=300)
    label = f"role/{component_role(stack.aws, stack.info.stack_name, 'worker').rsplit('/', 1)[1]}"
    before = local_iam.requests()
    # WHEN the job runs
    settings = Settings.from_env(stack.dispatcher.env)
    with caplog.at_level(logging.INFO, logger="s3rollup.job"):
        assert Job(settings, aws, dataset, uuid.uuid4().hex, actor="test:requests").run() == 0
    # THEN its finish line gives its requests by API, what its clients sent
    (finished,) = [r for r in caplog.records if r.getMessage() == "job finished"]
    logged: dict[str, int] = finished.requests  # type: ignore[attr-defined]
    assert logged == aws.requests()
    assert logged["s3.PutObject"] >= 3 and logged["dynamodb.TransactWriteItems"] >= 1
    # AND the endpoint counted exactly these requests from the task role
    assert _delta(before, label) == logged
    versions = {k: v["VersionId"] for k in keys for v in [stack.aws.s3.head_object(Bucket=_b(stack), Key=k)]}
    wait_published(stack, dataset, versions, timeout=5)


def _b(stack: Any) -> str:
    return str(stack.info.outputs["DataBucketName"])


def test_noncurrent_versions_expire_after_the_scaled_noncurrent_days(stack: Any, dataset: str) -> None:
    # GIVEN a key written 3 times (2 noncurrent versions) under the bucket's lifecycle rule
    # NoncurrentVersionExpiration (NoncurrentVersionDays: 90), and a day of 0.01 s (0.9 s)
    s3, key = stack.aws.s3, f"results/{dataset}/scratch.json"
    sse = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": stack.info.outputs["DataKeyArn"]}
    written = [s3.put_object(Bucket=_b(stack), Key=key, Body=b"%d" % i, **sse)["VersionId"] for i in range(3)]
    expiry = NoncurrentExpiry(day_seconds=0.01)

    def versions() -> list[str]:
        listed = s3.list_object_versions(Bucket=_b(stack), Prefix=key).get("Versions", [])
        return sorted(v["VersionId"] for v in listed if v["Key"] == key)

    # WHEN it sweeps before the window is up, nothing goes
    expiry.sweep()
    assert versions() == sorted(written)
    # WHEN it sweeps after it
    time.sleep(1.5)
    expiry.sweep()
    # THEN only the current version is left; GETs of the others fail as after S3's lifecycle
    assert versions() == [written[-1]]
    assert s3.get_object(Bucket=_b(stack), Key=key)["Body"].read() == b"2"
    with pytest.raises(ClientError):
        s3.get_object(Bucket=_b(stack), Key=key, VersionId=written[0])


def test_the_endpoints_records_stay_bounded_and_keep_every_count(stack: Any) -> None:
    # GIVEN the decisions recorded so far
    pairs_before = local_iam.pairs()
    # WHEN many more requests than RECORDS keeps are decided
    n = local_iam.RECORDS_KEPT + 200
    sts = stack.aws.client("sts")
    for _ in range(n):
        sts.get_caller_identity()  # decided by no IAM request: counted as a request only
        stack.aws.s3.list_buckets()
    # THEN RECORDS holds a bounded sample, while the counts hold every one of them
    assert len(local_iam.RECORDS) == local_iam.RECORDS_KEPT
    before = pairs_before.get(("root", "s3:ListAllMyBuckets"), (0, 0))
    assert local_iam.pairs()[("root", "s3:ListAllMyBuckets")] == (before[0] + n, before[1])
    assert local_iam.unexpected_denials() == []


def test_a_cancelled_transaction_leaves_every_item_it_named_as_it_was(stack: Any, dataset: str) -> None:
    # GIVEN an item in the state table
    db, table = stack.aws.dynamodb, stack.info.outputs["StateTableName"]

    def key(sk: str) -> dict[str, Any]:
        return {"pk": {"S": f"bench#{dataset}"}, "sk": {"S": sk}}

    def items() -> list[dict[str, Any]]:
        return list(
            db.query(
                TableName=table,
                KeyConditionExpression="pk = :pk",
                ExpressionAttributeValues={":pk": key("")["pk"]},
                ConsistentRead=True,
            )["Items"]
        )

    db.put_item(TableName=table, Item={**key("b"), "n": {"N": "1"}})
    # WHEN a transaction puts a new item, updates that one, then fails a condition
    with pytest.raises(ClientError) as cancelled:
        db.transact_write_items(
            TransactItems=[
                {"Put": {"TableName": table, "Item": {**key("a"), "n": {"N": "1"}}}},
                {
                    "Update": {
                        "TableName": table,
                        "Key": key("b"),
                        "UpdateExpression": "SET n = :two",
                        "ExpressionAttributeValues": {":two": {"N": "2"}},
                    }
                },
                {
                    "Put": {
                        "TableName": table,
                        "Item": {**key("c"), "n": {"N": "1"}},
                        "ConditionExpression": "attribute_exists(sk)",
                    }
                },
            ]
        )
    assert cancelled.value.response["Error"]["Code"] == "TransactionCanceledException"
    # THEN nothing of it remains: no new items, the updated one as it was
    assert items() == [{**key("b"), "n": {"N": "1"}}]
    # AND the same transaction without the failing condition applies whole
    db.transact_write_items(
        TransactItems=[
            {"Put": {"TableName": table, "Item": {**key("a"), "n": {"N": "1"}}}},
            {"Delete": {"TableName": table, "Key": key("b")}},
        ]
    )
    assert items() == [{**key("a"), "n": {"N": "1"}}]


def test_the_endpoint_routes_requests_without_listing_its_packages(stack: Any, monkeypatch: Any) -> None:
    # GIVEN the running endpoint, and every directory listing counted from now on
    import os

    listed: list[str] = []
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path=".": listed.append(str(path)) or listdir(path))
    # WHEN requests to several services are routed
    stack.aws.s3.list_buckets()
    stack.aws.dynamodb.list_tables()
    stack.aws.client("sqs").list_queues()
    # THEN they were answered, and no request listed moto's package directory to route itself
    assert [p for p in listed if "moto" in p] == []


def test_object_bytes_are_sealed_on_disk_and_access_logs_come_in_batches(stack: Any, dataset: str) -> None:
    from moto.s3.models import s3_backends

    from s3rollup import local_objects
    from s3rollup.local_iam import ACCOUNT

    s3, out = stack.aws.s3, stack.info.outputs
    bucket = out["DataBucketName"]
    target = s3.get_bucket_logging(Bucket=bucket)["LoggingEnabled"]["TargetBucket"]
    backend = s3_backends[ACCOUNT]["aws"]
    batches, files = local_objects.BATCHES, local_objects.FILES  # as the stack set them up
    assert batches is not None and files is not None
    batches.flush(backend)
    logs_before = {o["Key"] for o in s3.list_objects_v2(Bucket=target, Prefix="data/").get("Contents", [])}
    # GIVEN a part whose cells are personal data, uploaded, read back and headed 20 times
    marker = f"jane.doe.{uuid.uuid4().hex}@example.com"
    body = f"id,value1,value2,value3,category\n1,0.5,1.5,2.5,{marker}\n".encode()
    key = f"incoming/{dataset}/sealed.csv"
    s3.put_object(
        Bucket=bucket, Key=key, Body=body, ServerSideEncryption="aws:kms", SSEKMSKeyId=out["DataKeyArn"]
    )
    for _ in range(20):
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == body
        s3.head_object(Bucket=bucket, Key=key)
    # THEN no file of the endpoint's holds the part's bytes in the clear
    for name in os.listdir(files.path):
        with open(os.path.join(files.path, name), "rb") as f:
            assert marker.encode() not in f.read()
    # AND the 41 requests' access-log records come in one object, not one object each
    assert batches.flush(backend) >= 1
    new = sorted(
        {o["Key"] for o in s3.list_objects_v2(Bucket=target, Prefix="data/")["Contents"]} - logs_before
    )
    records = [
        line
        for name in new
        for line in s3.get_object(Bucket=target, Key=name)["Body"].read().decode().splitlines()
        if key in line
    ]
    assert len(records) >= 41 and len(new) < 5
