"""The embedded stack applies from template.yaml what moto's CloudFormation skips."""

from __future__ import annotations

from typing import Any

import pytest

from s3rollup.contract import INCOMING

pytestmark = pytest.mark.integration


def test_lifecycle_and_access_logging_come_from_the_template(stack: Any, outputs: dict[str, str]) -> None:
    s3 = stack.aws.s3
    rules = s3.get_bucket_lifecycle_configuration(Bucket=outputs["DataBucketName"])["Rules"]
    by_id = {r["ID"]: r for r in rules}
    assert by_id["RawPartsTierNeverExpire"]["Filter"] == {"Prefix": INCOMING}
    assert "Expiration" not in by_id["RawPartsTierNeverExpire"]
    assert by_id["RawPartsTierNeverExpire"]["Transitions"][0]["StorageClass"] == "INTELLIGENT_TIERING"
    assert by_id["QuarantineExpires"]["Expiration"]["Days"] == 90  # the parameter's default
    for bucket, prefix in (
        (outputs["DataBucketName"], "data/"),
        (outputs["AuditAnchorBucketName"], "anchors/"),
    ):
        logging = s3.get_bucket_logging(Bucket=bucket)["LoggingEnabled"]
        assert logging["TargetPrefix"] == prefix
        target = logging["TargetBucket"]
        assert target not in (outputs["DataBucketName"], outputs["AuditAnchorBucketName"])
        encryption = s3.get_bucket_encryption(Bucket=target)["ServerSideEncryptionConfiguration"]
        assert encryption["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    # Deny statements are left out locally (moto ignores their conditions): reported, not hidden.
    assert {"DataBucketPolicy", "AuditAnchorBucketPolicy", "AccessLogBucketPolicy"} <= set(
        stack.info.not_applied
    )
