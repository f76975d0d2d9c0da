"""Settings, read once at the edge (handler cold start, worker start, CLI) and passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

from .errors import ConfigError

PREFIX = "S3ROLLUP_"


def available_cpus() -> int:
    """CPUs this process may run on (the task's share, not the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Settings:
    """Everything the ingest function and the worker need to know about their stack."""

    bucket: str
    kms_key_arn: str
    audit_table: str
    state_table: str
    launcher: str = "ecs"  # ecs: ecs.run_task; local: a worker process on this machine
    ecs_cluster: str = ""
    task_definition: str = ""
    worker_container: str = "worker"
    subnets: tuple[str, ...] = ()
    security_groups: tuple[str, ...] = ()
    min_group_size: int = 1
    lease_seconds: int = 900
    # A round whose partials are not all computed by then fails (and is retried by the next
    # reconcile or event): Dask waits forever for workers, and the job renews its lease.
    round_timeout_seconds: int = 3600
    max_part_bytes: int = 5 << 30
    # A reconcile pass reads at most this many pages (S3 LIST and registry Query, 1,000 keys
    # each) and leaves alone, for this many seconds, objects so new that their own event may
    # still be on its way (0: decides them at once).
    reconcile_pages: int = 20
    reconcile_grace_seconds: int = 0
    dask_scheduler: str = ""  # address of an existing scheduler; empty: a LocalCluster
    anchor_bucket: str = ""  # Object Lock bucket the worker exports audit chain heads to
    # A dask-cloudprovider FargateCluster is used when a round's new parts add up to more
    # than this many bytes (0: never; the task's own LocalCluster does the work).
    fargate_threshold_bytes: int = 0
    fargate_image: str = ""  # worker image for the Dask scheduler and workers
    fargate_execution_role_arn: str = ""
    fargate_task_role_arn: str = ""
    fargate_workers: int = 4
    fargate_worker_cpu: int = 1024  # CPU units per Dask worker task
    fargate_worker_mem: int = 4096  # MiB per Dask worker task
    fargate_scheduler_timeout: str = "15 minutes"  # idle scheduler shuts itself down
    fargate_log_group: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from S3ROLLUP_* variables; a missing required one is a ConfigError."""
        env = os.environ if env is None else env

        def get(name: str, default: str | None = None) -> str:
            value = env.get(PREFIX + name, default)
            if value is None or value == "":
                if default is not None:
                    return default
                raise ConfigError(f"{PREFIX}{name} is not set")
            return value

        def integer(name: str, default: int) -> int:
            raw = get(name, str(default))
            try:
                return int(raw)
            except ValueError:
                raise ConfigError(f"{PREFIX}{name} must be an integer") from None

        def csv(name: str) -> tuple[str, ...]:
            return tuple(s.strip() for s in get(name, "").split(",") if s.strip())

        settings = cls(
            bucket=get("BUCKET"),
            kms_key_arn=get("KMS_KEY_ARN"),
            audit_table=get("AUDIT_TABLE"),
            state_table=get("STATE_TABLE"),
            launcher=get("LAUNCHER", "ecs"),
            ecs_cluster=get("ECS_CLUSTER", ""),
            task_definition=get("TASK_DEFINITION", ""),
            worker_container=get("WORKER_CONTAINER", "worker"),
            subnets=csv("SUBNETS"),
            security_groups=csv("SECURITY_GROUPS"),
            min_group_size=integer("MIN_GROUP_SIZE", 1),
            lease_seconds=integer("LEASE_SECONDS", 900),
            round_timeout_seconds=integer("ROUND_TIMEOUT_SECONDS", 3600),
            max_part_bytes=integer("MAX_PART_BYTES", 5 << 30),
            reconcile_pages=integer("RECONCILE_PAGES", 20),
            reconcile_grace_seconds=integer("RECONCILE_GRACE_SECONDS", 0),
            dask_scheduler=get("DASK_SCHEDULER", ""),
            anchor_bucket=get("ANCHOR_BUCKET", ""),
            fargate_threshold_bytes=integer("FARGATE_THRESHOLD_BYTES", 0),
            fargate_image=get("FARGATE_IMAGE", ""),
            fargate_execution_role_arn=get("FARGATE_EXECUTION_ROLE_ARN", ""),
            fargate_task_role_arn=get("FARGATE_TASK_ROLE_ARN", ""),
            fargate_workers=integer("FARGATE_WORKERS", 4),
            fargate_worker_cpu=integer("FARGATE_WORKER_CPU", 1024),
            fargate_worker_mem=integer("FARGATE_WORKER_MEM", 4096),
            fargate_scheduler_timeout=get("FARGATE_SCHEDULER_TIMEOUT", "15 minutes"),
            fargate_log_group=get("FARGATE_LOG_GROUP", ""),
        )
        if settings.launcher not in ("ecs", "local"):
            raise ConfigError(f"{PREFIX}LAUNCHER must be 'ecs' or 'local'")
        if settings.fargate_threshold_bytes and not (
            settings.fargate_image and settings.ecs_cluster and settings.subnets and settings.security_groups
        ):
            raise ConfigError(
                f"{PREFIX}FARGATE_THRESHOLD_BYTES needs {PREFIX}FARGATE_IMAGE, {PREFIX}ECS_CLUSTER, "
                f"{PREFIX}SUBNETS and {PREFIX}SECURITY_GROUPS"
            )
        if settings.reconcile_pages < 2:
            raise ConfigError(f"{PREFIX}RECONCILE_PAGES must be at least 2 (a listing and a registry page)")
        if settings.reconcile_grace_seconds < 0:
            raise ConfigError(f"{PREFIX}RECONCILE_GRACE_SECONDS must not be negative")
        if settings.min_group_size < 1:
            raise ConfigError(f"{PREFIX}MIN_GROUP_SIZE must be at least 1")
        return settings

    def with_(self, **changes: object) -> Settings:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]
