"""Shared fixtures: one embedded stack (moto server on 127.0.0.1, provisioned from
template.yaml) for the whole session; every test works in its own dataset."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ROOT / "events"


@pytest.fixture(scope="session")
def stack() -> Iterator[Any]:
    """The embedded stack with its dispatcher running (periodic reconcile off: tests call it)."""
    from s3rollup.local import EmbeddedStack

    with EmbeddedStack(port=0, stack_name="s3rollup-test", reconcile_every=0) as s:
        yield s


@pytest.fixture()
def dataset() -> str:
    """A fresh dataset name, so tests never see each other's parts."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
def lambda_app(stack: Any) -> Any:
    """The handler module as a second Lambda container would load it (its own globals, so
    calls from a test never share a batch processor with the dispatcher's container)."""
    return stack.dispatcher.container()


@pytest.fixture()
def outputs(stack: Any) -> dict[str, str]:
    """The stack's CloudFormation outputs."""
    return dict(stack.info.outputs)


def load_event(name: str) -> dict[str, Any]:
    """An event file from events/."""
    return json.loads((EVENTS / name).read_text())


def wait_for(predicate: Any, timeout: float = 120.0, interval: float = 0.25) -> Any:
    """Poll predicate until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"condition not met within {timeout}s")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run on any AWS call the embedded endpoint refused that no test expected:
    a call the code makes that the template's policies (or S3, KMS) would refuse on AWS."""
    from s3rollup import local_iam

    denied = local_iam.unexpected_denials()
    if denied and exitstatus == 0:
        exitstatus = pytest.ExitCode.TESTS_FAILED
    session.exitstatus = exitstatus
    session.config.stash[_EXIT_STATUS] = int(exitstatus)
    session.config.stash[_DENIED] = denied


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """The (principal, action) pairs the suite's AWS calls used, and any refused one."""
    from s3rollup import local_iam

    pairs = local_iam.pairs()
    if not pairs:
        return
    terminalreporter.section("AWS calls by principal (IAM enforced at the embedded endpoint)")
    for line in local_iam.pairs_table(pairs):
        terminalreporter.write_line(line)
    for r in config.stash.get(_DENIED, []):
        terminalreporter.write_line(f"REFUSED {r.principal} {r.action} {r.resource}: {r.reason}", red=True)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the run as s3rollup's commands end (logs.exit_process): after the summary, with
    pytest's own exit status, without the interpreter teardown in which Arrow's thread
    pools can abort a process that has finished its work (apache/arrow#34314)."""
    from s3rollup.logs import exit_process

    if _EXIT_STATUS in config.stash:
        exit_process(config.stash[_EXIT_STATUS])


_EXIT_STATUS = pytest.StashKey[int]()
_DENIED = pytest.StashKey[list[Any]]()
