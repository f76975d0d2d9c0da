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
    from s3rollup.local import load_handler

    return load_handler(stack.dispatcher.env)


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
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the run as s3rollup's commands end (logs.exit_process): after the summary, with
    pytest's own exit status, without the interpreter teardown in which Arrow's thread
    pools can abort a process that has finished its work (apache/arrow#34314)."""
    from s3rollup.logs import exit_process

    if _EXIT_STATUS in config.stash:
        exit_process(config.stash[_EXIT_STATUS])


_EXIT_STATUS = pytest.StashKey[int]()
