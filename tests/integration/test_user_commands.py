"""The user's side as a user runs it: `aws s3 cp`, plain boto3, `s3rollup put | status | query |
rebuild | report`, each by subprocess against the session's embedded stack."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import boto3
import pandas as pd
import pytest

from s3rollup.contract import merged_partial_key
from s3rollup.demo import generate_part, to_csv_bytes
from s3rollup.local_iam import expected_denial
from tests.conftest import ROOT, wait_for
from tests.helpers import (
    assert_equals_reference,
    audit_records,
    manifest,
    put_part,
    result_frame,
    run_cli,
    user_env,
    wait_manifest,
)

pytestmark = pytest.mark.integration

AWS_CLI = ROOT / ".venv-aws" / "bin" / "aws"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _assert_under_stack_key(stack: Any, key: str) -> None:
    head = stack.aws.s3.head_object(Bucket=stack.info.outputs["DataBucketName"], Key=key)
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["SSEKMSKeyId"] == stack.info.outputs["DataKeyArn"]


def test_aws_cli_cp_triggers_the_pipeline_as_documented(stack: Any, dataset: str, tmp_path: Path) -> None:
    """The exact command of the README's tour: a plain `aws s3 cp`, no encryption flags."""
    if not AWS_CLI.exists():
        pytest.fail(f"{AWS_CLI} is missing: `make awscli` installs it (make test does)")
    frame = generate_part(0, 700, seed=11)
    part = tmp_path / "part.csv"
    part.write_bytes(to_csv_bytes(frame))
    bucket = stack.info.outputs["DataBucketName"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    # What the README tells a user of the embedded stack to export.
    env.update(AWS_ACCESS_KEY_ID="s3rollup-local", AWS_SECRET_ACCESS_KEY="s3rollup-local")
    env["AWS_DEFAULT_REGION"] = stack.info.region
    done = subprocess.run(
        [
            str(AWS_CLI),
            "--endpoint-url",
            stack.info.endpoint_url,
            "s3",
            "cp",
            str(part),
            f"s3://{bucket}/incoming/{dataset}/",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    key = f"incoming/{dataset}/part.csv"
    _assert_under_stack_key(stack, key)  # the bucket's default encryption
    wait_manifest(stack, dataset, {key})
    assert_equals_reference(stack, dataset, [frame])


def test_plain_boto3_put_object_triggers_the_pipeline(stack: Any, dataset: str) -> None:
    frame = generate_part(1, 400, seed=12)
    creds = stack.credentials("producer")  # a role with the template's ProducerPolicy only
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.info.endpoint_url,
        region_name=stack.info.region,
        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=creds["AWS_SESSION_TOKEN"],
    )
    key = f"incoming/{dataset}/plain.csv"
    s3.put_object(Bucket=stack.info.outputs["DataBucketName"], Key=key, Body=to_csv_bytes(frame))
    _assert_under_stack_key(stack, key)
    wait_manifest(stack, dataset, {key})
    assert_equals_reference(stack, dataset, [frame])


def test_put_uploads_small_and_multipart_parts_quietly_in_a_pipe(
    stack: Any, dataset: str, tmp_path: Path
) -> None:
    small, large = generate_part(0, 300, seed=5), generate_part(1, 120_000, seed=5)
    (tmp_path / "small.csv").write_bytes(to_csv_bytes(small))
    (tmp_path / "large.csv").write_bytes(to_csv_bytes(large))
    assert (tmp_path / "large.csv").stat().st_size > 6 << 20  # two 5 MiB parts at least
    done = run_cli(
        [
            "put",
            str(tmp_path / "small.csv"),
            str(tmp_path / "large.csv"),
            "--dataset",
            dataset,
            "--multipart-threshold",
            "5",
        ],
        user_env(stack, "producer"),
    )
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "[#" not in done.stderr  # no progress bar in a pipe
    uploaded = {d["key"]: d for d in map(json.loads, done.stdout.splitlines())}
    keys = {f"incoming/{dataset}/small.csv", f"incoming/{dataset}/large.csv"}
    assert set(uploaded) == keys
    assert uploaded[f"incoming/{dataset}/large.csv"]["multipart"] is True
    assert uploaded[f"incoming/{dataset}/large.csv"]["etag"].endswith("-2")
    assert uploaded[f"incoming/{dataset}/small.csv"]["multipart"] is False
    for key in keys:
        _assert_under_stack_key(stack, key)
    # S3 keeps the one-PUT part's SHA-256 (a multipart upload's is a checksum of checksums);
    # the manifest records each body's SHA-256 either way
    bucket = stack.info.outputs["DataBucketName"]
    small_key, large_key = (f"incoming/{dataset}/{n}.csv" for n in ("small", "large"))
    head = stack.aws.s3.head_object(Bucket=bucket, Key=small_key, ChecksumMode="ENABLED")
    assert base64.b64decode(head["ChecksumSHA256"]) == hashlib.sha256(to_csv_bytes(small)).digest()
    manifest = wait_manifest(stack, dataset, keys)
    assert {p["key"]: p["sha256"] for p in manifest["parts"]} == {
        small_key: hashlib.sha256(to_csv_bytes(small)).hexdigest(),
        large_key: hashlib.sha256(to_csv_bytes(large)).hexdigest(),
    }
    assert_equals_reference(stack, dataset, [small, large])


def _shape(node: Any) -> Any:
    """The keys of a JSON document, recursively (values left out)."""
    if isinstance(node, dict):
        return {k: _shape(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_shape(v) for v in node[:1]]
    return None


def _sam_event_template(name: str) -> dict[str, Any]:
    found = sorted(
        (ROOT / ".venv-sam").glob(
            f"lib/python*/site-packages/samcli/lib/generated_sample_events/events/{name}"
        )
    )
    if not found:
        pytest.skip(
            f"SAM CLI's event templates are not installed (`make template` installs .venv-sam): {name}"
        )
    # SAM's templates are mustache: the placeholders are values, the keys are what matter here.
    return dict(json.loads(found[0].read_text()))


def test_event_put_uploads_and_prints_the_events_sam_would_generate(
    stack: Any, lambda_app: Any, dataset: str, tmp_path: Path
) -> None:
    from s3rollup.local import FakeContext

    frame = generate_part(0, 400, seed=9)
    (tmp_path / "a part+1.csv").write_bytes(to_csv_bytes(frame))
    s3_file, sqs_file = tmp_path / "s3.json", tmp_path / "sqs.json"
    args = ["event", "put", str(tmp_path / "a part+1.csv"), "--dataset", dataset]
    done = run_cli(
        [*args, "--s3-file", str(s3_file), "--sqs-file", str(sqs_file)], user_env(stack, "producer")
    )
    assert done.returncode == 0, done.stderr
    s3_event, sqs_event = map(json.loads, done.stdout.splitlines())
    assert (s3_event, sqs_event) == (json.loads(s3_file.read_text()), json.loads(sqs_file.read_text()))
    # THEN both are shaped as `sam local generate-event s3 put` / `sqs receive-message` make them
    s3_template = _sam_event_template("s3/S3Put.json")
    # (S3 names the version in a versioned bucket; SAM's template leaves it out)
    assert _without_version(_shape(s3_event)) == _shape(s3_template)
    assert _shape(sqs_event) == _shape(_sam_event_template("sqs/Sqs.json"))
    # ... and name the uploaded part and the stack's queue as S3 and Lambda would
    key = f"incoming/{dataset}/a part+1.csv"
    head = stack.aws.s3.head_object(Bucket=stack.info.outputs["DataBucketName"], Key=key)
    (record,) = s3_event["Records"]
    assert record["s3"]["bucket"]["name"] == stack.info.outputs["DataBucketName"]
    assert record["s3"]["object"]["key"] == f"incoming/{dataset}/a+part%2B1.csv"
    assert record["s3"]["object"]["versionId"] == head["VersionId"]
    assert record["s3"]["object"]["size"] == head["ContentLength"]
    (message,) = sqs_event["Records"]
    assert message["eventSourceARN"] == stack.info.queue_arn
    assert json.loads(message["body"]) == {"Records": [record]}
    assert message["md5OfBody"] == hashlib.md5(message["body"].encode()).hexdigest()  # noqa: S324
    # WHEN the function gets the SQS event (S3's own notification reached the dispatcher too)
    response = lambda_app.handler(sqs_event, FakeContext("IngestFunction"))
    # THEN the part is accepted once and the result published
    assert response == {"batchItemFailures": []}
    wait_manifest(stack, dataset, {key})
    accepted = [r for r in audit_records(stack, dataset) if r["event"] == "PART_ACCEPTED"]
    assert [r["key"] for r in accepted] == [key]
    assert_equals_reference(stack, dataset, [frame])


def _without_version(shape: Any) -> Any:
    shape["Records"][0]["s3"]["object"].pop("versionId", None)
    return shape


def test_put_of_a_missing_file_uploads_nothing(stack: Any, dataset: str, tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_bytes(to_csv_bytes(generate_part(0, 10, seed=1)))
    done = run_cli(
        ["put", str(good), str(tmp_path / "absent.csv"), "--dataset", dataset], user_env(stack, "producer")
    )
    assert done.returncode == 3
    assert done.stderr.strip().count("\n") == 0 and "absent.csv" in done.stderr
    listed = stack.aws.s3.list_objects_v2(
        Bucket=stack.info.outputs["DataBucketName"], Prefix=f"incoming/{dataset}/"
    )
    assert listed.get("KeyCount", 0) == 0


def test_status_counts_parts_names_quarantine_reasons_and_never_a_cell_value(
    stack: Any, dataset: str
) -> None:
    good = put_part(stack, dataset, "good.csv", generate_part(0, 200, seed=2))
    # A cell that is not a number: the part is quarantined; its value must not be shown.
    bad_body = b"id,value1,value2,value3,category\n1,0.5,1.5,2.5,7\n2,SECRET-CELL-42,1.0,2.0,3\n"
    put_part(stack, dataset, "bad.csv", bad_body)
    wait_manifest(stack, dataset, {good})
    wait_for(lambda: any(r["event"] == "PART_REJECTED" for r in audit_records(stack, dataset)))
    wait_for(lambda: _idle(stack, dataset))
    done = run_cli(["status", dataset, "--format", "json"], user_env(stack, "reader"))
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["parts"] == {"AGGREGATED": 1, "REJECTED": 1}
    assert status["result"]["parts"] == 1 and status["lag"]["up_to_date"] is True
    assert status["lag"]["seconds"] >= 0
    assert status["last_job"]["event"] in ("JOB_STARTED", "JOB_FINISHED")
    [q] = status["quarantined"]
    assert q["key"] == f"incoming/{dataset}/bad.csv" and re.fullmatch(r"[A-Z_]+", q["reason"])
    table = run_cli(["status", dataset], user_env(stack, "reader"))
    assert table.returncode == 0 and f"quarantined incoming/{dataset}/bad.csv: {q['reason']}" in table.stdout
    for out in (done.stdout, table.stdout, done.stderr, table.stderr):
        assert "SECRET-CELL-42" not in out


def test_status_of_an_unknown_dataset_says_what_to_do(stack: Any) -> None:
    done = run_cli(["status", "never-seen"], user_env(stack, "reader"))
    assert done.returncode == 3 and "s3rollup put" in done.stderr
    assert done.stderr.strip().count("\n") == 0


def test_query_selects_groups_and_columns(stack: Any, dataset: str) -> None:
    key = put_part(stack, dataset, "p.csv", generate_part(0, 2000, seed=4))
    wait_manifest(stack, dataset, {key})
    full = result_frame(stack, dataset)
    wanted = [str(full["category"].iloc[0]), str(full["category"].iloc[3])]
    done = run_cli(
        ["query", dataset, "--group", *wanted, "--columns", "value1_mean,value2_std", "--format", "json"],
        user_env(stack, "reader"),
    )
    assert done.returncode == 0, done.stderr
    got = pd.DataFrame(json.loads(done.stdout))
    assert list(got.columns) == ["category", "value1_mean", "value2_std"]
    expected = full[full["category"].astype(str).isin(wanted)][list(got.columns)].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, rtol=1e-12)
    csv = run_cli(["query", dataset, "--columns", "rows", "--format", "csv"], user_env(stack, "reader"))
    assert csv.returncode == 0 and csv.stdout.splitlines()[0] == "category,rows"
    bad = run_cli(["query", dataset, "--columns", "nope"], user_env(stack, "reader"))
    assert bad.returncode == 2 and "UNKNOWN_COLUMN" in bad.stderr and "value1_mean" in bad.stderr
    missing = run_cli(["query", dataset, "--group", "no-such-group"], user_env(stack, "reader"))
    assert missing.returncode == 2 and "UNKNOWN_GROUP" in missing.stderr


def test_rebuild_recomputes_every_partial_and_equals_pandas(stack: Any, dataset: str) -> None:
    frames = [generate_part(i, 1500, seed=8) for i in range(3)]
    keys = {put_part(stack, dataset, f"part-{i}.csv", f) for i, f in enumerate(frames)}
    first = wait_manifest(stack, dataset, keys)
    wait_for(lambda: _idle(stack, dataset))
    # The stored partials are lost: only a rebuild from the parts can publish again.
    s3, bucket = stack.aws.s3, stack.info.outputs["DataBucketName"]

    def part_partials() -> list[str]:
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"partials/{dataset}/").get("Contents", [])
        return [
            o["Key"] for o in listed if o["Key"].count("/") == 2 and o["Key"] != merged_partial_key(dataset)
        ]

    # (the merges too, the last one and the manifest segments': a rebuild must not need them)
    assert len(part_partials()) == 3
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"partials/{dataset}/").get("Contents", [])
    assert len(listed) == 5  # 3 parts', the result's merge, one segment's
    for obj in listed:
        s3.delete_object(Bucket=bucket, Key=obj["Key"])
    done = run_cli(["rebuild", dataset, "--timeout", "240"], user_env(stack), timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr  # the spinner stays off in a pipe
    rebuilt = manifest(stack, dataset)
    assert rebuilt is not None and rebuilt["job_id"] != first["job_id"]
    assert {p["key"] for p in rebuilt["parts"]} == keys
    assert len(part_partials()) == 3
    assert_equals_reference(stack, dataset, frames)
    events = [r["event"] for r in audit_records(stack, dataset)]
    assert events.count("REBUILD_REQUESTED") == 1
    assert events.count("PART_AGGREGATED") == 6  # each part twice: first run and rebuild
    verify = run_cli(["audit", "verify", dataset], user_env(stack, "reader"))
    assert verify.returncode == 0, verify.stderr


def _idle(stack: Any, dataset: str) -> bool:
    from s3rollup.state import State

    state = State(stack.aws.dynamodb, stack.info.outputs["StateTableName"])
    records = audit_records(stack, dataset)
    return state.lease(dataset) is None and bool(records) and records[-1]["event"] == "JOB_FINISHED"


def test_rebuild_of_a_dataset_without_parts_is_exit_3(stack: Any) -> None:
    done = run_cli(["rebuild", "nothing-here"], user_env(stack))
    assert done.returncode == 3 and "no accepted parts" in done.stderr


def _chromium(args: list[str], profile: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, check=False)


def test_report_is_self_contained_and_renders_in_chromium(stack: Any, dataset: str, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(
            "SKIPPED LOUDLY: headless Chromium is not installed (apt-get install chromium); "
            "the report's rendering is NOT checked"
        )
    key = put_part(stack, dataset, "p.csv", generate_part(0, 3000, seed=9))
    wait_manifest(stack, dataset, {key})
    out = tmp_path / "report.html"
    done = run_cli(["report", dataset, "-o", str(out)], user_env(stack, "reader"))
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    # Nothing to fetch: no external references of any kind.
    assert not re.search(r"""(src|href)\s*=|url\(|@import|https?://""", page)
    groups = len(result_frame(stack, dataset))
    with tempfile.TemporaryDirectory() as profile:
        dom = _chromium(["--dump-dom", out.as_uri()], profile)
        assert dom.returncode == 0, dom.stderr[-2000:]
        shot = tmp_path / "report.png"
        png = _chromium([f"--screenshot={shot}", "--window-size=1000,1400", out.as_uri()], profile)
        assert png.returncode == 0, png.stderr[-2000:]
    html = dom.stdout
    tbody = html.split('<table id="stats">', 1)[1].split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    assert tbody.count("<tr>") == groups
    for chart in ("chart-mean-value1", "chart-mean-value2", "chart-mean-value3", "chart-sizes"):
        assert f'id="{chart}"' in html
    mean_chart = html.split('id="chart-mean-value1"', 1)[1].split("</svg>", 1)[0]
    assert mean_chart.count("<circle") == groups
    assert html.split('id="chart-sizes"', 1)[1].split("</svg>", 1)[0].count("<rect") >= 1
    assert shot.stat().st_size > 10_000  # a drawn page, not an empty one


def test_put_without_upload_permission_says_access_denied_in_one_line(
    stack: Any, dataset: str, tmp_path: Path
) -> None:
    # GIVEN a reader (ReaderPolicy only: no s3:PutObject on incoming/)
    part = tmp_path / "p.csv"
    part.write_bytes(to_csv_bytes(generate_part(0, 50, seed=3)))
    reader = f"role/local-{stack.info.stack_name}-reader"
    # WHEN it tries to upload a part
    with expected_denial(reader, "s3:PutObject"):
        done = run_cli(["put", str(part), "--dataset", dataset], user_env(stack, "reader"))
    # THEN S3's answer comes back as one line and the AWS exit code, not a traceback
    assert done.returncode == 5, done.stderr
    assert done.stderr.startswith("s3rollup: AWS error AccessDenied") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
