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


def test_listing_versions_copies_no_object_and_leaves_every_version_whole(
    stack: Any, outputs: dict[str, str], dataset: str
) -> None:
    import gc

    from moto.s3.models import FakeKey

    from tests.helpers import put_version

    # GIVEN three versions of an object and a delete marker over them
    s3, bucket, key = stack.aws.s3, outputs["DataBucketName"], f"scratch/{dataset}/object"
    bodies = [bytes([i]) * (256 << 10) for i in range(3)]
    versions = [put_version(stack, key, body) for body in bodies]
    s3.delete_object(Bucket=bucket, Key=key)
    # WHEN the versions are listed, again and again (each job lists its dataset's)
    for _ in range(5):
        listed = s3.list_object_versions(Bucket=bucket, Prefix=f"scratch/{dataset}/")
    # THEN the listing is S3's: newest first, the marker the latest, sizes of each body
    assert [v["VersionId"] for v in listed["Versions"]] == versions[::-1]
    assert [v["Size"] for v in listed["Versions"]] == [len(b) for b in bodies[::-1]]
    assert not any(v["IsLatest"] for v in listed["Versions"])
    assert [m["IsLatest"] for m in listed["DeleteMarkers"]] == [True]
    # and the embedded S3 kept no copy of any object (moto's own listing makes a deep copy
    # of every version in the bucket, bytes and all, on each call, and its tracker keeps
    # them), and every version still reads whole once the listings' copies are gone
    gc.collect()
    assert len([o for o in gc.get_objects() if isinstance(o, FakeKey) and o.name == key]) == len(versions)
    for version, body in zip(versions, bodies, strict=True):
        assert s3.get_object(Bucket=bucket, Key=key, VersionId=version)["Body"].read() == body
