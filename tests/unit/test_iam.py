"""s3rollup.iam and the request mapping of s3rollup.local_iam: IAM's documented evaluation
logic on the constructs template.yaml uses, and S3's, DynamoDB's and SQS's action mapping."""

from __future__ import annotations

from typing import Any

import pytest

from s3rollup.iam import PolicyError, Request, arn_like, conditions_hold, evaluate, like
from s3rollup.local_iam import Call, dynamodb_checks, s3_checks

ACCOUNT = "123456789012"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
SESSION = f"arn:aws:sts::{ACCOUNT}:assumed-role/stack-WorkerTaskRole-ABC/ecs-job"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/stack-WorkerTaskRole-ABC"
BUCKET = "arn:aws:s3:::stack-data"
KEY = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/k1"


def _policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def _allow(action: Any, resource: Any, **extra: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": action, "Resource": resource, **extra}


def test_wildcards_match_as_iam_documents_them() -> None:
    assert like("incoming/*", "incoming/sales/p.csv")
    assert like("part-?.csv", "part-1.csv") and not like("part-?.csv", "part-10.csv")
    assert not like("a[b]", "ab")  # brackets are literal, not a character class
    assert like("S3:getobject", "s3:GetObject", case=False)
    assert arn_like("arn:aws:iam::*:role/stack-*", ROLE)
    assert not arn_like("arn:aws:iam::*:role/other-*", ROLE)


def test_an_allowed_action_on_another_resource_is_an_implicit_deny() -> None:
    # GIVEN a role that may read partials/ only
    identity = [_policy(_allow("s3:GetObject", f"{BUCKET}/partials/*"))]
    # WHEN it reads a partial and a raw part
    ok = evaluate(Request(SESSION, "s3:GetObject", f"{BUCKET}/partials/a"), identity)
    no = evaluate(Request(SESSION, "s3:GetObject", f"{BUCKET}/incoming/a"), identity)
    # THEN only the first is allowed
    assert ok.allowed and not no.allowed and no.reason.startswith("implicit deny")


def test_a_versioned_read_needs_get_object_version_not_get_object() -> None:
    identity = [_policy(_allow("s3:GetObject", f"{BUCKET}/results/*"))]
    assert not evaluate(Request(SESSION, "s3:GetObjectVersion", f"{BUCKET}/results/m.json"), identity).allowed


def test_an_explicit_deny_in_the_bucket_policy_beats_an_identity_allow() -> None:
    # GIVEN the data bucket's TLS-only statement and a role allowed to read
    bucket_policy = _policy(
        {
            "Sid": "DenyInsecureTransport",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "s3:*",
            "Resource": [BUCKET, f"{BUCKET}/*"],
            "Condition": {"Bool": {"aws:SecureTransport": "false"}},
        }
    )
    identity = [_policy(_allow("s3:GetObject", f"{BUCKET}/*"))]
    plain = Request(SESSION, "s3:GetObject", f"{BUCKET}/a", {"aws:SecureTransport": "false"})
    tls = Request(SESSION, "s3:GetObject", f"{BUCKET}/a", {"aws:SecureTransport": "true"})
    # THEN plain HTTP is refused, even to the account root, and TLS is allowed
    assert (
        evaluate(plain, identity, bucket_policy).reason
        == "explicit deny in the resource policy (DenyInsecureTransport)"
    )
    assert not evaluate(
        Request(ROOT, "s3:GetObject", f"{BUCKET}/a", {"aws:SecureTransport": "false"}), [], bucket_policy
    ).allowed
    assert evaluate(tls, identity, bucket_policy).allowed


def _stack_key_deny(condition: dict[str, Any]) -> dict[str, Any]:
    deny = {"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject", "Resource": f"{BUCKET}/*"}
    return _policy({**deny, "Condition": condition})


def test_a_deny_with_if_exists_also_refuses_requests_without_the_key() -> None:
    # GIVEN a "stack key only" deny written with ...IfExists
    policy = _stack_key_deny(
        {"StringNotEqualsIfExists": {"s3:x-amz-server-side-encryption-aws-kms-key-id": KEY}}
    )
    # THEN an upload naming no key is refused too (a missing key makes IfExists hold)
    assert not evaluate(Request(ROOT, "s3:PutObject", f"{BUCKET}/incoming/a", {}), [], policy).allowed


def test_the_stack_key_deny_refuses_only_uploads_that_name_another_key() -> None:
    # GIVEN the template's statement: the header present (Null false) and different
    policy = _stack_key_deny(
        {
            "Null": {"s3:x-amz-server-side-encryption-aws-kms-key-id": "false"},
            "StringNotEquals": {"s3:x-amz-server-side-encryption-aws-kms-key-id": KEY},
        }
    )
    header = "s3:x-amz-server-side-encryption-aws-kms-key-id"

    def put(context: dict[str, str]) -> bool:
        return evaluate(Request(ROOT, "s3:PutObject", f"{BUCKET}/incoming/a", context), [], policy).allowed

    # THEN the stack key and no key (the default encryption applies) pass; another key does not
    assert put({header: KEY}) and put({})
    assert not put({header: KEY + "x"})


def test_a_missing_condition_key_fails_positive_operators_and_holds_negated_ones() -> None:
    st = {"Condition": {"StringLike": {"s3:prefix": ["incoming/*"]}}}
    assert not conditions_hold(st, {})
    assert conditions_hold(st, {"s3:prefix": "incoming/sales/"})
    assert conditions_hold({"Condition": {"StringNotEquals": {"s3:prefix": "x"}}}, {})
    assert conditions_hold({"Condition": {"StringLikeIfExists": {"s3:prefix": "x*"}}}, {})
    assert conditions_hold({"Condition": {"Null": {"s3:prefix": "true"}}}, {})
    # Condition keys are case-insensitive
    assert conditions_hold(
        {"Condition": {"StringEquals": {"KMS:ViaService": "s3.x"}}}, {"kms:viaservice": "s3.x"}
    )


def test_every_condition_operator_must_hold() -> None:
    st = {
        "Condition": {
            "StringEquals": {"kms:ViaService": "s3.us-east-1.amazonaws.com"},
            "StringLike": {"kms:EncryptionContext:aws:s3:arn": [BUCKET, f"{BUCKET}/*"]},
        }
    }
    ctx = {"kms:ViaService": "s3.us-east-1.amazonaws.com", "kms:EncryptionContext:aws:s3:arn": BUCKET}
    assert conditions_hold(st, ctx)
    assert not conditions_hold(st, {**ctx, "kms:ViaService": "sqs.us-east-1.amazonaws.com"})


def test_an_unsupported_operator_is_refused_loudly() -> None:
    with pytest.raises(PolicyError):
        conditions_hold(
            {"Condition": {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}}, {"aws:SourceIp": "10.1.1.1"}
        )


def _key_policy() -> dict[str, Any]:
    return _policy(
        {
            "Sid": "StackRolesUseThroughServices",
            "Effect": "Allow",
            "Principal": {"AWS": ROOT},
            "Action": ["kms:Decrypt", "kms:GenerateDataKey"],
            "Resource": "*",
            "Condition": {
                "ArnLike": {"aws:PrincipalArn": f"arn:aws:iam::{ACCOUNT}:role/stack-*"},
                "StringEquals": {"kms:ViaService": ["s3.us-east-1.amazonaws.com"]},
            },
        }
    )


def test_a_key_policy_that_delegates_to_iam_needs_an_identity_allow_too() -> None:
    ctx = {"aws:PrincipalArn": ROLE, "kms:ViaService": "s3.us-east-1.amazonaws.com"}
    request = Request(SESSION, "kms:Decrypt", KEY, ctx)
    granted = [_policy(_allow("kms:Decrypt", KEY))]
    assert evaluate(request, granted, _key_policy(), key_policy=True).allowed
    assert not evaluate(request, [], _key_policy(), key_policy=True).allowed
    # and the key policy's conditions still apply: not through S3, not allowed
    direct = Request(SESSION, "kms:Decrypt", KEY, {"aws:PrincipalArn": ROLE})
    assert not evaluate(direct, granted, _key_policy(), key_policy=True).allowed


def test_without_a_key_policy_statement_not_even_an_identity_allow_uses_a_key() -> None:
    request = Request(SESSION, "kms:Decrypt", KEY, {"aws:PrincipalArn": ROLE})
    assert not evaluate(request, [_policy(_allow("kms:*", "*"))], _policy(), key_policy=True).allowed


def _s3(method: str, path: str, query: dict[str, str] | None = None, **headers: str) -> list[tuple[str, str]]:
    call = Call(
        "s3",
        method,
        path,
        query or {},
        {k.replace("_", "-"): v for k, v in headers.items()},
        b"",
        "us-east-1",
    )
    return [(c.action, c.resource) for c in s3_checks(call)]


def test_s3_requests_map_to_the_actions_s3_authorizes() -> None:
    assert _s3("GET", "/b/k") == [("s3:GetObject", "arn:aws:s3:::b/k")]
    assert _s3("HEAD", "/b/k", {"versionId": "v1"}) == [("s3:GetObjectVersion", "arn:aws:s3:::b/k")]
    assert _s3("GET", "/b", {"versions": "", "prefix": "incoming/"}) == [
        ("s3:ListBucketVersions", "arn:aws:s3:::b")
    ]
    assert _s3("GET", "/b", {"list-type": "2"}) == [("s3:ListBucket", "arn:aws:s3:::b")]
    assert _s3("DELETE", "/b/k", {"versionId": "v"}) == [("s3:DeleteObjectVersion", "arn:aws:s3:::b/k")]
    # a copy writes its target and reads its source (at the version it names)
    assert _s3("PUT", "/b/quarantine/k", **{"x_amz_copy_source": "/b/incoming/k?versionId=v2"}) == [
        ("s3:PutObject", "arn:aws:s3:::b/quarantine/k"),
        ("s3:GetObjectVersion", "arn:aws:s3:::b/incoming/k"),
    ]


def test_a_listing_carries_its_prefix_as_a_condition_key() -> None:
    call = Call("s3", "GET", "/b", {"versions": "", "prefix": "incoming/x/"}, {}, b"", "us-east-1")
    (check,) = s3_checks(call)
    assert check.context == {"s3:prefix": "incoming/x/"}


def test_a_dynamodb_transaction_is_authorized_item_by_item() -> None:
    body = {
        "TransactItems": [
            {"Put": {"TableName": "audit"}},
            {"ConditionCheck": {"TableName": "state"}},
            {"Delete": {"TableName": "state"}},
        ]
    }
    actions = [
        (c.action, c.resource.rsplit("/", 1)[-1])
        for c in dynamodb_checks("TransactWriteItems", body, "us-east-1")
    ]
    assert actions == [
        ("dynamodb:PutItem", "audit"),
        ("dynamodb:ConditionCheckItem", "state"),
        ("dynamodb:DeleteItem", "state"),
    ]
