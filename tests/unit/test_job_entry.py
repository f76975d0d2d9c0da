"""The worker's entry point, `python -m s3rollup.job`, and what its tasks share with it."""

from __future__ import annotations

import pickle
import runpy
import warnings
from typing import Any

import pytest

from s3rollup import job as job_module
from s3rollup import logs
from s3rollup.aws import Aws
from s3rollup.contract import DEFAULT_CONTRACT

ENV = {
    "S3ROLLUP_BUCKET": "data",
    "S3ROLLUP_KMS_KEY_ARN": "arn:aws:kms:eu-west-1:111122223333:key/k",
    "S3ROLLUP_AUDIT_TABLE": "audit",
    "S3ROLLUP_STATE_TABLE": "state",
    "S3ROLLUP_DATASET": "sales",
    "S3ROLLUP_JOB_ID": "job-1",
}


def test_running_the_module_as_a_script_runs_the_importable_module(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN the importable module's entry point, watched
    ran: list[str] = []
    monkeypatch.setattr(job_module, "run", lambda: ran.append("s3rollup.job"))

    def copy_ran(code: int) -> None:
        raise AssertionError(f"the __main__ copy of the module ran the job (exit code {code})")

    monkeypatch.setattr(logs, "exit_process", copy_ran)  # as the __main__ copy imports it
    # WHEN the file is executed as __main__, as `python -m s3rollup.job` does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already imported
        namespace = runpy.run_module("s3rollup.job", run_name="__main__")
    # THEN the job ran from s3rollup.job, not from the __main__ copy of the file
    assert ran == ["s3rollup.job"]
    assert namespace["compute_partial"] is not job_module.compute_partial
    # ... whose task function and task pickle by reference, as a Dask worker imports them
    task = job_module.PartialTask("data", "key", "sales", "incoming/sales/a.csv", "v1", DEFAULT_CONTRACT)
    function = pickle.loads(pickle.dumps(job_module.compute_partial))  # noqa: S301 - our own bytes
    assert function is job_module.compute_partial
    assert type(pickle.loads(pickle.dumps(task))) is job_module.PartialTask  # noqa: S301 - our own bytes


def test_tasks_in_the_jobs_process_use_the_jobs_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(job_module, "_process_aws", None)
    monkeypatch.setattr(job_module, "configure", lambda level: None)
    monkeypatch.setattr(job_module, "task_actor", lambda: "test")
    seen: list[Aws] = []

    def run(self: Any) -> int:
        seen.append(self.aws)
        return 0

    monkeypatch.setattr(job_module.Job, "run", run)
    # WHEN the worker's main runs a job
    assert job_module.main() == 0
    # THEN a task in this process (its LocalCluster) gets the job's client cache
    (aws,) = seen
    assert isinstance(aws, Aws)
    assert job_module._aws() is aws
