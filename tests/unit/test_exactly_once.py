"""The exactly-once check over a dataset's audit records."""

from __future__ import annotations

from typing import Any

from s3rollup.audit import exactly_once_problems


def _r(seq: int, event: str, **fields: Any) -> dict[str, Any]:
    return {"seq": seq, "event": event, **fields}


def test_a_clean_chain_has_no_problem() -> None:
    records = [
        _r(1, "PART_ACCEPTED", key="a", version_id="1"),
        _r(2, "JOB_STARTED", job_id="j1"),
        _r(3, "PART_AGGREGATED", key="a", version_id="1"),
        _r(4, "JOB_FINISHED", job_id="j1"),
        _r(5, "PART_ACCEPTED", key="a", version_id="2"),
        _r(6, "JOB_STARTED", job_id="j2"),
        _r(7, "JOB_FAILED", job_id="j2"),
    ]
    assert exactly_once_problems(records) == []


def test_a_version_counted_twice_and_overlapping_jobs_are_named() -> None:
    records = [
        _r(1, "PART_ACCEPTED", key="a", version_id="1"),
        _r(2, "JOB_STARTED", job_id="j1"),
        _r(3, "JOB_STARTED", job_id="j2"),
        _r(4, "PART_AGGREGATED", key="a", version_id="1"),
        _r(5, "PART_AGGREGATED", key="a", version_id="1"),
    ]
    assert exactly_once_problems(records) == [
        "record 5: a second PART_AGGREGATED for one part version",
        "record 3: job j2 started while j1 ran",
    ]


def test_a_crashed_job_ends_where_the_next_one_starts() -> None:
    records = [
        _r(1, "JOB_STARTED", job_id="dead"),
        _r(2, "JOB_STARTED", job_id="j2"),
        _r(3, "JOB_FINISHED", job_id="j2"),
    ]
    assert exactly_once_problems(records, crashed={"dead"}) == []
    assert exactly_once_problems(records) == ["record 2: job j2 started while dead ran"]
