"""The worker image (worker/Dockerfile) built and run as Fargate runs it: read-only root
filesystem, a fresh volume at /tmp (root-owned until the image's /tmp is copied in), uid 1000,
the task definition's environment, on a bridge network reaching the stack by address.

worker/build_local_base.sh prepares the engine (dockerd with its default bridge) and a
locally made Debian base, since no registry is reachable here. Where no engine can start the
test says why and skips; with S3ROLLUP_REQUIRE_DOCKER=1 (CI) it fails instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from s3rollup.config import Settings
from s3rollup.contract import parse_part_key
from s3rollup.demo import generate_part
from s3rollup.ingest import Ingest
from s3rollup.launch import LocalLauncher
from s3rollup.local import ROOT, component_credentials
from tests.helpers import (
    assert_equals_reference,
    audit_records,
    put_part,
    silent,
    wait_manifest,
)

pytestmark = [pytest.mark.integration, pytest.mark.docker, pytest.mark.slow]

IMAGE = "s3rollup-worker:test"
# What the debootstrapped base lacks: the worker's Python (3.13 on trixie) and venv.
SYSTEM_PACKAGES = "python3 python3-venv"


@pytest.fixture(scope="module")
def worker_image(docker_base: str) -> str:
    """The worker image built from worker/Dockerfile on the locally made base."""
    started = time.monotonic()
    build = subprocess.run(
        [
            "docker",
            "build",
            "--quiet",
            "--network",
            "host",
            "-f",
            str(ROOT / "worker" / "Dockerfile"),
            "--build-arg",
            f"BASE_IMAGE={docker_base}",
            "--build-arg",
            f"SYSTEM_PACKAGES={SYSTEM_PACKAGES}",
            "-t",
            IMAGE,
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )
    assert build.returncode == 0, f"docker build failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    print(f"worker image built in {time.monotonic() - started:.1f}s")
    return IMAGE


@pytest.fixture()
def scratch_volume() -> Iterator[str]:
    """A new named volume for /tmp: empty and root-owned 0755, as Fargate's task volume is,
    until Docker copies the image's /tmp into it on first use."""
    name = f"s3rollup-scratch-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "volume", "create", name], capture_output=True, check=True)
    try:
        yield name
    finally:
        subprocess.run(["docker", "volume", "rm", "-f", name], capture_output=True, check=False)


def test_the_image_runs_as_uid_1000_and_holds_no_build_only_file(
    worker_image: str, scratch_volume: str
) -> None:
    inspect = subprocess.run(
        ["docker", "image", "inspect", worker_image], capture_output=True, text=True, check=True
    )
    config = json.loads(inspect.stdout)[0]["Config"]
    assert config["User"] == "1000:1000"
    assert config["Entrypoint"] == ["python", "-m", "s3rollup.job"]
    probe = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "none",
            "--read-only",
            "--mount",
            f"type=volume,source={scratch_volume},target=/tmp",
            "--entrypoint",
            "python",
            worker_image,
            "-c",
            "import os, shutil, sys, tempfile, importlib.util as u, distributed, pandas, s3rollup.job as j; "
            "from s3rollup import native; "
            "ms = (j, pandas, distributed); "
            "cached = all(os.path.exists(u.cache_from_source(m.__file__)) for m in ms); "
            "tempfile.NamedTemporaryFile(dir='/tmp').close(); "
            "unused = [n for n in ('pip', 'pandas.tests', 'numpy._core.tests', 'pyarrow.tests', "
            "'pyarrow._flight', 'pyarrow._s3fs') if u.find_spec(n.split('.')[0]) and u.find_spec(n)]; "
            "print(os.getuid(), os.path.exists('/build'), cached, native.kernels(), shutil.which('gcc'), "
            "shutil.which('pip'), ','.join(unused) or '-', ','.join(os.listdir('/var/cache/apt')) or '-', "
            "oct(os.stat('/tmp').st_mode & 0o7777), sys.version_info[:2])",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    uid, build_dir, cached, kernels, gcc, pip, unused, apt_cache, tmp_mode, _version = probe.stdout.split(
        " ", 9
    )
    # The proxy CA bundle, the lock file and the compiler stay in the build stages; with a
    # read-only root, a job starts from compiled bytecode only if the image carries it; the
    # native kernels were compiled for the image; the new volume at /tmp took the image's mode.
    assert (uid, build_dir, cached, kernels, gcc) == ("1000", "False", "True", "native", "None")
    assert tmp_mode == "0o1777"
    # What no process of the image loads is not in it (worker/slim_venv.py): pip, the test
    # suites, pyarrow's Flight and S3 filesystem; nor apt's package caches.
    assert (pip, unused) == ("None", "-")
    assert not {"pkgcache.bin", "srcpkgcache.bin"} & set(apt_cache.split(","))


class _Recorded:
    """A launcher that records the launch ingest asks for; the test runs it as a container."""

    def __init__(self) -> None:
        self.launches: list[tuple[str, str]] = []

    def launch(self, dataset: str, job_id: str) -> str:
        """Record the job; return a placeholder task id."""
        self.launches.append((dataset, job_id))
        return f"container:{job_id}"


def test_one_job_runs_in_the_worker_image_as_fargate_runs_it(
    bridge_stack: Any, dataset: str, worker_image: str, scratch_volume: str
) -> None:
    stack = bridge_stack  # on the bridge gateway: the container reaches it as it would AWS
    frames = [generate_part(i, 700, seed=41) for i in range(2)]
    with silent(stack):  # no event: the test plays the function
        keys = {put_part(stack, dataset, f"p{i}.csv", f) for i, f in enumerate(frames)}
    settings = Settings.from_env(stack.info.function_env)
    launcher = _Recorded()
    ingest = Ingest(settings, stack.aws.s3, stack.aws.dynamodb, launcher)
    outcomes = [ingest.sync(parse_part_key(k), actor="test:image") for k in sorted(keys)]
    assert [o.decision for o in outcomes] == ["ACCEPTED", "ACCEPTED"]
    ((launched_dataset, job_id),) = launcher.launches  # ingest took the lease and launched once
    assert launched_dataset == dataset

    task_env = LocalLauncher(settings, stack.aws.client("ecs"), agent=stack.aws).task_environment(
        dataset, job_id
    )
    env = {
        **task_env,
        "AWS_ENDPOINT_URL": stack.info.endpoint_url,
        "AWS_REGION": stack.info.region,
        "AWS_DEFAULT_REGION": stack.info.region,
        **component_credentials(stack.aws, stack.info.stack_name, "worker"),  # the task role's
    }
    env_args = [a for k, v in sorted(env.items()) for a in ("--env", f"{k}={v}")]
    name = f"s3rollup-job-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    run = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--name",
            name,
            "--read-only",
            "--mount",
            f"type=volume,source={scratch_volume},target=/tmp",
            "--user",
            "1000:1000",
            *env_args,
            worker_image,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    print(f"job in the container finished in {time.monotonic() - started:.1f}s")
    assert run.returncode == 0, f"worker container failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"

    manifest = wait_manifest(stack, dataset, keys, timeout=5)
    assert manifest["rows"] == 1400
    assert_equals_reference(stack, dataset, frames)
    finished = [r for r in audit_records(stack, dataset) if r["event"] == "JOB_FINISHED"]
    assert [r.get("job_id") for r in finished] == [job_id]
