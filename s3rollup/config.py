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
    dask_scheduler: str = ""  # address of an existing scheduler; empty: the job's own threads
    anchor_bucket: str = ""  # Object Lock bucket the worker exports audit chain heads to
    # A round whose new parts add up to more than this many bytes runs on a Dask cluster of
    # Fargate tasks (dask-cloudprovider's FargateCluster, every resource passed in: the
    # stack's cluster, its scheduler and worker task definitions, roles and log group);
    # 0: never, the job task's own threads do every round.
    fargate_threshold_bytes: int = 0
    fargate_vpc: str = ""  # the VPC of SUBNETS (dask-cloudprovider would look up a default VPC)
    fargate_scheduler_task_definition: str = ""
    fargate_worker_task_definition: str = ""
    fargate_execution_role_arn: str = ""
    fargate_task_role_arn: str = ""  # the Dask workers' role
    fargate_workers: int = 4
    fargate_worker_cpu: int = 4096  # CPU units per Dask worker task: one thread per 1024
    fargate_worker_mem: int = 8192  # MiB per Dask worker task: its memory limit
    fargate_spot: bool = False  # workers on FARGATE_SPOT, the scheduler on FARGATE
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
            fargate_vpc=get("FARGATE_VPC", ""),
            fargate_scheduler_task_definition=get("FARGATE_SCHEDULER_TASK_DEFINITION", ""),
            fargate_worker_task_definition=get("FARGATE_WORKER_TASK_DEFINITION", ""),
            fargate_execution_role_arn=get("FARGATE_EXECUTION_ROLE_ARN", ""),
            fargate_task_role_arn=get("FARGATE_TASK_ROLE_ARN", ""),
            fargate_workers=integer("FARGATE_WORKERS", 4),
            fargate_worker_cpu=integer("FARGATE_WORKER_CPU", 4096),
            fargate_worker_mem=integer("FARGATE_WORKER_MEM", 8192),
            fargate_spot=get("FARGATE_SPOT", "false").lower() == "true",
            fargate_scheduler_timeout=get("FARGATE_SCHEDULER_TIMEOUT", "15 minutes"),
            fargate_log_group=get("FARGATE_LOG_GROUP", ""),
        )
        if settings.launcher not in ("ecs", "local"):
            raise ConfigError(f"{PREFIX}LAUNCHER must be 'ecs' or 'local'")
        if settings.fargate_threshold_bytes:
            needed = {
                "ECS_CLUSTER": settings.ecs_cluster,
                "SUBNETS": settings.subnets,
                "SECURITY_GROUPS": settings.security_groups,
                "FARGATE_VPC": settings.fargate_vpc,
                "FARGATE_SCHEDULER_TASK_DEFINITION": settings.fargate_scheduler_task_definition,
                "FARGATE_WORKER_TASK_DEFINITION": settings.fargate_worker_task_definition,
                "FARGATE_EXECUTION_ROLE_ARN": settings.fargate_execution_role_arn,
                "FARGATE_TASK_ROLE_ARN": settings.fargate_task_role_arn,
                "FARGATE_LOG_GROUP": settings.fargate_log_group,
            }
            missing = [PREFIX + name for name, value in needed.items() if not value]
            if missing:
                # dask-cloudprovider would create what is not passed in (a cluster, roles,
                # task definitions, a log group, a security group open to anywhere).
                raise ConfigError(f"{PREFIX}FARGATE_THRESHOLD_BYTES needs {', '.join(missing)}")
            if settings.fargate_workers < 1:
                raise ConfigError(f"{PREFIX}FARGATE_WORKERS must be at least 1")
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
