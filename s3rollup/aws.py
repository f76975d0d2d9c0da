"""AWS clients, created lazily and shared; the standard endpoint and credential chain apply.

botocore honours AWS_ENDPOINT_URL, so the same code talks to the embedded endpoint or to AWS.
When the endpoint is on this machine and no credentials are configured, the embedded
endpoint's throwaway credentials are used so a user needs only AWS_ENDPOINT_URL.

The clients are botocore's, from a botocore session: boto3's session makes the same
clients and adds resources and S3's managed transfers, which the job and the Lambda never
use, and importing boto3 brings s3transfer and multiprocessing into every job's process
(about 15-20 ms). The one managed transfer, ``s3rollup upload``'s, uses boto3's S3Transfer
on these clients (ops.upload_parts).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

import botocore.session
from botocore.config import Config

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# The embedded endpoint's throwaway operator credentials (the account root there).
LOCAL_OPERATOR = {"AccessKeyId": "s3rollup-local", "SecretAccessKey": "s3rollup-local"}
_CONFIG = Config(
    retries={"mode": "standard", "max_attempts": 6},
    connect_timeout=5,
    read_timeout=60,
    max_pool_connections=32,
)


def is_local_endpoint(url: str | None) -> bool:
    """True when url points at this machine (the embedded endpoint)."""
    return bool(url) and (urlparse(url).hostname or "") in _LOOPBACK


def object_at(bucket: str, key: str, version_id: str | None) -> dict[str, str]:
    """An object's identity for get_object or CopySource: that version, unless the bucket had
    no versioning when it was written (S3 calls that version "null")."""
    ref = {"Bucket": bucket, "Key": key}
    if version_id and version_id != "null":
        ref["VersionId"] = version_id
    return ref


class Aws:
    """A thread-safe cache of botocore clients for one region and endpoint.

    Every HTTP request its clients send (retries and pages included) is counted by API,
    e.g. ``s3.GetObject``: ``requests()`` is what this cache's user cost in AWS requests.
    """

    def __init__(
        self,
        region: str | None = None,
        endpoint_url: str | None = None,
        credentials: Mapping[str, str] | None = None,
    ) -> None:
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        # An identity of its own (e.g. an assumed role's keys), instead of the standard chain.
        self.credentials = dict(credentials) if credentials else None
        self.region = (
            region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        )
        self._session: botocore.session.Session | None = None
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self._requests_lock = threading.Lock()

    def _new_session(self) -> botocore.session.Session:
        session = botocore.session.get_session()
        if self.credentials:
            session.set_credentials(
                self.credentials["AccessKeyId"],
                self.credentials["SecretAccessKey"],
                self.credentials.get("SessionToken"),
            )
        elif is_local_endpoint(self.endpoint_url) and session.get_credentials() is None:
            session.set_credentials(LOCAL_OPERATOR["AccessKeyId"], LOCAL_OPERATOR["SecretAccessKey"])
        return session

    def client(self, service: str) -> Any:
        """The shared client for a service (created on first use)."""
        with self._lock:
            if service not in self._clients:
                if self._session is None:
                    self._session = self._new_session()
                client = self._session.create_client(
                    service, region_name=self.region, endpoint_url=self.endpoint_url, config=_CONFIG
                )
                # before-send fires once per HTTP attempt: each is a billed request.
                client.meta.events.register("before-send", self._count)
                self._clients[service] = client
            return self._clients[service]

    def _count(self, event_name: str = "", **_: Any) -> None:
        # event_name: "before-send.<service>.<Operation>"; returning None lets the request go.
        api = event_name.split(".", 1)[-1]
        with self._requests_lock:
            self._requests[api] += 1

    def requests(self) -> dict[str, int]:
        """Requests sent so far by this cache's clients, by API (``s3.GetObject``: n), sorted."""
        with self._requests_lock:
            return dict(sorted(self._requests.items()))

    @property
    def s3(self) -> Any:
        """S3 client."""
        return self.client("s3")

    @property
    def dynamodb(self) -> Any:
        """DynamoDB client."""
        return self.client("dynamodb")


def assume_role(aws: Aws, role_arn: str, session: str) -> dict[str, str]:
    """A role's temporary credentials from STS (as Lambda and ECS take their roles')."""
    creds: dict[str, str] = aws.client("sts").assume_role(RoleArn=role_arn, RoleSessionName=session[:64])[
        "Credentials"
    ]
    return creds


def credentials_env(creds: Mapping[str, str]) -> dict[str, str]:
    """Temporary credentials as the environment variables every SDK reads."""
    return {
        "AWS_ACCESS_KEY_ID": creds["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"],
        "AWS_SESSION_TOKEN": creds["SessionToken"],
    }
