"""The README's 5-minute tour, run as it stands against the session's embedded stack."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from s3rollup.demo import generate_part
from tests.conftest import ROOT
from tests.helpers import put_part, readme_shell_block, result_frame, wait_manifest

pytestmark = pytest.mark.integration


def test_the_readme_tour_runs_as_written(stack: Any, dataset: str, tmp_path: Path) -> None:
    assert stack.info.region == "us-east-1"  # the region the tour exports
    # The user's directory: the checkout's venvs and the ready file `s3rollup up` wrote.
    for venv in (".venv", ".venv-aws"):
        (tmp_path / venv).symlink_to(ROOT / venv)
    (tmp_path / "ready.json").write_text(json.dumps(stack.info.as_json()) + "\n")
    # A fresh dataset name in the shared session stack; the stack's name, as `up` would have it.
    script = re.sub(r"\bsales\b", dataset, readme_shell_block("tour"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3ROLLUP_", "VIRTUAL_ENV"))}
    env["S3ROLLUP_STACK"] = stack.info.stack_name
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"upload: ./part-1.csv to s3://{stack.info.outputs['DataBucketName']}/incoming/{dataset}/" in (
        done.stdout
    )
    assert f'"key": "incoming/{dataset}/part-2.csv"' in done.stdout
    (message,) = json.loads((tmp_path / "sqs-event.json").read_text())["Records"]
    assert (
        json.loads(message["body"])["Records"][0]["s3"]["object"]["key"] == f"incoming/{dataset}/part-3.csv"
    )
    assert message["body"] in done.stdout.splitlines()  # the S3 notification, printed first
    assert "lag: up to date" in done.stdout
    query = [line.split() for line in done.stdout.splitlines()]
    assert ["category", "value1_mean", "value1_std"] in query
    assert {row[0] for row in query if len(row) == 3} >= {"7", "42"}
    assert "<svg" in (tmp_path / "report.html").read_text()
    assert f"audit chain of '{dataset}' is intact" in done.stdout


def readme_block_after(marker: str, lang: str) -> str:
    """The first ```lang block after marker in the README."""
    text = (ROOT / "README.md").read_text().split(marker, 1)[1]
    return text.split(f"```{lang}\n", 1)[1].split("```", 1)[0]


def test_the_readme_pandas_snippet_reads_the_published_result(stack: Any) -> None:
    # GIVEN a published result
    dataset = "readme-pandas"
    keys = {put_part(stack, dataset, f"part-{i}.csv", generate_part(i, 500, seed=3)) for i in range(2)}
    wait_manifest(stack, dataset, keys)
    # WHEN the README's pandas snippet runs in a user's Python with the endpoint only
    snippet = readme_block_after("**pandas**", "python").replace(
        "<DataBucketName>", stack.info.outputs["DataBucketName"]
    )
    snippet = re.sub(r"\bsales\b", dataset, snippet) + "\nprint(frame.to_json(orient='split'))\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3ROLLUP_"))}
    env |= {
        "AWS_ENDPOINT_URL": stack.info.endpoint_url,
        "AWS_ACCESS_KEY_ID": "s3rollup-local",
        "AWS_SECRET_ACCESS_KEY": "s3rollup-local",
        "AWS_DEFAULT_REGION": stack.info.region,
    }
    done = subprocess.run(
        [sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    # THEN it gets exactly the published aggregate
    assert done.returncode == 0, done.stderr[-2000:]
    got = pd.read_json(io.StringIO(done.stdout), orient="split")
    pd.testing.assert_frame_equal(got, result_frame(stack, dataset), check_dtype=False)
