"""Job launchers: the same RunTask request goes to ECS Fargate, or to a process on this machine.

The request carries the dataset and job id as container overrides and the job id as the
idempotency ``clientToken``, so a retried launch of the same job starts one task.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from typing import Any, Protocol

from botocore.exceptions import ClientError

from .aws import LOCAL_OPERATOR, Aws, assume_role, credentials_env
from .config import Settings
from .errors import LaunchError

log = logging.getLogger(__name__)

# RunTask failures worth another try (capacity, placement); anything else is surfaced at once.
_RETRYABLE_FAILURES = ("RESOURCE", "CAPACITY", "AGENT", "ATTRIBUTE")
_RETRYABLE_ERRORS = ("ThrottlingException", "ServerException", "LimitExceededException")


class Launcher(Protocol):
    """Starts the worker for one dataset and job."""

    def launch(self, dataset: str, job_id: str) -> str:
        """Start the job; return an identifier of the task (ARN or local id)."""
        ...


def run_task_request(settings: Settings, dataset: str, job_id: str) -> dict[str, Any]:
    """The ecs.run_task arguments for a job (Fargate, private subnets, no public IP)."""
    return {
        "cluster": settings.ecs_cluster,
        "taskDefinition": settings.task_definition,
        "launchType": "FARGATE",
        "count": 1,
        "clientToken": job_id[:64],
        "startedBy": "s3rollup-ingest",
        "networkConfiguration": {
            "awsvpcConfiguration": {
                "subnets": list(settings.subnets),
                "securityGroups": list(settings.security_groups),
                "assignPublicIp": "DISABLED",
            }
        },
        "overrides": {
            "containerOverrides": [
                {
                    "name": settings.worker_container,
                    "environment": [
                        {"name": "S3ROLLUP_DATASET", "value": dataset},
                        {"name": "S3ROLLUP_JOB_ID", "value": job_id},
                    ],
                }
            ]
        },
        "propagateTags": "TASK_DEFINITION",
    }


class EcsLauncher:
    """Launch on ECS Fargate, retrying capacity failures and throttling with backoff."""

    def __init__(self, settings: Settings, ecs: Any, attempts: int = 5, base_delay: float = 0.5):
        if not (settings.ecs_cluster and settings.task_definition and settings.subnets):
            raise LaunchError("ECS launcher needs a cluster, a task definition and subnets")
        self.settings, self._ecs = settings, ecs
        self.attempts, self.base_delay = attempts, base_delay

    def launch(self, dataset: str, job_id: str) -> str:
        """Run the worker task; return its ARN or raise LaunchError."""
        request = run_task_request(self.settings, dataset, job_id)
        last = "no attempt"
        for attempt in range(self.attempts):
            try:
                response = self._ecs.run_task(**request)
            except ClientError as exc:
                code = exc.response["Error"]["Code"]
                if code not in _RETRYABLE_ERRORS:
                    raise LaunchError(f"RunTask refused: {code}", "RUN_TASK_REFUSED") from exc
                last = code
            else:
                tasks = response.get("tasks") or []
                if tasks:
                    return str(tasks[0]["taskArn"])
                failures = response.get("failures") or []
                last = ",".join(str(f.get("reason", "?")) for f in failures) or "no task started"
                if not any(r in last.upper() for r in _RETRYABLE_FAILURES):
                    raise LaunchError(f"RunTask failed: {last}", "RUN_TASK_FAILED")
            time.sleep(self.base_delay * (2**attempt) * (0.5 + random.random() / 2))
        raise LaunchError(f"RunTask kept failing: {last}", "RUN_TASK_EXHAUSTED")


class LocalLauncher:
    """Run the worker task on this machine, as Fargate would run it: the embedded stack's ECS
    hands it each RunTask of the worker's task definition (local.TaskRunner), and tests start
    jobs with it directly.

    What ECS does is done here with the stack operator's credentials (``agent``): read the
    task definition back (the embedded endpoint has it, deployed from template.yaml, so the
    worker sees exactly the variables the Fargate task would), take the task role's
    credentials from STS, and start the container's command as a process with them.
    """

    def __init__(
        self,
        settings: Settings,
        ecs: Any,
        extra_env: dict[str, str] | None = None,
        agent: Aws | None = None,
        output: Any = None,
    ):
        self.settings, self._ecs = settings, ecs
        self.extra_env = dict(extra_env or {})
        self.output = output  # where the workers' output goes (a file); None: this process's
        self.agent = agent or Aws(credentials=LOCAL_OPERATOR)
        self.processes: list[subprocess.Popen[bytes]] = []

    def _task_definition(self) -> dict[str, Any]:
        ecs = self.agent.client("ecs")
        taskdef: dict[str, Any] = ecs.describe_task_definition(taskDefinition=self.settings.task_definition)
        return taskdef["taskDefinition"]

    def task_environment(
        self, dataset: str, job_id: str, taskdef: dict[str, Any] | None = None
    ) -> dict[str, str]:
        """The environment the worker container would get for this job."""
        request = run_task_request(self.settings, dataset, job_id)
        env: dict[str, str] = {}
        for container in (taskdef or self._task_definition())["containerDefinitions"]:
            if container["name"] == self.settings.worker_container:
                env.update({e["name"]: str(e["value"]) for e in container.get("environment", [])})
        for override in request["overrides"]["containerOverrides"]:
            env.update({e["name"]: e["value"] for e in override["environment"]})
        return env

    def task_credentials(self, job_id: str, taskdef: dict[str, Any] | None = None) -> dict[str, str]:
        """The task role's credentials, as ECS hands them to a task's SDKs."""
        role = (taskdef or self._task_definition())["taskRoleArn"]
        return credentials_env(assume_role(self.agent, role, f"ecs-{job_id}"))

    def launch(self, dataset: str, job_id: str) -> str:
        """Start `python -m s3rollup.job` in the background; return a local task id."""
        taskdef = self._task_definition()  # read once: the environment and the role
        env = {
            **os.environ,
            **self.task_environment(dataset, job_id, taskdef),
            **self.task_credentials(job_id, taskdef),
            **self.extra_env,
        }
        self.processes = [p for p in self.processes if p.poll() is None]
        proc = subprocess.Popen(  # the same entry point as the container's command
            [sys.executable, "-m", "s3rollup.job"], env=env, stdin=subprocess.DEVNULL, stdout=self.output
        )
        self.processes.append(proc)
        log.info("local worker started", extra={"dataset": dataset, "job_id": job_id, "pid": proc.pid})
        return f"local:{proc.pid}"

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the workers started so far (used when shutting down)."""
        for proc in list(self.processes):
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()


def make_launcher(settings: Settings, ecs: Any, extra_env: dict[str, str] | None = None) -> Launcher:
    """The launcher the settings ask for."""
    if settings.launcher == "local":
        return LocalLauncher(settings, ecs, extra_env)
    return EcsLauncher(settings, ecs)
