"""Cluster choice and the FargateCluster arguments (no cluster is started)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from s3rollup.config import Settings
from s3rollup.errors import ConfigError
from s3rollup.job import available_cpus, dask_client, fargate_cluster_kwargs

BASE = {
    "S3ROLLUP_BUCKET": "data",
    "S3ROLLUP_KMS_KEY_ARN": "arn:aws:kms:eu-west-1:111122223333:key/k",
    "S3ROLLUP_AUDIT_TABLE": "audit",
    "S3ROLLUP_STATE_TABLE": "state",
    "S3ROLLUP_ECS_CLUSTER": "arn:aws:ecs:eu-west-1:111122223333:cluster/workers",
    "S3ROLLUP_SUBNETS": "subnet-a,subnet-b",
    "S3ROLLUP_SECURITY_GROUPS": "sg-dask",
}
FARGATE = {
    **BASE,
    "S3ROLLUP_FARGATE_THRESHOLD_BYTES": str(10 << 30),
    "S3ROLLUP_FARGATE_IMAGE": "111122223333.dkr.ecr.eu-west-1.amazonaws.com/s3rollup-worker:1",
    "S3ROLLUP_FARGATE_EXECUTION_ROLE_ARN": "arn:aws:iam::111122223333:role/exec",
    "S3ROLLUP_FARGATE_TASK_ROLE_ARN": "arn:aws:iam::111122223333:role/task",
    "S3ROLLUP_FARGATE_WORKERS": "8",
}


def test_fargate_cluster_uses_pre_created_resources_private_ips_and_tls() -> None:
    kwargs = fargate_cluster_kwargs(Settings.from_env(FARGATE))
    assert kwargs["cluster_arn"] == BASE["S3ROLLUP_ECS_CLUSTER"]
    assert kwargs["subnets"] == ["subnet-a", "subnet-b"] and kwargs["security_groups"] == ["sg-dask"]
    assert kwargs["execution_role_arn"].endswith("role/exec") and kwargs["task_role_arn"].endswith(
        "role/task"
    )
    assert kwargs["fargate_use_private_ip"] is True and kwargs["n_workers"] == 8
    assert kwargs["security"].require_encryption is True
    assert kwargs["image"] == FARGATE["S3ROLLUP_FARGATE_IMAGE"]
    assert set(kwargs["environment"]) == {"S3ROLLUP_BUCKET", "S3ROLLUP_KMS_KEY_ARN"}


def test_fargate_cluster_arguments_are_accepted_by_dask_cloudprovider() -> None:
    import inspect

    from dask_cloudprovider.aws import ECSCluster
    from distributed.deploy.spec import SpecCluster

    accepted = set(inspect.signature(ECSCluster.__init__).parameters) | set(
        inspect.signature(SpecCluster.__init__).parameters
    )
    assert set(fargate_cluster_kwargs(Settings.from_env(FARGATE))) <= accepted


def test_a_fargate_threshold_without_its_resources_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="FARGATE_IMAGE"):
        Settings.from_env({**BASE, "S3ROLLUP_FARGATE_THRESHOLD_BYTES": "1"})


def test_local_cluster_is_sized_to_the_cpus_this_process_may_use() -> None:
    import os

    assert available_cpus() == len(os.sched_getaffinity(0))


def _listening_addresses(pid: int) -> list[str]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to list sockets")
def test_local_cluster_listens_on_loopback_only() -> None:
    # GIVEN the job's default cluster (no scheduler address, no Fargate threshold); this
    # process may already serve others (the tests' embedded stacks)
    before = set(_listening_addresses(os.getpid()))
    with dask_client(Settings.from_env(BASE)) as client:
        assert client.submit(sum, [1, 2]).result() == 3
        # WHEN we list the listening sockets the cluster added to this process
        addresses = sorted(set(_listening_addresses(os.getpid())) - before)
    # THEN the scheduler's and the worker's HTTP servers are there, on 127.0.0.1 only
    assert addresses
    assert all(a.startswith("127.0.0.1:") for a in addresses), addresses


def test_local_cluster_serves_nothing_over_http() -> None:
    import urllib.error
    import urllib.request

    # GIVEN the job's default cluster, whose scheduler and worker open HTTP servers
    with dask_client(Settings.from_env(BASE)) as client:
        members = [client.cluster.scheduler, *client.cluster.workers.values()]
        ports = [m.http_server.port for m in members]
        # WHEN anything asks them for distributed's pages (health, metrics, info, JSON)
        codes = []
        for port in ports:
            for path in ("/health", "/metrics", "/info/main/workers.html", "/json/identity.json"):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                        codes.append(r.status)
                except urllib.error.HTTPError as e:
                    codes.append(e.code)
    # THEN there is no such page: the job's own cluster has no other client
    assert len(codes) == 4 * len(ports) >= 8
    assert set(codes) == {404}


def test_local_cluster_sends_each_message_as_it_comes_and_still_delivers_them_all() -> None:
    # GIVEN the job's default cluster, in this process
    with dask_client(Settings.from_env(BASE)) as client:
        cluster = client.cluster
        streams = [
            client.scheduler_comm,
            *cluster.scheduler.client_comms.values(),
            *cluster.scheduler.stream_comms.values(),
            *(w.batched_stream for w in cluster.workers.values()),
        ]
        # THEN no stream between client, scheduler and worker waits to batch messages
        assert len(streams) >= 4
        assert all(stream.interval == 0 for stream in streams)
        # and many tasks' messages, sent in bursts, all arrive: every result is there
        futures = client.map(lambda i: i * i, range(500), pure=False)
        assert client.gather(futures) == [i * i for i in range(500)]
        assert client.submit(sum, range(10), pure=False).result() == 45
