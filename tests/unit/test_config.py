"""Settings are read once from the environment and validated."""

from __future__ import annotations

import pytest

from s3rollup.config import Settings
from s3rollup.errors import ConfigError

BASE = {
    "S3ROLLUP_BUCKET": "b",
    "S3ROLLUP_KMS_KEY_ARN": "arn:aws:kms:us-east-1:1:key/k",
    "S3ROLLUP_AUDIT_TABLE": "audit",
    "S3ROLLUP_STATE_TABLE": "state",
}


def test_settings_from_env_parse_lists_and_numbers() -> None:
    s = Settings.from_env({**BASE, "S3ROLLUP_SUBNETS": "subnet-1, subnet-2", "S3ROLLUP_MIN_GROUP_SIZE": "5"})
    assert s.subnets == ("subnet-1", "subnet-2") and s.min_group_size == 5 and s.launcher == "ecs"


@pytest.mark.parametrize(
    "env",
    [
        {k: v for k, v in BASE.items() if k != "S3ROLLUP_BUCKET"},
        {**BASE, "S3ROLLUP_MIN_GROUP_SIZE": "zero"},
        {**BASE, "S3ROLLUP_MIN_GROUP_SIZE": "0"},
        {**BASE, "S3ROLLUP_LAUNCHER": "k8s"},
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="S3ROLLUP_"):
        Settings.from_env(env)
