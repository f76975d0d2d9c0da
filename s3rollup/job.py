"""The worker's job: fold a dataset's new parts into its published statistics.

One job per dataset at a time (the lease in the state table). A job:
1. reads the registry's change markers: the parts changed since the published result;
2. computes a partial aggregate for each accepted part whose partial is missing or stale,
   one Dask task per part, stored as partials/<dataset>/<part-id>.parquet;
3. updates the manifest's tree with the changed parts (s3rollup.manifest) and publishes
   results/<dataset>/ (parquet/aggregate.parquet, aggregate.json, then manifest.json naming
   the exact object versions, so a reader that starts from the manifest never mixes two
   results), then clears the markers it published;
4. before giving the lease back, picks up parts that changed meanwhile.

Run as ``python -m s3rollup.job`` with S3ROLLUP_DATASET and S3ROLLUP_JOB_ID set (the
container overrides of the RunTask request) and the task definition's environment.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from . import memory

# What a round computes with (NumPy, pyarrow, the native kernels: s3rollup.stats and
# s3rollup.parse) is imported when a round needs it, or ahead of it on a thread of its own
# while the job waits on S3 and DynamoDB (prepare_round): a few tenths of a second of every
# job's process. distributed only for a round on a Dask cluster.
from .audit import AuditLog, Duplicate, export_head
from .aws import Aws, object_at
from .config import Settings, available_cpus
from .contract import (
    Contract,
    check_dataset,
    merged_partial_key,
    parse_part_key,
    partial_key,
    quarantine_key,
    result_key,
)
from .errors import S3RollupError, reason_code
from .ingest import Ingest
from .logs import configure, exit_process
from .state import LeaseKeeper, Part, State

if TYPE_CHECKING:
    import pyarrow as pa

    from .parse import Readable

log = logging.getLogger("s3rollup.job")
# Concurrent partial fetches, within the S3 client's connection pool (aws.py), and how many
# fetched partials, and how many bytes of them, may wait for the merge.
_FETCH_THREADS = 16
_FETCH_AHEAD = 2 * _FETCH_THREADS
_FETCH_BYTES = 64 << 20
# How many bytes of partials a round's tasks on the job's own threads keep in memory for
# its publish (KeptPartials).
_KEEP_BYTES = 256 << 20

_process_aws: Aws | None = None


def _aws() -> Aws:
    # One client cache per process: Dask tasks may run in other processes or machines. In
    # the job's own process (LocalTasks' threads), main() has put the job's cache here.
    global _process_aws
    if _process_aws is None:
        _process_aws = Aws()
    return _process_aws


_PARQUET = "application/vnd.apache.parquet"


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def json_rows(table: pa.Table) -> list[list[Any]]:
    """Rows as JSON-ready lists: exact float repr (17 significant digits), NaN as null."""
    from .parse import numpy_column

    columns = [numpy_column(c).tolist() for c in table.columns]
    return [
        [None if isinstance(v, float) and math.isnan(v) else v for v in row]
        for row in zip(*columns, strict=True)
    ]


@dataclass(frozen=True)
class PartialTask:
    """Everything a Dask task needs to compute one part's partial (picklable)."""

    bucket: str
    kms_key_arn: str
    dataset: str
    key: str
    version_id: str
    contract: Contract
    # The round's only part: parse it on every CPU of the worker it runs on, since no other
    # part's task competes for them (a lone new part is the incremental case).
    alone: bool = False
    # The task runs in the job's own process (LocalTasks): it also keeps the partial's table
    # for the round's publish (KeptPartials).
    keep: bool = False


class KeptPartials:
    """The partials a round's tasks computed in the job's own process, as tables, up to a
    budget of bytes: the round's publish merges them as they are instead of fetching each
    from S3 again, checking its SHA-256 and decoding it (on 20 parts of 100,000 groups,
    about a third of a second of a 2-CPU job). A partial is found by the part version it
    was computed from and the SHA-256 of the bytes the task stored and the registry
    records: the same identity the stored partial is checked against (_PartialMerger).
    Thread-safe; emptied when the round ends (Job.round). Two jobs' rounds in one process
    (as tests run them) only find fewer: a partial not found is fetched and checked."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._tables: dict[tuple[str, str], pa.Table] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def keep(self, version_id: str, partial_sha256: str, table: pa.Table) -> bool:
        """Keep table while the budget allows; whether it was kept."""
        from .stats import table_bytes

        size = table_bytes(table)
        with self._lock:
            if self._bytes + size > self.budget:
                return False
            old = self._tables.pop((version_id, partial_sha256), None)
            self._bytes += size - (0 if old is None else table_bytes(old))
            self._tables[(version_id, partial_sha256)] = table
            return True

    def take(self, version_id: str, partial_sha256: str) -> pa.Table | None:
        """The table kept for this partial, given up (None when none is)."""
        from .stats import table_bytes

        with self._lock:
            table = self._tables.pop((version_id, partial_sha256), None)
            if table is not None:
                self._bytes -= table_bytes(table)
            return table

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()
            self._bytes = 0


# This process's: its LocalTasks' threads fill it, its job's publish takes from it.
kept_partials = KeptPartials(_KEEP_BYTES)


def part_result(
    stream: Readable,
    size: int | None,
    name: str,
    contract: Contract,
    alone: bool = False,
    sha256: str | None = None,
) -> tuple[dict[str, Any], bytes | None, pa.Table | None]:
    """What a task makes of one part's bytes: the result it reports (the body's SHA-256,
    then rows in a group, rows left out for a missing group key, the partial's SHA-256 and
    the kernels, or the PartError that rejects the part; ``seconds`` spent reading,
    aggregating and encoding), the partial as Parquet and as the table it encodes (None
    when rejected). compute_partial runs it on the S3 object's stream; the bench on a
    file, so that it measures what the job does.

    ``sha256``: the body's SHA-256 (hex) when ``stream`` itself checks the bytes against
    it as they are read, and raises at the end if they differ (an S3 object's full-object
    checksum: verified_sha256). Otherwise the SHA-256 is taken here, chunk by chunk.
    """
    from . import native
    from .parse import Keyless, PartError, detect_format, read_body
    from .stats import part_partial, partial_to_parquet

    started = time.perf_counter()
    digest = hashlib.sha256() if sha256 is None else None
    body = read_body(stream, size, digest)
    read = time.perf_counter()
    result: dict[str, Any] = {"sha256": sha256 if digest is None else digest.hexdigest()}
    try:
        fmt = detect_format(bytes(body[:8]), name)
        keyless = Keyless()
        partial, rows = part_partial(body, contract, fmt, alone, keyless)
    except PartError as exc:
        result["error"] = {"code": exc.code, "message": exc.message, "line": exc.line}
        return result, None, None
    aggregated = time.perf_counter()
    data = partial_to_parquet(partial)
    result.update(
        rows=rows, rows_without_key=keyless.rows, partial_sha256=sha256_hex(data), kernels=native.kernels()
    )
    result["seconds"] = {
        "read": read - started,
        "aggregate": aggregated - read,
        "encode": time.perf_counter() - aggregated,
    }
    return result, data, partial


def verified_sha256(obj: dict[str, Any]) -> str | None:
    """The SHA-256 (hex) of a GetObject response's body when botocore checks the body
    against it while it is read: the object carries a full-object SHA-256 checksum (its
    producer uploaded it with ChecksumAlgorithm="SHA256" in one PUT; S3 checked it then)
    and the body is botocore's checking stream for it, which raises at the end of a body
    that differs. None otherwise (no checksum, another algorithm, a multipart upload's
    checksum of checksums, or no check): the caller takes the SHA-256 itself.
    """
    from botocore.httpchecksum import Sha256Checksum, StreamingChecksumBody

    value, body = obj.get("ChecksumSHA256"), obj.get("Body")
    if not isinstance(value, str) or "-" in value or not isinstance(body, StreamingChecksumBody):
        return None
    if not isinstance(body.checksum, Sha256Checksum):
        return None
    try:
        digest = base64.b64decode(value, validate=True)
    except ValueError:
        return None
    return digest.hex() if len(digest) == 32 else None


def compute_partial(task: PartialTask) -> dict[str, Any]:
    """Read one part version, aggregate it, store its partial; report rows and checksums.

    The GET asks for the object's checksum (ChecksumMode): botocore checks the body against
    it, whatever the client's response_checksum_validation. When that checksum is the whole
    body's SHA-256, it is the SHA-256 the audit records, and the body is hashed once, not
    twice (verified_sha256).
    """
    s3 = _aws().s3
    part = parse_part_key(task.key)
    obj = s3.get_object(**object_at(task.bucket, task.key, task.version_id), ChecksumMode="ENABLED")
    result, data, table = part_result(
        obj["Body"],
        obj.get("ContentLength"),
        part.name,
        task.contract,
        task.alone,
        sha256=verified_sha256(obj),
    )
    result = {"key": task.key, "version_id": task.version_id, **result}
    if data is not None:
        s3.put_object(
            Bucket=task.bucket,
            Key=partial_key(task.dataset, part.part_id),
            Body=data,
            ServerSideEncryption="aws:kms",
            SSEKMSKeyId=task.kms_key_arn,
            Metadata={"source-version-id": task.version_id, "rows": str(result["rows"])},
        )
        if task.keep and table is not None:
            kept_partials.keep(task.version_id, result["partial_sha256"], table)
    return result


_T = TypeVar("_T")
_R = TypeVar("_R")


def fetch_in_order(
    load: Callable[[_T], _R], items: Sequence[_T], size: Callable[[_R], int] | None = None
) -> Iterator[_R]:
    """load(item) for each item, in order, on up to _FETCH_THREADS threads: loads that are
    latency (S3 GETs) overlap. At most _FETCH_AHEAD results are loaded or loading ahead of
    the caller; given ``size``, one until the first result's size is known, then only as
    many as _FETCH_BYTES holds at that size (at least one): what waits grows neither with
    the number of items nor, past that, with their size."""
    if len(items) <= 1:
        yield from map(load, items)
        return
    window = _FETCH_AHEAD if size is None else 1
    rest = iter(items)
    with ThreadPoolExecutor(max_workers=min(_FETCH_THREADS, len(items))) as pool:
        ahead: deque[Future[_R]] = deque()
        while True:
            for item in itertools.islice(rest, max(0, window - len(ahead))):
                ahead.append(pool.submit(load, item))
            if not ahead:
                return
            result = ahead.popleft().result()
            if size is not None:
                window = max(1, min(_FETCH_AHEAD, _FETCH_BYTES // max(1, size(result))))
            yield result


# The ports of the security group (template.yaml): the scheduler's and each worker's.
SCHEDULER_PORT, WORKER_PORT = 8786, 8787
_NO_HTTP = ["--no-dashboard", "--dashboard-address", "127.0.0.1:0"]


def cluster_security() -> Any:
    """TLS for one cluster: a certificate and key made here, in memory, for this cluster only;
    the job and every member present it and trust nothing else (distributed's
    Security.temporary, with an EC P-256 key: the members get the key and the certificate
    sealed (seal_cluster_tls) in RunTask's container overrides, 8192 characters at most,
    where an RSA pair would take most of them). Valid for a week: longer than any round
    (round_timeout_seconds)."""
    from datetime import timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from distributed.security import Security

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask-internal")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("dask-internal")]), critical=False)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=7))
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    pem_cert = cert.public_bytes(serialization.Encoding.PEM).decode()
    pems = (("cert", pem_cert), ("key", pem_key))
    return Security(
        require_encryption=True,
        tls_ca_file=pem_cert,
        **{f"tls_{role}_{part}": pem for role in ("client", "scheduler", "worker") for part, pem in pems},
    )


def seal_cluster_tls(security: Any, kms: Any, key_arn: str) -> dict[str, str]:
    """The cluster's certificate and key encrypted under the stack's key for the members
    (member.seal_tls), under a cluster id made here: RunTask's parameters are recorded by
    CloudTrail and returned by DescribeTasks, so the key never travels in them in clear."""
    from secrets import token_hex

    from .member import seal_tls

    return seal_tls(kms, key_arn, token_hex(8), security.tls_scheduler_cert, security.tls_scheduler_key)


def member_environment(sealed: dict[str, str]) -> dict[str, str]:
    """The members' environment: TLS required, no HTTP routes (as dask configuration), and
    the cluster's sealed TLS (seal_cluster_tls), which each member opens itself."""
    return {
        "DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES": "[]",
        "DASK_DISTRIBUTED__WORKER__HTTP__ROUTES": "[]",
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        **sealed,
    }


def fargate_cluster_kwargs(settings: Settings, security: Any, sealed: dict[str, str]) -> dict[str, Any]:
    """Arguments of dask-cloudprovider's FargateCluster: every resource passed in (cluster,
    task definitions, roles, log group, subnets, security groups), so it creates none;
    private IPs only; TLS between all Dask members (``security``, cluster_security; the
    members' copy ``sealed``, seal_cluster_tls)."""
    return {
        "cluster_arn": settings.ecs_cluster,
        "scheduler_task_definition_arn": settings.fargate_scheduler_task_definition,
        "worker_task_definition_arn": settings.fargate_worker_task_definition,
        "execution_role_arn": settings.fargate_execution_role_arn,
        "task_role_arn": settings.fargate_task_role_arn,
        "cloudwatch_logs_group": settings.fargate_log_group,
        "vpc": settings.fargate_vpc,
        "subnets": list(settings.subnets),
        "security_groups": list(settings.security_groups),
        "fargate_use_private_ip": True,
        "fargate_spot": settings.fargate_spot,
        "n_workers": settings.fargate_workers,
        "worker_cpu": settings.fargate_worker_cpu,  # --nthreads: one per 1024
        "worker_mem": settings.fargate_worker_mem,  # --memory-limit
        "scheduler_port": SCHEDULER_PORT,
        "scheduler_timeout": settings.fargate_scheduler_timeout,
        # TLS only; workers on the one port the security group opens, and no nanny (its own
        # port): a worker task that dies is a worker gone, its tasks run elsewhere. No
        # dashboard, and the HTTP server distributed opens anyway serves nothing
        # (member_environment) on the task's loopback interface only.
        "scheduler_extra_args": ["--protocol", "tls", *_NO_HTTP],
        "worker_extra_args": [
            "--protocol",
            "tls",
            "--worker-port",
            str(WORKER_PORT),
            "--no-nanny",
            *_NO_HTTP,
        ],
        # Dask members read parts and write partials themselves (PartialTask names the
        # bucket and key), under the workers' task role.
        "environment": member_environment(sealed),
        "tags": {"application": "s3rollup"},
        "security": security,
        # Its clean-up lists and deletes clusters, task definitions, security groups and
        # roles across the account: nothing of the kind is created here to clean up.
        "skip_cleanup": True,
    }


@contextlib.contextmanager
def task_cluster(settings: Settings) -> Iterator[Any]:
    """A FargateCluster of the stack's scheduler and worker task definitions, stopped (every
    task: StopTask) when the block ends, however it ends."""
    import warnings

    try:
        from dask_cloudprovider.aws import FargateCluster
    except ImportError as exc:  # the worker image has it; a slim install may not
        raise S3RollupError(
            "a FargateCluster needs dask-cloudprovider[aws] (pip install 's3rollup[worker]')",
            "MISSING_DEPENDENCY",
        ) from exc
    security = cluster_security()
    started = time.monotonic()
    try:
        sealed = seal_cluster_tls(security, _aws().client("kms"), settings.kms_key_arn)
    except (ClientError, BotoCoreError) as exc:
        code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
        raise S3RollupError(
            f"the Dask cluster's TLS could not be sealed (KMS Encrypt: {code or reason_code(exc)})",
            "CLUSTER_START_FAILED",
        ) from exc
    try:
        with warnings.catch_warnings():
            # It looks for --tls options in the scheduler's arguments; TLS comes from the
            # environment here (member_environment), so it would always warn.
            warnings.filterwarnings("ignore", message="the cluster was instructed to connect")
            cluster = FargateCluster(**fargate_cluster_kwargs(settings, security, sealed))
    except Exception as exc:
        # A cluster that fails to start stops what it started (SpecCluster closes itself).
        raise S3RollupError(f"the Dask cluster did not start: {exc}", "CLUSTER_START_FAILED") from exc
    log.info(
        "dask cluster started",
        extra={"workers": settings.fargate_workers, "seconds": round(time.monotonic() - started, 3)},
    )
    with cluster:
        yield cluster


class LocalTasks:
    """A round's tasks on threads of the job's own process, one per CPU of its task.

    Parsing and aggregation release the GIL, so threads use every CPU; the tasks find the
    job's clients (job._aws()). Nothing listens, nothing is serialized, and nothing of
    distributed is imported or started: a Dask cluster in this process (a LocalCluster
    with one worker) ran the same tasks on the same threads, after 0.4-0.5 s of
    distributed's imports, its start and its HTTP servers."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def run(self, fn: Callable[..., _R], *iterables: Iterable[Any], timeout: float | None = None) -> list[_R]:
        """fn over the items, in order; TimeoutError when not all finished in time."""
        from concurrent.futures import wait

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="s3rollup-task")
        futures = [self._pool.submit(fn, *args) for args in zip(*iterables, strict=True)]
        _, pending = wait(futures, timeout=timeout)
        if pending:
            for f in pending:
                f.cancel()
            raise TimeoutError
        return [f.result() for f in futures]

    def close(self) -> None:
        """Let the threads go (a task still running, after a timeout, is not waited for)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class ClusterTasks:
    """A round's tasks on a Dask cluster (a configured scheduler or a task cluster)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def run(self, fn: Callable[..., _R], *iterables: Iterable[Any], timeout: float | None = None) -> list[_R]:
        """fn over the items, in order, one Dask task each; TimeoutError when not all
        finished in time (all workers gone: Dask would wait for new ones forever)."""
        from distributed import wait

        futures = self.client.map(fn, *iterables, pure=False)
        wait(futures, timeout=timeout)
        return list(self.client.gather(futures))


Tasks = LocalTasks | ClusterTasks


class Clusters:
    """Where each round of a job runs its tasks: on the configured Dask scheduler when there
    is one; a round whose new parts add up to more than the threshold on a task cluster of
    its own (stopped when the round ends); any other round on the job's own threads
    (LocalTasks, kept for the job's life)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stack = contextlib.ExitStack()
        self._local: LocalTasks | None = None

    def __enter__(self) -> Clusters:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @contextlib.contextmanager
    def for_round(self, work_bytes: int) -> Iterator[Tasks]:
        """Where a round of work_bytes of new parts runs."""
        s = self.settings
        if s.dask_scheduler or (s.fargate_threshold_bytes and work_bytes > s.fargate_threshold_bytes):
            with dask_client(s) as client:
                yield ClusterTasks(client)
            return
        if self._local is None:
            self._local = LocalTasks(available_cpus())
            self._stack.callback(self._local.close)
        yield self._local


def prepare_round() -> None:
    """What a round needs before it starts, done ahead (the job does it while it waits on
    S3 and DynamoDB): import what computes partials and merges them (s3rollup.stats:
    NumPy, pyarrow, the native kernels; pandas only when a contract's keys need it).
    distributed is imported only by a round that runs on a Dask cluster (dask_client)."""
    from . import stats  # noqa: F401  (imported for what it imports)


@contextlib.contextmanager
def dask_client(settings: Settings) -> Iterator[Any]:
    """A client of a Dask cluster: the configured scheduler, else a task cluster of its own
    (task_cluster)."""
    from distributed import Client

    # distributed sets its own loggers to INFO on import; its chatter is not ours to ship.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if settings.dask_scheduler:
        with Client(settings.dask_scheduler, timeout="30s") as client:
            yield client
        return
    with task_cluster(settings) as cluster, Client(cluster) as client:
        yield client


def task_actor() -> str:
    """Who is acting: the ECS task ARN on Fargate, else this host and process."""
    uri = os.environ.get("ECS_CONTAINER_METADATA_URI_V4", "")
    if uri.startswith("http://169.254."):
        import urllib.request

        with contextlib.suppress(Exception), urllib.request.urlopen(f"{uri}/task", timeout=2) as r:  # noqa: S310
            return "ecs:" + str(json.load(r)["TaskARN"])
    return f"local:{socket.gethostname()}:{os.getpid()}"


class Job:
    """One job for one dataset."""

    def __init__(self, settings: Settings, aws: Aws, dataset: str, job_id: str, actor: str) -> None:
        self.settings, self.aws = settings, aws
        self.dataset, self.job_id, self.actor = check_dataset(dataset), job_id, actor
        self.audit = AuditLog(aws.dynamodb, settings.audit_table)
        self.state = State(aws.dynamodb, settings.state_table)
        self.ingest = Ingest(settings, aws.s3, aws.dynamodb, launcher=None)  # never touches the lease
        self.rounds = 0
        # The change markers the current round reflects (key -> token): cleared once its
        # result is published.
        self.changes: dict[str, str] = {}
        self.rows_aggregated = 0
        self.rows_without_key = 0  # left out of every group: a group key was missing
        self.parts_aggregated = 0
        # "native" or "pandas", as the tasks that computed partials reported (see stats).
        self.kernels: set[str] = set()
        # The tasks' own time per step, summed over the parts (part_result's "seconds").
        self.part_seconds: dict[str, float] = {}
        # What the job's publishes wrote and merged (the manifest's segments, and partials
        # merged into them): a removal merges O(log N) partials, an addition O(depth).
        self.segments_written = 0
        self.partials_merged = 0

    def run(self) -> int:
        """Run until no part is waiting; 0 on success (or when another job holds the lease)."""
        # Importing what a round computes with takes a few tenths of a second of CPU; taking
        # the lease, auditing the start and reconciling with the bucket are mostly waiting on
        # DynamoDB and S3. Do the two at once.
        importing = ThreadPoolExecutor(1, thread_name_prefix="s3rollup-import")
        imported = importing.submit(prepare_round)
        importing.shutdown(wait=False)
        if not self.state.acquire_lease(self.dataset, self.job_id, self.settings.lease_seconds):
            log.info(
                "another job holds the dataset",
                extra={"dataset": self.dataset, "job_id": self.job_id},
            )
            return 0
        self.audit.append(self.dataset, "JOB_STARTED", self.actor, job_id=self.job_id)
        started = time.monotonic()
        try:
            todo = self._pending()
            with contextlib.suppress(Exception):  # dask_client imports it again and says why
                imported.result()
            with Clusters(self.settings) as clusters:
                while True:
                    lease = LeaseKeeper(self.state, self.dataset, self.job_id, self.settings.lease_seconds)
                    # The lease is kept while a task cluster starts and stops, too.
                    with lease, clusters.for_round(sum(p.size for p in todo)) as tasks_on:
                        self.round(tasks_on, todo, lease)
                    self.state.release_lease(self.dataset, self.job_id)
                    # Parts registered while we worked found the lease taken: they are ours.
                    if not self.state.waiting(self.dataset) or not self.state.acquire_lease(
                        self.dataset, self.job_id, self.settings.lease_seconds
                    ):
                        break
                    todo = self._pending()
        except Exception as exc:
            code = reason_code(exc)
            log.exception(
                "job failed", extra={"dataset": self.dataset, "job_id": self.job_id, "reason": code}
            )
            self.state.release_lease(self.dataset, self.job_id)
            self._finish("JOB_FAILED", time.monotonic() - started, reason=code)
            return 1
        self._finish("JOB_FINISHED", time.monotonic() - started)
        return 0

    def _finish(self, event: str, seconds: float, reason: str | None = None) -> None:
        """Audit the outcome, export the chain head, publish the job's metrics."""
        self.audit.append(
            self.dataset,
            event,
            self.actor,
            job_id=self.job_id,
            reason=reason,
            detail={
                "rounds": self.rounds,
                "seconds": f"{seconds:.3f}",
                "rows": self.rows_aggregated,
                "rows_without_key": self.rows_without_key,
            },
        )
        if self.settings.anchor_bucket:
            export_head(self.audit, self.aws.s3, self.settings.anchor_bucket, self.dataset)
        from aws_lambda_powertools import Metrics
        from aws_lambda_powertools.metrics import MetricUnit

        metrics = Metrics()
        metrics.add_metric(name="JobsFailed" if reason else "JobsFinished", unit=MetricUnit.Count, value=1)
        metrics.add_metric(name="RowsRolledUp", unit=MetricUnit.Count, value=self.rows_aggregated)
        metrics.add_metric(name="PartsAggregated", unit=MetricUnit.Count, value=self.parts_aggregated)
        metrics.add_metric(name="RollupSeconds", unit=MetricUnit.Seconds, value=seconds)
        requests = self.aws.requests()  # every AWS request of the job's clients, by API
        metrics.add_metric(name="AwsRequests", unit=MetricUnit.Count, value=sum(requests.values()))
        metrics.flush_metrics()
        log.info(
            event.lower().replace("_", " "),
            extra={
                "dataset": self.dataset,
                "job_id": self.job_id,
                "seconds": round(seconds, 3),
                "reason": reason,
                "kernels": sorted(self.kernels),
                "part_seconds": {step: round(v, 3) for step, v in self.part_seconds.items()},
                "segments_written": self.segments_written,
                "partials_merged": self.partials_merged,
                "requests": requests,
            },
        )

    def _pending(self) -> list[Part]:
        """The parts this round computes a partial for: of the parts whose registry entry
        changed since the published result (the change markers, read with their tokens), those
        accepted without a current partial. Reads the markers and those parts only, never the
        whole registry nor a listing: the scheduled reconcile is what catches lost events.
        """
        self.changes = self.state.changes(self.dataset)
        parts = self.state.get_parts(self.dataset, self.changes)
        return [parts[k] for k in sorted(parts) if parts[k].needs_partial]

    def round(self, tasks_on: Tasks, todo: list[Part], lease: LeaseKeeper) -> None:
        """Compute the partials of todo, merge all current partials and publish (while the
        lease is ours: a job that lost it fails rather than race the job that holds it)."""
        self.rounds += 1
        contract = self.ingest.contract(self.dataset)
        tasks = [
            PartialTask(
                self.settings.bucket,
                self.settings.kms_key_arn,
                self.dataset,
                p.key,
                p.version_id,
                contract,
                alone=len(todo) == 1,
                keep=isinstance(tasks_on, LocalTasks),
            )
            for p in todo
        ]
        try:
            try:
                results = tasks_on.run(compute_partial, tasks, timeout=self.settings.round_timeout_seconds)
            except TimeoutError:
                raise S3RollupError("partials not computed in time", "ROUND_TIMEOUT") from None
            lease.check()
            by_key = {p.key: p for p in todo}
            for res in results:
                self._record_partial(by_key[res["key"]], res)
            self.publish(contract)
        finally:
            kept_partials.clear()

    def _record_partial(self, part: Part, res: dict[str, Any]) -> None:
        pid = parse_part_key(part.key).part_id
        if "error" in res:
            err = res["error"]
            try:
                self.audit.append(
                    self.dataset,
                    "PART_REJECTED",
                    self.actor,
                    extra_items=[self.state.rejected_item(part, err["code"])],
                    key=part.key,
                    version_id=part.version_id,
                    etag=part.etag,
                    sha256=res["sha256"],
                    decision="REJECTED",
                    reason=err["code"],
                    job_id=self.job_id,
                    detail={"line": err["line"]} if err["line"] else None,
                )
            except Duplicate:
                return  # the part changed meanwhile; its new version has its own decision
            self._quarantine(part, err)
            log.warning(
                "part rejected by the worker",
                extra={
                    "dataset": self.dataset,
                    "part_id": pid,
                    "reason": err["code"],
                    "line": err["line"],
                },
            )
            return
        without_key = int(res["rows_without_key"])  # in no group: a group key was missing
        try:
            self.audit.append(
                self.dataset,
                "PART_AGGREGATED",
                self.actor,
                extra_items=[
                    self.state.aggregated_item(part, res["rows"], res["sha256"], res["partial_sha256"])
                ],
                key=part.key,
                version_id=part.version_id,
                etag=part.etag,
                sha256=res["sha256"],
                rows=res["rows"],
                job_id=self.job_id,
                detail={"rows_without_key": without_key},
            )
            if without_key:
                # Not an error (pandas' groupby leaves such rows out too), but never silent.
                log.warning(
                    "rows without a group key left out",
                    extra={
                        "dataset": self.dataset,
                        "part_id": pid,
                        "rows_without_key": without_key,
                        "rows": int(res["rows"]),
                    },
                )
            self.rows_aggregated += int(res["rows"])
            self.rows_without_key += without_key
            self.parts_aggregated += 1
            self.kernels.add(res["kernels"])
            for step, seconds in res.get("seconds", {}).items():
                self.part_seconds[step] = self.part_seconds.get(step, 0.0) + seconds
        except Duplicate:
            log.info("part changed while aggregating", extra={"dataset": self.dataset, "part_id": pid})

    def _quarantine(self, part: Part, err: dict[str, Any]) -> None:
        pk = parse_part_key(part.key)
        s3, bucket = self.aws.s3, self.settings.bucket
        sse = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self.settings.kms_key_arn}
        source = object_at(bucket, part.key, part.version_id)
        target = quarantine_key(pk)
        s3.copy_object(Bucket=bucket, Key=target, CopySource=source, **sse)
        reason = {**err, "key": part.key, "version_id": part.version_id}
        s3.put_object(
            Bucket=bucket,
            Key=target + ".reason.json",
            Body=json.dumps(reason, indent=2).encode(),
            **sse,
        )
        with contextlib.suppress(ClientError):
            s3.delete_object(Bucket=bucket, Key=partial_key(self.dataset, pk.part_id))

    def publish(self, contract: Contract) -> dict[str, Any] | None:
        """Bring the published result in line with the registry's changes: update the manifest's
        tree with the changed parts (segments and merged partials first), write the aggregates,
        then the root, then clear the change markers it reflects. None when nothing changed.

        The tree is built anew from the whole registry when there is none yet (or one of the
        previous format), when the contract's keys or values changed, or when every part changed
        (a rebuild): then every partial is merged once.
        """
        from .manifest import ROOT_FORMAT, ManifestError, Objects, Update, empty_tree, segment_ids
        from .ops import read_manifest
        from .stats import finalize, partial_to_parquet, table_to_parquet

        objects = Objects(self.aws.s3, self.settings.bucket, self.settings.kms_key_arn)
        prev = read_manifest(self.aws, self.settings.bucket, self.dataset, parts=False)
        tree = (prev or {}).get("tree")
        fresh = (
            tree is None
            or prev is None
            or prev["contract"]["group_by"] != list(contract.group_by)
            or prev["contract"]["values"] != list(contract.values)
            or len(self.changes) >= int(tree["parts"])
        )
        if not fresh and not self.changes:
            log.info("nothing changed since the published result", extra={"dataset": self.dataset})
            return None
        merger = _PartialMerger(self, contract)
        update: Update[pa.Table] = Update(self.dataset, objects, merger)
        if not fresh:
            assert prev is not None and tree is not None
            current = self.state.get_parts(self.dataset, self.changes)
            changes: dict[str, dict[str, Any] | None] = {}
            for key in self.changes:
                part = current.get(key)
                changes[key] = _entry(part) if part is not None and part.current else None
            try:
                new_tree, merged = update.apply(tree, lambda: merger.load(prev["merged_partial"]), changes)
            except ManifestError as exc:
                if exc.code != "SEGMENT_MISSING":
                    # The root's SHA-256 is in the audit chain: this is tampering or corruption.
                    raise S3RollupError(
                        f"the published manifest is not intact: {exc}", "STALE_PARTIAL"
                    ) from exc
                # e.g. versions a failed job left behind, expired by the lifecycle: the
                # registry and the parts' partials still say everything.
                log.warning(
                    "a segment of the last manifest is gone; rebuilding it", extra={"dataset": self.dataset}
                )
                fresh, update = True, Update(self.dataset, objects, merger)
        if fresh:
            # Every accepted part with a current partial, whatever the markers say.
            parts = [p for p in self.state.parts(self.dataset) if p.current]
            new_tree, merged = update.apply(empty_tree(), None, {p.key: _entry(p) for p in parts})
            update.dropped.extend(segment_ids(objects, self.dataset) - update.written)
        final = finalize(merged, contract)

        def store(key: str, data: bytes, ctype: str) -> dict[str, Any]:
            return {**objects.put(key, data, ctype), "bytes": len(data)}

        merged_ref = objects.put(merged_partial_key(self.dataset), partial_to_parquet(merged), _PARQUET)
        as_json = json.dumps(
            {"dataset": self.dataset, "columns": final.column_names, "rows": json_rows(final)},
            separators=(",", ":"),
            allow_nan=False,
        ).encode()
        published: dict[str, dict[str, Any]] = {
            "aggregate.parquet": store(
                result_key(self.dataset, "aggregate.parquet"), table_to_parquet(final), _PARQUET
            ),
            "aggregate.json": store(result_key(self.dataset, "aggregate.json"), as_json, "application/json"),
        }
        manifest = {
            "format": ROOT_FORMAT,
            "dataset": self.dataset,
            "job_id": self.job_id,
            "generated_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "contract": {
                "group_by": list(contract.group_by),
                "values": list(contract.values),
                "statistics": list(contract.statistics),
                "derived": [d.name for d in contract.derived],
                "min_group_size": contract.min_group_size,
            },
            "groups": len(final),
            "groups_suppressed": int(len(merged) - len(final)),
            "rows": int(new_tree["rows"]),
            "part_count": int(new_tree["parts"]),
            "objects": published,
            "merged_partial": merged_ref,
            "tree": new_tree,
        }
        published["manifest.json"] = store(
            result_key(self.dataset, "manifest.json"),
            json.dumps(manifest, indent=1).encode(),
            "application/json",
        )
        self.audit.append(
            self.dataset,
            "RESULT_WRITTEN",
            self.actor,
            job_id=self.job_id,
            objects={k: {"version_id": v["version_id"], "sha256": v["sha256"]} for k, v in published.items()},
            parts=manifest["part_count"],
            rows=manifest["rows"],
        )
        # The result names its changes: their markers go (unless a newer change replaced one).
        for key, token in self.changes.items():
            self.state.clear_change(self.dataset, key, token)
        update.delete_dropped(
            lambda key, exc: log.warning(
                "unused manifest segment not deleted",
                extra={"dataset": self.dataset, "reason": exc.response["Error"]["Code"]},
            )
        )
        self.segments_written += update.segments_written
        self.partials_merged += update.partials_merged
        log.info(
            "result written",
            extra={
                "dataset": self.dataset,
                "parts": manifest["part_count"],
                "groups": len(final),
                "changed": len(self.changes),
                "rebuilt": fresh,
                "segments_written": update.segments_written,
                "partials_merged": update.partials_merged,
            },
        )
        return manifest


def _entry(part: Part) -> dict[str, Any]:
    """A part's entry in a leaf segment of the manifest."""
    return {
        "key": part.key,
        "version_id": part.version_id,
        "etag": part.etag,
        "rows": part.rows,
        "sha256": part.sha256,
        "partial_sha256": part.partial_sha256,
    }


class _PartialMerger:
    """The manifest tree's partials: a part's stored partial (checked against its entry: the
    version it was computed from and its SHA-256), merged partials, Chan et al.'s merge."""

    def __init__(self, job: Job, contract: Contract) -> None:
        self.job, self.contract = job, contract

    def parts(self, entries: list[dict[str, Any]]) -> Iterator[pa.Table]:
        """The parts' stored partials, in order, fetched concurrently (a GET each is latency,
        not work). At most _FETCH_AHEAD partials, and _FETCH_BYTES of them, wait for the merge
        (which takes them a chunk at a time), so memory grows neither with the number of parts
        nor with their groups."""
        from .stats import table_bytes, table_from_parquet

        s3, bucket, dataset = self.job.aws.s3, self.job.settings.bucket, self.job.dataset

        def load(entry: dict[str, Any]) -> pa.Table:
            table = kept_partials.take(entry["version_id"], entry["partial_sha256"])
            if table is not None:
                return table  # computed by this process's tasks in this round: the bytes stored
            obj = s3.get_object(Bucket=bucket, Key=partial_key(dataset, parse_part_key(entry["key"]).part_id))
            data = obj["Body"].read()
            if (
                obj.get("Metadata", {}).get("source-version-id") != entry["version_id"]
                or sha256_hex(data) != entry["partial_sha256"]
            ):
                raise S3RollupError(
                    f"partial of a part does not match its registry entry ({entry['key']!r})",
                    "STALE_PARTIAL",
                )
            return table_from_parquet(data)

        return fetch_in_order(load, entries, table_bytes)

    def load(self, ref: dict[str, str]) -> pa.Table:
        """A merged partial at the version its manifest names; its bytes are checked against the
        SHA-256 there (STALE_PARTIAL when they differ: the root's SHA-256 is in the audit)."""
        from .manifest import Objects
        from .stats import table_from_parquet

        return table_from_parquet(Objects(self.job.aws.s3, self.job.settings.bucket).get(ref))

    def merge(self, partials: Iterable[pa.Table]) -> pa.Table:
        from .stats import merge_partials

        return merge_partials(partials, self.contract)

    def encode(self, partial: pa.Table) -> bytes:
        from .stats import partial_to_parquet

        return partial_to_parquet(partial)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the worker task."""
    memory.configure()  # before a thread starts or NumPy is imported
    configure(os.environ.get("S3ROLLUP_LOG_LEVEL", "INFO"))
    try:
        settings = Settings.from_env()
        dataset = os.environ.get("S3ROLLUP_DATASET", "")
        job_id = os.environ.get("S3ROLLUP_JOB_ID", "")
        if not dataset or not job_id:
            print("s3rollup worker: S3ROLLUP_DATASET and S3ROLLUP_JOB_ID must be set", file=sys.stderr)
            return 2
        global _process_aws
        # The tasks of a local round run on this process's threads: they use the job's
        # clients rather than build their own (creating an S3 client costs tens of ms).
        aws = _process_aws = Aws()
        return Job(settings, aws, dataset, job_id, task_actor()).run()
    except S3RollupError as exc:
        print(f"s3rollup worker: {exc} [{exc.code}]", file=sys.stderr)
        return 2


def run() -> NoReturn:
    """The console entry point: run ``main()`` and end the process with its exit code."""
    exit_process(main())


if __name__ == "__main__":
    # `python -m s3rollup.job` executes this file as __main__. Run the importable module
    # instead: Dask then pickles compute_partial and PartialTask by reference
    # (s3rollup.job.*), so a worker imports them rather than receiving a copy of them, and
    # _aws() in a task of this process reads the same module globals main() set.
    from s3rollup.job import run as _run

    _run()
