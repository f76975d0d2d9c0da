"""The embedded DynamoDB's Query, which reads the partition it names
(s3rollup.local.partition_queries), answers exactly as moto's own does: order, ranges,
reverse order, paging, projections."""

from __future__ import annotations

from typing import Any

import boto3
from moto import mock_aws

from s3rollup.local import partition_queries


def _table(client: Any) -> None:
    client.create_table(
        TableName="t",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    for pk, n in (("PART#a", 300), ("CHANGE#a", 7), ("PART#b", 50)):
        for i in reversed(range(n)):
            client.put_item(
                TableName="t", Item={"pk": {"S": pk}, "sk": {"S": f"k{i:04d}"}, "v": {"N": str(i)}}
            )


def _all_pages(client: Any, **kwargs: Any) -> list[list[str]]:
    pages, start = [], None
    while True:
        page = client.query(TableName="t", **kwargs, **({"ExclusiveStartKey": start} if start else {}))
        pages.append([i["sk"]["S"] for i in page["Items"]])
        start = page.get("LastEvaluatedKey")
        if not start:
            return pages


QUERIES: list[dict[str, Any]] = [
    {"KeyConditionExpression": "pk = :p", "ExpressionAttributeValues": {":p": {"S": "CHANGE#a"}}},
    {"KeyConditionExpression": "pk = :p", "ExpressionAttributeValues": {":p": {"S": "PART#a"}}, "Limit": 64},
    {
        "KeyConditionExpression": "pk = :p AND sk > :s",
        "ExpressionAttributeValues": {":p": {"S": "PART#a"}, ":s": {"S": "k0100"}},
        "Limit": 50,
        "ScanIndexForward": False,
    },
    {
        "KeyConditionExpression": "pk = :p",
        "ExpressionAttributeValues": {":p": {"S": "PART#b"}},
        "ProjectionExpression": "sk",
        "Limit": 1,
    },
    {"KeyConditionExpression": "pk = :p", "ExpressionAttributeValues": {":p": {"S": "NONE"}}},
]


def test_partition_queries_answer_as_moto_does() -> None:
    with mock_aws():
        client = boto3.client("dynamodb", region_name="us-east-1")
        _table(client)
        before = [_all_pages(client, **q) for q in QUERIES]
        partition_queries()
        partition_queries()  # once only, whatever the number of stacks
        after = [_all_pages(client, **q) for q in QUERIES]
    assert after == before
    assert before[0] == [[f"k{i:04d}" for i in range(7)]]
    assert [len(p) for p in before[1]] == [64, 64, 64, 64, 44]
