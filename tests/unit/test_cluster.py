"""Cluster choice per round and the FargateCluster arguments (no task cluster is started here:
tests/integration/test_task_cluster.py runs one)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from s3rollup.config import Settings
from s3rollup.errors import ConfigError
from s3rollup.job import available_cpus, cluster_security, fargate_cluster_kwargs, seal_cluster_tls
from s3rollup.member import tls_context

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
    "S3ROLLUP_FARGATE_VPC": "vpc-1",
    "S3ROLLUP_FARGATE_SCHEDULER_TASK_DEFINITION": "arn:aws:ecs:eu-west-1:111122223333:task-definition/s:1",
    "S3ROLLUP_FARGATE_WORKER_TASK_DEFINITION": "arn:aws:ecs:eu-west-1:111122223333:task-definition/w:1",
    "S3ROLLUP_FARGATE_EXECUTION_ROLE_ARN": "arn:aws:iam::111122223333:role/exec",
    "S3ROLLUP_FARGATE_TASK_ROLE_ARN": "arn:aws:iam::111122223333:role/task",
    "S3ROLLUP_FARGATE_LOG_GROUP": "/s3rollup/s/dask",
    "S3ROLLUP_FARGATE_WORKERS": "8",
    "S3ROLLUP_FARGATE_SPOT": "true",
}


class SealingKms:
    """KMS Encrypt as a test double: a ciphertext as long as the plaintext plus an
    overhead above KMS's own (a symmetric key's ciphertext adds its key's id, an IV and a
    tag to the plaintext), and each request kept."""

    OVERHEAD = 512

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def encrypt(self, **request: Any) -> dict[str, Any]:
        self.requests.append(request)
        return {"CiphertextBlob": os.urandom(len(request["Plaintext"]) + self.OVERHEAD)}


def kwargs_for(security: Any, kms: SealingKms | None = None) -> dict[str, Any]:
    sealed = seal_cluster_tls(security, kms or SealingKms(), BASE["S3ROLLUP_KMS_KEY_ARN"])
    return fargate_cluster_kwargs(Settings.from_env(FARGATE), security, sealed)


def test_fargate_cluster_gets_every_resource_so_it_creates_none() -> None:
    # GIVEN the settings the template gives the job
    kwargs = kwargs_for(cluster_security())
    # THEN each resource dask-cloudprovider would otherwise create is passed in
    assert kwargs["cluster_arn"] == BASE["S3ROLLUP_ECS_CLUSTER"]
    assert kwargs["scheduler_task_definition_arn"].endswith("task-definition/s:1")
    assert kwargs["worker_task_definition_arn"].endswith("task-definition/w:1")
    assert kwargs["execution_role_arn"].endswith("role/exec") and kwargs["task_role_arn"].endswith(
        "role/task"
    )
    assert kwargs["cloudwatch_logs_group"] == "/s3rollup/s/dask" and kwargs["vpc"] == "vpc-1"
    assert kwargs["subnets"] == ["subnet-a", "subnet-b"] and kwargs["security_groups"] == ["sg-dask"]
    # its account-wide clean-up is off; private IPs; Spot workers; 8 of them
    assert kwargs["skip_cleanup"] is True and kwargs["fargate_use_private_ip"] is True
    assert kwargs["fargate_spot"] is True and kwargs["n_workers"] == 8


def test_every_cluster_link_is_tls_with_a_certificate_of_its_own_sealed_for_the_members() -> None:
    # GIVEN two clusters' security, each sealed for its members
    first, second = cluster_security(), cluster_security()
    kms = SealingKms()
    kwargs, other = kwargs_for(first, kms), kwargs_for(second, kms)
    # THEN the job requires TLS, and so do the members
    assert kwargs["security"].require_encryption is True
    env = kwargs["environment"]
    assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
    assert "--protocol" in kwargs["scheduler_extra_args"] and "tls" in kwargs["worker_extra_args"]
    # and the members' environment has no key and no certificate, only their ciphertext
    assert "PRIVATE KEY" not in json.dumps(env) and "CERTIFICATE" not in json.dumps(env)
    assert not [name for name in env if name.startswith("DASK_DISTRIBUTED__COMM__TLS")]
    # encrypted under the stack's key, for this cluster and the purpose the policies name
    request = kms.requests[0]
    assert request["KeyId"] == env["S3ROLLUP_KMS_KEY_ARN"] == BASE["S3ROLLUP_KMS_KEY_ARN"]
    assert request["EncryptionContext"] == tls_context(env["S3ROLLUP_DASK_CLUSTER"])
    assert request["EncryptionContext"]["s3rollup:purpose"] == "dask-cluster-tls"
    assert json.loads(request["Plaintext"]) == {"cert": first.tls_ca_file, "key": first.tls_client_key}
    # and each cluster has its own key and its own id
    assert first.tls_client_key != second.tls_client_key
    assert env["S3ROLLUP_DASK_CLUSTER"] != other["environment"]["S3ROLLUP_DASK_CLUSTER"]
    # and the members' overrides fit RunTask's limit (8192 characters for all overrides),
    # with the worker's command and a ciphertext larger than KMS's
    command = ["dask-worker", "tls://10.0.0.1:8786", "--name", "x" * 36, *kwargs["worker_extra_args"]]
    environment = [{"name": k, "value": v} for k, v in env.items()]  # as RunTask takes it
    overrides = {
        "containerOverrides": [{"name": "dask-worker", "environment": environment, "command": command}]
    }
    assert len(json.dumps(overrides)) + 600 < 8192


def test_fargate_cluster_arguments_are_accepted_by_dask_cloudprovider() -> None:
    import inspect

    from dask_cloudprovider.aws import ECSCluster
    from distributed.deploy.spec import SpecCluster

    accepted = set(inspect.signature(ECSCluster.__init__).parameters) | set(
        inspect.signature(SpecCluster.__init__).parameters
    )
    assert set(kwargs_for(cluster_security())) <= accepted


@pytest.mark.parametrize(
    "missing",
    [
        "S3ROLLUP_FARGATE_SCHEDULER_TASK_DEFINITION",
        "S3ROLLUP_FARGATE_WORKER_TASK_DEFINITION",
        "S3ROLLUP_FARGATE_EXECUTION_ROLE_ARN",
        "S3ROLLUP_FARGATE_TASK_ROLE_ARN",
        "S3ROLLUP_FARGATE_LOG_GROUP",
        "S3ROLLUP_FARGATE_VPC",
        "S3ROLLUP_SECURITY_GROUPS",
    ],
)
def test_a_fargate_threshold_without_a_resource_is_a_config_error(missing: str) -> None:
    # dask-cloudprovider would create what is missing (a security group open to anywhere...)
    with pytest.raises(ConfigError, match=missing):
        Settings.from_env({k: v for k, v in FARGATE.items() if k != missing})


def test_a_round_above_the_threshold_gets_a_task_cluster_and_others_the_jobs_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import s3rollup.job as job

    # GIVEN a job whose task cluster is recorded instead of started
    opened: list[Settings] = []

    @contextlib.contextmanager
    def fake(settings: Settings) -> Iterator[str]:
        opened.append(settings)
        yield "task cluster's client"

    monkeypatch.setattr(job, "dask_client", fake)
    threshold = int(FARGATE["S3ROLLUP_FARGATE_THRESHOLD_BYTES"])
    # WHEN rounds of several sizes run
    with job.Clusters(Settings.from_env(FARGATE)) as clusters:
        got = []
        for size in (threshold + 1, 10, threshold, threshold * 2, 5):
            with clusters.for_round(size) as tasks:
                got.append(tasks)
    # THEN each round above the threshold gets a cluster of its own; the others share the
    # job's own threads
    kinds = [type(t).__name__ for t in got]
    assert kinds == ["ClusterTasks", "LocalTasks", "LocalTasks", "ClusterTasks", "LocalTasks"]
    assert got[0].client == "task cluster's client" and len(opened) == 2
    assert got[1] is got[2] is got[4] and got[1].threads == available_cpus()


def test_a_configured_scheduler_runs_every_round(monkeypatch: pytest.MonkeyPatch) -> None:
    import s3rollup.job as job

    monkeypatch.setattr(job, "dask_client", contextlib.contextmanager(lambda settings: iter(["scheduler"])))
    settings = Settings.from_env({**BASE, "S3ROLLUP_DASK_SCHEDULER": "tls://10.0.0.5:8786"})
    with job.Clusters(settings) as clusters:
        for size in (0, 10**15):
            with clusters.for_round(size) as tasks:
                assert isinstance(tasks, job.ClusterTasks) and tasks.client == "scheduler"


def test_local_tasks_are_sized_to_the_cpus_this_process_may_use() -> None:
    import os

    assert available_cpus() == len(os.sched_getaffinity(0))


def _listening_addresses(pid: int) -> list[str]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to list sockets")
def test_a_local_round_runs_on_this_process_threads_and_listens_on_nothing() -> None:
    import threading

    from s3rollup.job import Clusters

    # GIVEN the job's default settings (no scheduler address, no Fargate threshold); this
    # process may already serve others (the tests' embedded stacks)
    before = set(_listening_addresses(os.getpid()))
    with Clusters(Settings.from_env(BASE)) as clusters, clusters.for_round(1 << 30) as tasks:
        # WHEN a round's tasks run
        names = tasks.run(lambda i: (i, threading.current_thread().name), range(50))
        # THEN each ran on a thread of this process, results in order
        assert [i for i, _ in names] == list(range(50))
        assert {name.split("_")[0] for _, name in names} == {"s3rollup-task"}
        # ... and nothing listens for anyone else on the host: no scheduler, no HTTP server
        assert set(_listening_addresses(os.getpid())) - before == set()


def test_local_tasks_report_a_task_s_error_and_a_round_that_overruns() -> None:
    import threading

    from s3rollup.job import LocalTasks

    tasks = LocalTasks(2)
    release = threading.Event()
    try:
        # A task's exception reaches the round (as Dask's gather raises it)
        with pytest.raises(ZeroDivisionError):
            tasks.run(lambda x: 1 / x, [1, 0, 2])
        # A round whose tasks do not finish in time is a TimeoutError (ROUND_TIMEOUT in the job)
        with pytest.raises(TimeoutError):
            tasks.run(lambda _: release.wait(10), range(3), timeout=0.2)
    finally:
        release.set()
        tasks.close()


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({}, "missing S3ROLLUP_DASK_TLS, S3ROLLUP_DASK_CLUSTER, S3ROLLUP_KMS_KEY_ARN"),
        (
            {"S3ROLLUP_DASK_TLS": "not base64!", "S3ROLLUP_DASK_CLUSTER": "c1", "S3ROLLUP_KMS_KEY_ARN": "k"},
            "the sealed TLS of cluster c1 is not base64",
        ),
    ],
)
def test_a_member_without_its_sealed_tls_starts_nothing_and_says_why(
    env: dict[str, str], says: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from s3rollup import member

    # GIVEN a member task whose environment has no usable sealed TLS
    for name in (member.SEALED_TLS, member.CLUSTER_ID, member.KEY_ARN):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # WHEN it starts
    code = member.main(["dask-scheduler", "--protocol", "tls"])
    # THEN it exits with NO_TLS before any Dask member starts, saying why
    assert code == member.NO_TLS
    assert says in capsys.readouterr().err
    assert "DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__KEY" not in os.environ
