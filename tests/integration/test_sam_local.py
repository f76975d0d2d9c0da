"""The ingest function in SAM's Lambda emulator, as `make sam-local` and `make sam-start-lambda`
run it: `sam local invoke` / `start-lambda` in the local Lambda runtime image
(functions/runtime/), against an embedded stack on the Docker bridge's gateway that runs no
function itself and starts the worker for each RunTask (the `bridge_stack` fixture plays
`s3rollup up --host 172.31.250.1 --no-dispatch`).

Without a Docker engine these tests say why and skip; with S3ROLLUP_REQUIRE_DOCKER=1 (CI)
they fail instead.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from s3rollup.demo import generate_part
from s3rollup.state import State
from tests.conftest import ROOT, load_event, retarget, wait_for
from tests.helpers import assert_equals_reference, audit_records, put_part, readme_shell_block, wait_manifest

pytestmark = [pytest.mark.integration, pytest.mark.docker, pytest.mark.slow]


def _user_env() -> dict[str, str]:
    """A user's shell: no AWS or s3rollup settings (make and s3rollup.samlocal set SAM's)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3ROLLUP_", "VIRTUAL_ENV"))}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """A command as the user runs it, in cwd (its output captured)."""
    return subprocess.run(
        args, cwd=cwd, env=_user_env(), capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def ready(bridge_stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ready file `s3rollup up --ready-file` writes, for the bridge stack."""
    path = tmp_path_factory.mktemp("sam") / "ready.json"
    path.write_text(json.dumps(bridge_stack.info.as_json()) + "\n")
    return path


def sam_local_invoke(ready: Path, event: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """`make sam-local EVENT=<event>`: the function's response (the last line SAM prints)."""
    path = tmp_path / f"event-{uuid.uuid4().hex[:8]}.json"
    path.write_text(json.dumps(event))
    done = _run(["make", "-s", "sam-local", f"READY={ready}", f"EVENT={path}"], ROOT)
    assert done.returncode == 0, f"make sam-local failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "sam local invoke IngestFunction -e" in done.stderr  # the command, as make shows it
    response: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return response


def _accepted(stack: Any, dataset: str) -> list[str]:
    return [r["key"] for r in audit_records(stack, dataset) if r["event"] == "PART_ACCEPTED"]


def _jobs(stack: Any, dataset: str) -> list[str]:
    return [r["job_id"] for r in audit_records(stack, dataset) if r["event"] == "JOB_FINISHED"]


def _job_finished(stack: Any, dataset: str) -> None:
    """The job the function launched through ECS, run by the stack, has finished."""
    wait_for(lambda: _jobs(stack, dataset), timeout=60)


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("s3-put.json", ["part-00000.csv"]),
        ("sqs-s3-put.json", ["part-00000.csv"]),
        ("sqs-s3-batch.json", ["part-00000.csv", "café part +1 100%.csv"]),
    ],
)
def test_an_upload_event_file_registers_audits_and_publishes_through_sam(
    bridge_stack: Any, ready: Path, tmp_path: Path, dataset: str, name: str, parts: list[str]
) -> None:
    # GIVEN the parts the events/ file names, uploaded into a fresh dataset
    frames = [generate_part(i, 800, seed=23) for i in range(len(parts))]
    keys = {put_part(bridge_stack, dataset, n, f) for n, f in zip(parts, frames, strict=True)}
    bucket = bridge_stack.info.outputs["DataBucketName"]
    # WHEN SAM's emulator runs the function with the file
    response = sam_local_invoke(ready, retarget(load_event(name), bucket, dataset), tmp_path)
    # THEN every part is registered and audited once, the job runs and the result equals pandas
    assert response == {"batchItemFailures": []}
    state = State(bridge_stack.aws.dynamodb, bridge_stack.info.outputs["StateTableName"])
    assert all(state.get_part(dataset, k) is not None for k in keys)
    wait_manifest(bridge_stack, dataset, keys, timeout=180)
    assert sorted(_accepted(bridge_stack, dataset)) == sorted(keys)
    _job_finished(bridge_stack, dataset)
    assert_equals_reference(bridge_stack, dataset, frames)


def test_the_delete_event_file_drops_the_part_from_the_result(
    bridge_stack: Any, ready: Path, tmp_path: Path, dataset: str
) -> None:
    from s3rollup.config import Settings
    from s3rollup.contract import parse_part_key
    from s3rollup.ingest import Ingest
    from s3rollup.launch import EcsLauncher

    # GIVEN two published parts (registered through ECS as the function registers them)
    frames = [generate_part(i, 600, seed=29) for i in range(2)]
    keys = [
        put_part(bridge_stack, dataset, n, f)
        for n, f in zip(["part-00000.csv", "b.csv"], frames, strict=True)
    ]
    settings = Settings.from_env(bridge_stack.info.function_env)
    aws = bridge_stack.aws
    ingest = Ingest(settings, aws.s3, aws.dynamodb, EcsLauncher(settings, aws.client("ecs")))
    for key in keys:
        ingest.sync(parse_part_key(key), actor="test:setup")
    wait_manifest(bridge_stack, dataset, set(keys), timeout=180)
    # WHEN the first is deleted and the function gets events/s3-delete.json
    aws.s3.delete_object(Bucket=bridge_stack.info.outputs["DataBucketName"], Key=keys[0])
    event = retarget(load_event("s3-delete.json"), bridge_stack.info.outputs["DataBucketName"], dataset)
    assert sam_local_invoke(ready, event, tmp_path) == {"batchItemFailures": []}
    # THEN the part is removed, audited so, and the next result holds only the other
    wait_manifest(bridge_stack, dataset, {keys[1]}, timeout=180)
    assert [r["key"] for r in audit_records(bridge_stack, dataset) if r["event"] == "PART_REMOVED"] == [
        keys[0]
    ]
    assert_equals_reference(bridge_stack, dataset, frames[1:])


def _function_records(stack: Any) -> int:
    """Audit records the function wrote, in every dataset (jobs of other tests write too)."""
    pages = stack.aws.dynamodb.get_paginator("scan").paginate(TableName=stack.info.outputs["AuditTableName"])
    return sum(
        str(item.get("actor", {}).get("S", "")).startswith("lambda:")
        for page in pages
        for item in page["Items"]
    )


@pytest.mark.parametrize("name", ["s3-test-event.json", "sqs-s3-test-event.json"])
def test_s3s_test_event_files_change_nothing(
    bridge_stack: Any, ready: Path, tmp_path: Path, name: str
) -> None:
    before = _function_records(bridge_stack)
    response = sam_local_invoke(ready, load_event(name), tmp_path)
    assert response == {"batchItemFailures": []}
    assert _function_records(bridge_stack) == before


def test_a_bad_part_is_quarantined_with_its_reason_through_sam(
    bridge_stack: Any, ready: Path, tmp_path: Path, dataset: str
) -> None:
    # GIVEN a part whose value does not parse, and its SQS event
    key = put_part(
        bridge_stack, dataset, "part-00000.csv", b"id,value1,value2,value3,category\n1,x,1.5,2.5,3\n"
    )
    bucket = bridge_stack.info.outputs["DataBucketName"]
    event = retarget(load_event("sqs-s3-put.json"), bucket, dataset)
    # WHEN the function runs in SAM's emulator
    assert sam_local_invoke(ready, event, tmp_path) == {"batchItemFailures": []}
    # THEN it is rejected once with its reason, and copied to quarantine/ with a reason sidecar
    (rejected,) = [r for r in audit_records(bridge_stack, dataset) if r["event"] == "PART_REJECTED"]
    assert (rejected["key"], rejected["reason"]) == (key, "BAD_VALUE")
    sidecar = bridge_stack.aws.s3.get_object(
        Bucket=bucket, Key=f"quarantine/{dataset}/part-00000.csv.reason.json"
    )
    reason = json.loads(sidecar["Body"].read())
    assert (reason["code"], reason["key"]) == ("BAD_VALUE", key)
    assert _jobs(bridge_stack, dataset) == []


def test_the_scheduled_event_finds_a_part_whose_event_was_dropped(
    bridge_stack: Any, ready: Path, tmp_path: Path, dataset: str
) -> None:
    # GIVEN a part whose event never reached the function (no dispatcher runs here)
    frame = generate_part(0, 700, seed=31)
    key = put_part(bridge_stack, dataset, "lost.csv", frame)
    # WHEN the schedule's event (events/scheduled-reconcile.json) runs the function
    response = sam_local_invoke(ready, load_event("scheduled-reconcile.json"), tmp_path)
    # THEN the part is registered and audited once, and published
    assert response == {"reconciled": True}
    wait_manifest(bridge_stack, dataset, {key}, timeout=180)
    assert _accepted(bridge_stack, dataset) == [key]
    _job_finished(bridge_stack, dataset)
    assert_equals_reference(bridge_stack, dataset, [frame])


def test_the_readme_sam_local_block_runs_as_written_and_a_repeated_event_registers_once(
    bridge_stack: Any, tmp_path: Path, dataset: str
) -> None:
    # The user's directory: the checkout (its venvs, Makefile and build) and the ready file.
    for entry in ROOT.iterdir():
        if entry.name not in {".git", "ready.json"}:
            (tmp_path / entry.name).symlink_to(entry)
    (tmp_path / "ready.json").write_text(json.dumps(bridge_stack.info.as_json()) + "\n")
    script = re.sub(r"\bsales\b", dataset, readme_shell_block("sam-local"))
    done = _run(["bash", "-euo", "pipefail", "-c", script], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Each invocation answered with no failed message; the part was registered once, one job ran.
    assert done.stdout.count('{"batchItemFailures": []}') == 2
    key = f"incoming/{dataset}/part-3.csv"
    assert _accepted(bridge_stack, dataset) == [key]
    assert "lag: up to date" in done.stdout
    _job_finished(bridge_stack, dataset)
    frame = pd.read_csv(tmp_path / "part-3.csv")
    assert_equals_reference(bridge_stack, dataset, [frame])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture()
def start_lambda(ready: Path) -> Iterator[str]:
    """`make sam-start-lambda` serving the Lambda Invoke API; yields its endpoint."""
    port = _free_port()
    proc = subprocess.Popen(
        ["make", "-s", "sam-start-lambda", f"READY={ready}", f"LAMBDA_PORT={port}"],
        cwd=ROOT,
        env=_user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # SAM removes its warm container as it stops
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_start_lambda_serves_boto3s_invoke(
    bridge_stack: Any, start_lambda: str, tmp_path: Path, dataset: str
) -> None:
    import boto3
    from botocore.config import Config

    from s3rollup.ops import part_events

    # GIVEN a part and its SQS event, as `s3rollup event put` makes them
    frame = generate_part(0, 900, seed=37)
    key = put_part(bridge_stack, dataset, "part-0.csv", frame)
    head = bridge_stack.aws.s3.head_object(Bucket=bridge_stack.info.outputs["DataBucketName"], Key=key)
    uploaded = [
        {
            "key": key,
            "bytes": head["ContentLength"],
            "etag": head["ETag"].strip('"'),
            "version_id": head["VersionId"],
        }
    ]
    outputs = bridge_stack.info.outputs
    _, sqs_event = part_events(
        bridge_stack.aws, outputs["DataBucketName"], outputs["IngestQueueUrl"], uploaded
    )
    # WHEN boto3 invokes the function on `sam local start-lambda`, twice (the second is warm)
    client = boto3.client(
        "lambda",
        endpoint_url=start_lambda,
        region_name="us-east-1",
        aws_access_key_id="sam",
        aws_secret_access_key="sam",
        config=Config(read_timeout=300, retries={"max_attempts": 0}),
    )
    answers = []
    for _ in range(2):
        out = client.invoke(FunctionName="IngestFunction", Payload=json.dumps(sqs_event).encode())
        assert "FunctionError" not in out, out["Payload"].read()
        answers.append(json.loads(out["Payload"].read()))
    # THEN the part is registered once and the published result equals pandas
    assert answers == [{"batchItemFailures": []}] * 2
    wait_manifest(bridge_stack, dataset, {key}, timeout=180)
    assert _accepted(bridge_stack, dataset) == [key]
    _job_finished(bridge_stack, dataset)
    assert_equals_reference(bridge_stack, dataset, [frame])
