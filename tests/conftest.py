"""Shared fixtures: one embedded stack (moto server on 127.0.0.1, provisioned from
template.yaml) for the whole session; every test works in its own dataset."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ROOT / "events"


@pytest.fixture(scope="session")
def stack() -> Iterator[Any]:
    """The embedded stack with its dispatcher running (periodic reconcile off: tests call it,
    and it decides at once on the parts whose events a test dropped)."""
    from s3rollup.local import EmbeddedStack

    with EmbeddedStack(port=0, stack_name="s3rollup-test", reconcile_every=0, reconcile_grace=0) as s:
        yield s


def no_docker(reason: str) -> None:
    """Skip a Docker test, saying why, or fail it where an engine is required (CI)."""
    message = f"Docker test NOT RUN: {reason}"
    if os.environ.get("S3ROLLUP_REQUIRE_DOCKER") == "1":
        pytest.fail(message)
    warnings.warn(message, stacklevel=2)
    pytest.skip(message)


@pytest.fixture(scope="session")
def docker_base() -> str:
    """A Docker engine with its default bridge, and the locally made Debian base image (by
    worker/build_local_base.sh, as CI prepares them); skips loudly without an engine."""
    prepared = subprocess.run(
        [str(ROOT / "worker" / "build_local_base.sh")], capture_output=True, text=True, check=False
    )
    if prepared.returncode != 0:
        no_docker(f"no Docker engine or base image could be prepared:\n{prepared.stderr[-2000:]}")
    return prepared.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def bridge_gateway(docker_base: str) -> str:
    """The address of this machine on Docker's default bridge (what its containers reach)."""
    gateway = subprocess.run(
        ["docker", "network", "inspect", "bridge", "--format", "{{(index .IPAM.Config 0).Gateway}}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if not gateway:
        no_docker("the Docker engine has no default bridge (worker/build_local_base.sh starts one)")
    return gateway


@pytest.fixture(scope="session")
def bridge_stack(bridge_gateway: str) -> Iterator[Any]:
    """A second embedded stack, named as `s3rollup up` names it (the events/ files name its
    bucket), listening on the bridge gateway as `s3rollup up --host 172.31.250.1 --no-dispatch`
    does: containers reach it, no dispatcher runs the function, RunTask starts the worker."""
    from s3rollup.local import EmbeddedStack

    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    with EmbeddedStack(
        port=0,
        host=bridge_gateway,
        stack_name="s3rollup",
        dispatch=False,
        reconcile_every=0,
        run_tasks=True,
        reconcile_grace=0,
    ) as s:
        # This process's own clients keep talking to the session's stack.
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[k]
        os.environ.update(saved)
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


def retarget(event: dict[str, Any], bucket: str, dataset: str) -> dict[str, Any]:
    """An events/ file pointed at a stack's bucket and a fresh dataset."""
    text = json.dumps(event).replace("s3rollup-data-123456789012-us-east-1", bucket)
    return json.loads(
        text.replace("incoming/sales/", f"incoming/{dataset}/").replace(
            "incoming%2Fsales%2F", f"incoming%2F{dataset}%2F"
        )
    )


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
    denied = config.stash.get(_DENIED, [])
    for r in denied:
        terminalreporter.write_line(f"REFUSED {r.principal} {r.action} {r.resource}: {r.reason}", red=True)
    if local_iam.denial_count() > len(denied):
        terminalreporter.write_line(
            f"... and {local_iam.denial_count() - len(denied)} more refused", red=True
        )


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
