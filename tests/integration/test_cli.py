"""The `s3rollup` command as a user runs it (subprocesses, standard AWS environment)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from s3rollup.demo import generate_part
from tests.helpers import put_part, result_frame, run_cli, user_env, wait_manifest

pytestmark = pytest.mark.integration


def test_query_prints_the_published_result_with_only_the_endpoint_set(stack: Any, dataset: str) -> None:
    key = put_part(stack, dataset, "part-0.csv", generate_part(0, 500, seed=3))
    wait_manifest(stack, dataset, {key})
    done = run_cli(["query", dataset, "--format", "json"], user_env(stack, "reader"))
    assert done.returncode == 0, done.stderr
    printed = pd.DataFrame(json.loads(done.stdout))
    expected = result_frame(stack, dataset)
    pd.testing.assert_frame_equal(printed, expected, check_dtype=False, rtol=1e-12)


def test_query_of_an_unknown_dataset_is_one_line_and_exit_3(stack: Any) -> None:
    done = run_cli(["query", "no-such-dataset"], user_env(stack, "reader"))
    assert done.returncode == 3
    assert done.stderr.strip().count("\n") == 0 and "no result" in done.stderr


def test_query_of_a_bad_dataset_name_is_a_usage_error(stack: Any) -> None:
    done = run_cli(["query", "../etc"], user_env(stack, "reader"))
    assert done.returncode == 2 and "BAD_DATASET" in done.stderr


def test_demo_small_run_agrees_with_pandas() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3ROLLUP_"))}
    done = run_cli(["demo", "--parts", "3", "--rows", "2000", "--dataset", "smoke"], env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OK: every aggregate equals pandas complex_operation" in done.stdout
    assert "parts: 3" in done.stdout
    # moto's warning per skipped resource type is replaced by one line saying what was done.
    assert "No Moto CloudFormation support" not in done.stderr
    (note,) = [line for line in done.stderr.splitlines() if line.startswith("embedded stack: applied")]
    assert "1 AWS::SQS::QueuePolicy" in note and "not applied: the Deny statements of 3 bucket" in note


def test_up_prints_its_endpoint_and_stops_cleanly(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3ROLLUP_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "s3rollup.cli", "up", "--port", "0", "--ready-file", str(ready)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        info = json.loads(ready.read_text())
        assert info["endpoint_url"].startswith("http://127.0.0.1:")
        assert {"bucket", "queue", "audit_table", "state_table", "region"} <= set(info)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert "No Moto CloudFormation support" not in proc.stderr.read()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.org"])  # noqa: S104
def test_up_listens_on_no_address_other_machines_reach(host: str) -> None:
    done = run_cli(["up", "--port", "0", "--host", host], dict(os.environ), timeout=60)
    # The message says where it may listen: exit 2 before anything starts.
    assert done.returncode == 2
    assert done.stderr.startswith(f"s3rollup: --host {host}") and "loopback" in done.stderr
