"""Pure pieces of the user-side commands: selection, status summary, upload plan, report, progress."""

from __future__ import annotations

import io
import math
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from s3rollup.contract import ContractError
from s3rollup.ops import plan_uploads, s3_notification, select, status_lines, summarize
from s3rollup.progress import Progress, Waiting, bar_line
from s3rollup.report import histogram, render_report
from s3rollup.state import AGGREGATED, PENDING, REJECTED, Part

FRAME = pd.DataFrame(
    {
        "category": [1, 2, 3],
        "rows": [4, 1, 9],
        "value1_mean": [0.5, 1.5, math.nan],
        "value1_std": [1.0, math.nan, 2.0],
    }
)


def test_select_keeps_the_group_key_and_the_asked_columns_and_groups() -> None:
    got = select(FRAME, ["category"], ["3", "1"], ["value1_mean"])
    assert list(got.columns) == ["category", "value1_mean"]
    assert got["category"].tolist() == [1, 3]


def test_select_names_unknown_columns_and_groups() -> None:
    with pytest.raises(ContractError) as col:
        select(FRAME, ["category"], [], ["nope"])
    assert col.value.code == "UNKNOWN_COLUMN" and "value1_mean" in str(col.value)
    with pytest.raises(ContractError) as grp:
        select(FRAME, ["category"], ["7"], [])
    assert grp.value.code == "UNKNOWN_GROUP" and "7" in str(grp.value)


def _part(key: str, status: str, version: str = "v1", reason: str = "") -> Part:
    return Part("ds", key, version, "e", 10, status, reason)


def _rec(event: str, time: str, **fields: object) -> dict[str, object]:
    return {"event": event, "time": time, **fields}


def test_summary_of_an_up_to_date_dataset_measures_the_lag_of_its_newest_part() -> None:
    parts = [_part("a", AGGREGATED), _part("b", AGGREGATED), _part("c", REJECTED, reason="BAD_VALUE")]
    records = [
        _rec("PART_ACCEPTED", "2026-01-01T00:00:00.000000Z", key="a", version_id="v1"),
        _rec("PART_ACCEPTED", "2026-01-01T00:00:10.000000Z", key="b", version_id="v1"),
        _rec("PART_REJECTED", "2026-01-01T00:00:11.000000Z", key="c", version_id="v1", detail={"line": 3}),
        _rec("JOB_FINISHED", "2026-01-01T00:00:20.000000Z", job_id="j1"),
    ]
    manifest = {
        "generated_at": "2026-01-01T00:00:14.500+00:00",
        "job_id": "j1",
        "rows": 5,
        "groups": 2,
        "parts": [{"key": "a", "version_id": "v1"}, {"key": "b", "version_id": "v1"}],
    }
    listed = [("a", "v1"), ("b", "v1"), ("c", "v1")]
    s = summarize(parts, records, manifest, datetime(2026, 1, 1, 1, tzinfo=UTC), listed)
    assert s["parts"] == {"AGGREGATED": 2, "REJECTED": 1}
    assert s["lag"] == {"up_to_date": True, "waiting_parts": 0, "undecided_parts": 0, "seconds": 4.5}
    assert s["last_job"] == {"job_id": "j1", "event": "JOB_FINISHED", "time": "2026-01-01T00:00:20.000000Z"}
    assert s["quarantined"] == [{"key": "c", "version_id": "v1", "reason": "BAD_VALUE", "line": 3}]
    assert "quarantined c: BAD_VALUE line 3" in status_lines("ds", s)
    # An object in the bucket without a decision (its event not handled yet): not up to date.
    later = summarize(parts, records, manifest, datetime(2026, 1, 1, 1, tzinfo=UTC), [*listed, ("d", "v9")])
    assert later["lag"]["up_to_date"] is False and later["lag"]["undecided_parts"] == 1


def test_summary_of_a_dataset_behind_its_parts_counts_the_waiting_time() -> None:
    parts = [_part("a", AGGREGATED), _part("b", PENDING, version="v2")]
    records = [
        _rec("PART_ACCEPTED", "2026-01-01T00:00:00.000000Z", key="a", version_id="v1"),
        _rec("PART_ACCEPTED", "2026-01-01T00:00:30.000000Z", key="b", version_id="v2"),
    ]
    manifest = {
        "generated_at": "2026-01-01T00:00:05+00:00",
        "rows": 1,
        "groups": 1,
        "parts": [{"key": "a", "version_id": "v1"}, {"key": "b", "version_id": "v1"}],
    }
    s = summarize(parts, records, manifest, datetime(2026, 1, 1, 0, 1, tzinfo=UTC))
    assert s["lag"] == {"up_to_date": False, "waiting_parts": 1, "undecided_parts": 0, "seconds": 30.0}
    assert s["last_job"] is None and s["result"]["parts"] == 2


def test_upload_plan_refuses_missing_files_and_clashing_names_before_uploading(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "p.csv").write_text("x")
    (tmp_path / "p.csv").write_text("y")
    assert [u.key for u in plan_uploads([str(tmp_path / "p.csv")], "ds")] == ["incoming/ds/p.csv"]
    with pytest.raises(FileNotFoundError):
        plan_uploads([str(tmp_path / "p.csv"), str(tmp_path / "gone.csv")], "ds")
    with pytest.raises(ContractError) as clash:
        plan_uploads([str(tmp_path / "p.csv"), str(tmp_path / "a" / "p.csv")], "ds")
    assert clash.value.code == "DUPLICATE_NAME"
    with pytest.raises(ContractError):
        plan_uploads([str(tmp_path / "p.csv")], "Bad/Name")


def test_rebuild_notification_url_encodes_the_key_as_s3_does() -> None:
    from s3rollup.ingest import parse_notification

    [event] = parse_notification(s3_notification("b", "incoming/ds/a part+1.csv"))
    assert event.key == "incoming/ds/a part+1.csv" and event.bucket == "b"


def test_report_escapes_names_and_draws_every_group() -> None:
    manifest = {"contract": {"group_by": ["category"], "values": ["value1"]}, "parts": [], "rows": 14}
    page = render_report("d<s>", manifest, FRAME)
    assert "d&lt;s&gt;" in page and "<s>" not in page
    chart = page.split('id="chart-mean-value1"', 1)[1].split("</svg>", 1)[0]
    assert chart.count("<circle") == 2  # the NaN mean has no point
    assert page.split("<tbody>", 1)[1].count("<tr>") == 3 and '<td class="nan">NaN</td>' in page


def test_histogram_counts_every_value_once() -> None:
    bins = histogram([1, 2, 2, 3, 10], bins=3)
    assert sum(c for _, _, c in bins) == 5 and bins[0][2] == 4 and bins[-1][2] == 1
    assert histogram([5, 5]) == [(5, 5, 2)] and histogram([]) == []


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_and_stays_quiet_in_a_pipe() -> None:
    pipe, tty = io.StringIO(), _Tty()
    for stream in (pipe, tty):
        p = Progress("upload", 2048, stream=stream)
        p.add(1024)
        p.add(1024)
        p.close()
        w = Waiting("waiting", stream=stream)
        w.tick("1/2")
        w.close()
    assert pipe.getvalue() == ""
    assert "100.0%" in tty.getvalue() and "\r" in tty.getvalue() and "1/2" in tty.getvalue()
    assert bar_line("x", 1, 4, width=4, unit="parts") == "x [#...]  25.0% 1/4"


@pytest.mark.parametrize(
    "command",
    [[], ["demo"], ["up"], ["put"], ["status"], ["query"], ["rebuild"], ["report"], ["audit", "show"]],
)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from s3rollup.cli import main

    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert "usage: s3rollup" in capsys.readouterr().out


class _Registry:
    """The registry as mark_stale sees it: parts that are marked PENDING once marked."""

    def __init__(self, parts: list[Part]) -> None:
        self.items = {p.key: p for p in parts}

    def parts(self, dataset: str) -> list[Part]:
        return sorted(self.items.values(), key=lambda p: p.key)

    def stale_item(self, part: Part) -> dict[str, object]:
        return {"stale": part.key}

    def change_item(self, dataset: str, key: str) -> dict[str, object]:
        return {"changed": key}


class _Audit:
    def __init__(self, registry: _Registry, fail: bool = False) -> None:
        self.registry, self.fail = registry, fail
        self.appends: list[tuple[str, object]] = []
        self.items: list[int] = []

    def append(
        self, chain: str, event: str, actor: str, extra_items: list[dict[str, str]], **f: object
    ) -> None:
        from s3rollup.audit import Duplicate

        if self.fail:
            raise Duplicate(0, {})
        self.appends.append((event, f["parts"]))
        self.items.append(len(extra_items))


def test_mark_stale_audits_every_accepted_part_with_its_change_in_transactions_of_49() -> None:
    from s3rollup.ops import mark_stale

    parts = [_part(f"k{i:03d}", AGGREGATED) for i in range(200)] + [_part("bad", REJECTED)]
    registry = _Registry(parts)
    audit = _Audit(registry)
    marked = mark_stale(registry, audit, "ds", "cli:test")
    assert len(marked) == 200 and "bad" not in {p.key for p in marked}
    # 49 parts, two items each, and the audit's two: DynamoDB's 100 items per transaction.
    assert audit.appends == [("REBUILD_REQUESTED", 49)] * 4 + [("REBUILD_REQUESTED", 4)]
    assert audit.items == [2 * 49] * 4 + [2 * 4]


def test_mark_stale_gives_up_with_a_clear_error_when_parts_keep_changing() -> None:
    from s3rollup.errors import S3RollupError
    from s3rollup.ops import mark_stale

    registry = _Registry([_part("a", AGGREGATED)])
    with pytest.raises(S3RollupError) as err:
        mark_stale(registry, _Audit(registry, fail=True), "ds", "cli:test")
    assert err.value.code == "REBUILD_CONTENDED"


@pytest.mark.parametrize("with_logs", [False, True])
def test_a_command_ends_with_its_exit_code_and_all_of_its_output(with_logs: bool) -> None:
    """The fast exit that skips Arrow's teardown still delivers buffered output and logs."""
    import os
    import subprocess
    import sys

    script = (
        "import logging, sys\n"
        "from s3rollup.logs import configure, exit_process\n"
        + ("configure('INFO')\nlogging.getLogger('s3rollup.t').info('last log line')\n" if with_logs else "")
        + "sys.stdout.write('row\\n' * 100 + 'END')\n"
        "sys.stderr.write('err tail')\n"
        "exit_process(3)\n"
    )
    # Piped output is block-buffered unless PYTHONUNBUFFERED says otherwise.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 3
    written = done.stdout
    if with_logs:
        log_line, written = done.stdout.split("\n", 1)
        assert "last log line" in log_line
    assert written == "row\n" * 100 + "END" and done.stderr == "err tail"


def test_the_console_scripts_end_through_the_fast_exit() -> None:
    import tomllib

    scripts = tomllib.loads(Path("pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"s3rollup": "s3rollup.cli:run"}
    assert Path("s3rollup/cli.py").read_text().rstrip().endswith('if __name__ == "__main__":\n    run()')
    # `python -m s3rollup.job` runs the importable module's run() (tests/unit/test_job_entry.py)
    job_end = "from s3rollup.job import run as _run\n\n    _run()"
    assert Path("s3rollup/job.py").read_text().rstrip().endswith(job_end)
