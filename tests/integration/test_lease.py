"""The job's lease: reconciling never takes it under another id; a long job keeps it; a job
that lost it publishes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from s3rollup.config import Settings
from s3rollup.demo import generate_part
from s3rollup.errors import S3RollupError
from s3rollup.job import Clusters, Job
from s3rollup.state import LeaseKeeper, State
from tests.conftest import wait_for
from tests.helpers import audit_records, manifest, put_part, register_quietly, silent, task_aws

pytestmark = pytest.mark.integration


def test_a_job_past_its_lease_never_takes_it_under_another_id(stack: Any, dataset: str) -> None:
    settings = Settings.from_env(stack.dispatcher.env)
    with silent(stack):  # GIVEN a part registered by a reconcile that started no job
        key = put_part(stack, dataset, "late.csv", generate_part(0, 20, seed=3))
    register_quietly(stack, dataset)
    job = Job(settings, task_aws(stack), dataset, "job-long", actor="test")
    # WHEN the job's lease has already expired (a job longer than the lease)
    assert job.state.acquire_lease(dataset, job.job_id, -1)
    todo = job._pending()
    # THEN the part is waiting, and the lease was not taken by a phantom job
    assert [p.key for p in todo] == [key]
    lease = job.state.lease(dataset)
    assert lease is not None and lease["job_id"] == "job-long"
    assert [r["event"] for r in audit_records(stack, dataset)] == ["PART_ACCEPTED"]


def test_the_lease_keeper_renews_a_long_job_s_lease(stack: Any, dataset: str) -> None:
    state = State(stack.aws.dynamodb, stack.info.outputs["StateTableName"])
    assert state.acquire_lease(dataset, "job-a", 3)
    first = state.lease(dataset)["expires"]
    with LeaseKeeper(state, dataset, "job-a", 3) as keeper:
        wait_for(lambda: state.lease(dataset)["expires"] > first, timeout=10)
        keeper.check()
    assert not keeper.lost.is_set()


def test_a_job_whose_lease_was_taken_fails_and_publishes_nothing(stack: Any, dataset: str) -> None:
    settings = Settings.from_env(stack.dispatcher.env)
    with silent(stack):
        put_part(stack, dataset, "p.csv", generate_part(0, 30, seed=5))
    register_quietly(stack, dataset)
    job = Job(settings, task_aws(stack), dataset, "job-a", actor="test")
    assert job.state.acquire_lease(dataset, "job-a", 600)
    todo = job._pending()

    def steal() -> None:
        stack.aws.dynamodb.delete_item(
            TableName=settings.state_table, Key={"pk": {"S": f"LEASE#{dataset}"}, "sk": {"S": "LEASE"}}
        )
        assert job.state.acquire_lease(dataset, "job-b", 600)

    with Clusters(settings) as clusters, clusters.for_round(0) as tasks:

        class StolenWhileComputing:
            """Computes the partials, then another job takes the lease (as after a long stall)."""

            def run(self, *args: Any, **kwargs: Any) -> Any:
                results = tasks.run(*args, **kwargs)
                steal()
                return results

        with (
            LeaseKeeper(job.state, dataset, "job-a", 600) as lease,
            pytest.raises(S3RollupError) as err,
        ):
            job.round(StolenWhileComputing(), todo, lease)  # type: ignore[arg-type]
    assert err.value.code == "LEASE_LOST"
    assert manifest(stack, dataset) is None
    assert job.state.lease(dataset)["job_id"] == "job-b"
    assert "PART_AGGREGATED" not in [r["event"] for r in audit_records(stack, dataset)]
