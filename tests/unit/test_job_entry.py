"""The worker's entry point, `python -m s3rollup.job`, and what its tasks share with it."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import runpy
import subprocess
import sys
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
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
    # THEN a task in this process (a local round's thread) gets the job's client cache
    (aws,) = seen
    assert isinstance(aws, Aws)
    assert job_module._aws() is aws


def _fresh_interpreter(code: str) -> Any:
    """What a fresh interpreter prints (as JSON) after running code."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_the_job_module_imports_what_a_round_computes_with_only_when_a_round_needs_it() -> None:
    # GIVEN a fresh interpreter WHEN it imports the worker's module (what `python -m
    # s3rollup.job` does before its first call to DynamoDB)
    loaded = _fresh_interpreter(
        "import sys, json, s3rollup.job\n"
        "later = {'pandas', 'numpy', 'pyarrow', 'dask', 'distributed', 'dask_cloudprovider',\n"
        "         'aws_lambda_powertools', 'matplotlib', 'jinja2'}\n"
        "never = {'boto3', 's3transfer', 'multiprocessing'}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & (later | never))))\n"
    )
    # THEN none of them is loaded yet: prepare_round imports them while the job waits on AWS;
    # and its clients are botocore's, without boto3's transfers (s3transfer, multiprocessing)
    assert loaded == []
    # ... and prepare_round imports everything a round computes with, and no Dask: a round on
    # the job's own threads never needs it
    missing, unneeded = _fresh_interpreter(
        "import sys, json, s3rollup.job\n"
        "s3rollup.job.prepare_round()\n"
        "needed = {'numpy', 'pyarrow', 'pyarrow.parquet', 's3rollup.stats', 's3rollup.native'}\n"
        "unneeded = {'dask', 'distributed', 'tornado', 'dask_cloudprovider', 'pandas', 'boto3'}\n"
        "print(json.dumps([sorted(needed - set(sys.modules)), sorted(unneeded & set(sys.modules))]))\n"
    )
    assert missing == [] and unneeded == []


def test_a_round_on_an_integer_key_never_imports_pandas_nor_arrow_compute_or_csv(tmp_path) -> None:
    # GIVEN the default contract (one int64 key) and a CSV part with missing values, the
    # same gzipped, and Parquet parts (written here: pyarrow's writer imports pandas)
    csv = b"id,value1,value2,value3,category\n" + b"".join(
        b"%d,%d.5,NA,%d,%d\n" % (i, i, -i, i % 7) for i in range(5000)
    )
    buf = io.BytesIO()
    keys = {c: np.arange(9) % 2 for c in ("id", "category")}
    pq.write_table(
        pa.table({**keys, **{v: np.linspace(0, 1, 9) for v in ("value1", "value2", "value3")}}), buf
    )
    # ... and one with rows whose key is missing, and missing values
    nulls = io.BytesIO()
    values = pa.array([0.5, None, 1.5, 2.5])
    columns = {"id": [1, 2, 3, 4], "value1": values, "value2": values, "value3": values}
    pq.write_table(pa.table({**columns, "category": [0, None, 1, None]}), nulls)
    paths = []
    parts = [("p.csv", csv), ("p.csv.gz", gzip.compress(csv)), ("p.parquet", buf.getvalue())]
    for name, body in [*parts, ("nulls.parquet", nulls.getvalue())]:
        (tmp_path / name).write_bytes(body)
        paths.append(str(tmp_path / name))
    # WHEN a fresh interpreter computes their partials (alone and not) as a job's tasks do,
    # merges them and encodes the result as its publish does
    loaded = _fresh_interpreter(
        "import io, json, sys\n"
        "from s3rollup.contract import DEFAULT_CONTRACT as C\n"
        "from s3rollup.job import json_rows, part_result\n"
        "from s3rollup import stats\n"
        "parts = []\n"
        f"for path in {paths!r}:\n"
        "    body = open(path, 'rb').read()\n"
        "    for alone in (False, True):\n"
        "        result, data, _ = part_result(io.BytesIO(body), len(body), 'p', C, alone)\n"
        "        assert data is not None, result\n"
        "        parts.append(stats.table_from_parquet(data))\n"
        "final = stats.finalize(stats.merge_partials(parts, C), C)\n"
        "json.dumps(json_rows(final)); stats.table_to_parquet(final)\n"
        "assert final.num_rows == 7, final.num_rows\n"
        "print(json.dumps(sorted({'pandas', 'pyarrow.compute', 'pyarrow.csv'} & set(sys.modules))))\n"
    )
    # THEN none of them was imported: a quarter of a second of every job's process
    assert loaded == []
