"""The README's 5-minute tour, run as it stands against the session's embedded stack."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def tour_script() -> str:
    """The shell block between the README's tour markers."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- tour -->", 1)[1].split("<!-- /tour -->", 1)[0]
    return block.strip().removeprefix("```sh").removesuffix("```").strip() + "\n"


def test_the_readme_tour_runs_as_written(stack: Any, dataset: str, tmp_path: Path) -> None:
    assert stack.info.region == "us-east-1"  # the region the tour exports
    # The user's directory: the checkout's venvs and the ready file `s3rollup up` wrote.
    for venv in (".venv", ".venv-aws"):
        (tmp_path / venv).symlink_to(ROOT / venv)
    (tmp_path / "ready.json").write_text(json.dumps(stack.info.as_json()) + "\n")
    # A fresh dataset name in the shared session stack; the stack's name, as `up` would have it.
    script = re.sub(r"\bsales\b", dataset, tour_script())
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
    assert "lag: up to date" in done.stdout
    query = [line.split() for line in done.stdout.splitlines()]
    assert ["category", "value1_mean", "value1_std"] in query
    assert {row[0] for row in query if len(row) == 3} >= {"7", "42"}
    assert "<svg" in (tmp_path / "report.html").read_text()
    assert f"audit chain of '{dataset}' is intact" in done.stdout
