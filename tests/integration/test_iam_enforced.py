"""The embedded endpoint authorizes every call as AWS would: the roles' policies, the bucket
and key policies, and S3's answer to a read of a missing key."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from botocore.exceptions import ClientError

from s3rollup.local import component_role
from s3rollup.local_iam import expected_denial
from tests.helpers import task_aws


def _role(stack: Any, statements: list[dict[str, Any]]) -> tuple[str, str]:
    """A throwaway role with an inline policy: (ARN, the label the endpoint records)."""
    iam = stack.aws.client("iam")
    name = f"probe-{uuid.uuid4().hex[:8]}"
    trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Principal": {"AWS": "*"}}],
    }
    arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    iam.put_role_policy(
        RoleName=name,
        PolicyName="p",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}),
    )
    return arn, f"role/{name}"


def test_a_missing_key_is_403_without_list_bucket_and_404_with_it(stack: Any, dataset: str) -> None:
    # GIVEN two roles that may read the data bucket's objects, one of them also list it
    bucket = stack.info.outputs["DataBucketName"]
    read = {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/*"}
    listing = {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}"}
    reader, reader_label = _role(stack, [read])
    lister, _ = _role(stack, [read, listing])
    key = f"contracts/{dataset}.json"
    # WHEN each reads a key that does not exist
    with expected_denial(reader_label, "s3:ListBucket"), pytest.raises(ClientError) as no_list:
        stack.aws_as(reader).s3.get_object(Bucket=bucket, Key=key)
    with pytest.raises(ClientError) as with_list:
        stack.aws_as(lister).s3.get_object(Bucket=bucket, Key=key)
    # THEN S3's answer depends on s3:ListBucket, as on AWS
    assert no_list.value.response["Error"]["Code"] == "AccessDenied"
    assert with_list.value.response["Error"]["Code"] == "NoSuchKey"


def test_the_worker_role_reads_a_partial_at_the_version_a_manifest_names(stack: Any, dataset: str) -> None:
    # GIVEN an object under partials/ written twice
    bucket = stack.info.outputs["DataBucketName"]
    key = f"partials/{dataset}/p"
    first = stack.aws.s3.put_object(Bucket=bucket, Key=key, Body=b"1")["VersionId"]
    stack.aws.s3.put_object(Bucket=bucket, Key=key, Body=b"2")
    worker = task_aws(stack)
    # WHEN the worker reads the first version (s3:GetObjectVersion, and kms:Decrypt through S3)
    body = worker.s3.get_object(Bucket=bucket, Key=key, VersionId=first)["Body"].read()
    # THEN it gets it
    assert body == b"1"


def test_the_key_is_usable_only_through_the_stack_services(stack: Any) -> None:
    # GIVEN the worker task's role, whose own policy allows kms:GenerateDataKey on the key
    role = component_role(stack.aws, stack.info.stack_name, "worker")
    label = f"role/{role.rsplit('/', 1)[-1]}"
    # WHEN it asks KMS directly for a data key
    with expected_denial(label, "kms:GenerateDataKey"), pytest.raises(ClientError) as denied:
        stack.aws_as(role).client("kms").generate_data_key(
            KeyId=stack.info.outputs["DataKeyArn"], KeySpec="AES_256"
        )
    # THEN the key policy refuses it: the stack's roles use the key through S3, SQS and DynamoDB only
    assert denied.value.response["Error"]["Code"] == "AccessDeniedException"


def test_an_upload_naming_another_key_is_refused_by_the_bucket_policy(stack: Any, dataset: str) -> None:
    # GIVEN another KMS key in the account
    other = stack.aws.client("kms").create_key(Description="not the stack key")["KeyMetadata"]["Arn"]
    bucket = stack.info.outputs["DataBucketName"]
    # WHEN the operator uploads a part under it
    with expected_denial("root", "s3:PutObject"), pytest.raises(ClientError) as denied:
        stack.aws.s3.put_object(
            Bucket=bucket,
            Key=f"incoming/{dataset}/p.csv",
            Body=b"id,category,value1,value2,value3\n",
            ServerSideEncryption="aws:kms",
            SSEKMSKeyId=other,
        )
    # THEN the bucket policy's explicit Deny refuses it, even to the account root
    assert denied.value.response["Error"]["Code"] == "AccessDenied"
    assert "DenyObjectsNotUnderTheStackKey" in denied.value.response["Error"]["Message"]
