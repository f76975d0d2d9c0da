"""IAM at the embedded endpoint: every request is authorized as AWS would, or refused.

moto enforces no IAM by default, and its optional mode checks identity policies against the
resource ``"*"`` and ignores resource policies, so a template whose policies and code had
drifted apart passed every local test and failed on AWS. Here each request that reaches the
embedded endpoint is turned into the IAM requests AWS makes of it (S3's real mapping: a GET
naming a version is ``s3:GetObjectVersion``, a copy also reads its source; DynamoDB's
transactions are one action per item; RunTask also passes the task's roles; SSE-KMS objects,
queues and tables also use the key through their service) and each is decided by
``s3rollup.iam`` against the caller's role policies and the bucket, queue or key policy, as
the stack deployed them from template.yaml. A refused request gets the service's own
AccessDenied reply. Every decision is recorded with its principal, action and resource.

The caller is found from the request's access key: keys that STS issued by AssumeRole at the
endpoint are that role's session (the ingest function, the worker task); any other key is the
account root (the operator who deployed the stack: its identity allows everything, while
bucket and key policies still apply). The endpoint is loopback-only plain HTTP standing in
for AWS's TLS endpoints: it evaluates ``aws:SecureTransport`` as true.
"""

from __future__ import annotations

import io
import json
import re
import threading
import uuid
import xml.etree.ElementTree as ET
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .iam import Decision, Request, as_list, evaluate

ACCOUNT = "123456789012"  # moto's default account

# JSON protocols: the X-Amz-Target prefix's service, as IAM names it.
_JSON_SERVICES = {"dynamodb", "kms", "ecs", "sqs", "logs", "events"}
_QUERY_SERVICES = {"sts", "cloudformation", "iam", "sns", "ec2", "monitoring"}


@dataclass(frozen=True)
class Check:
    """One IAM request a call makes: action on resource, with its own condition keys."""

    action: str
    resource: str
    context: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Record:
    """One decided IAM request, as the endpoint recorded it."""

    principal: str  # "root", or "role/<role name>"
    action: str
    resource: str
    allowed: bool
    reason: str
    context: dict[str, Any] = field(default_factory=dict)  # the condition keys it was decided on


# What the endpoints of this process (all embedded stacks) decided, in bounded memory: a
# count per (principal, action, allowed), the latest decisions as a sample, the refusals no
# test expected (kept up to a cap: each is a finding), and a count of requests by
# (principal, API). A long-running `s3rollup up` makes millions of decisions.
RECORDS_KEPT = 1000  # the latest decisions kept in RECORDS
DENIALS_KEPT = 1000  # the unexpected refusals kept in full (all are counted)
RECORDS: deque[Record] = deque(maxlen=RECORDS_KEPT)
_DECISIONS: Counter[tuple[str, str, bool]] = Counter()
_DENIALS: list[Record] = []
_DENIALS_SEEN = 0
_REQUESTS: Counter[tuple[str, str]] = Counter()
_BYTES: Counter[tuple[str, str]] = Counter()
_RECORDS_LOCK = threading.Lock()
_EXPECTED: set[tuple[str, str]] = set()
_CAPTURES: list[tuple[str, list[Record]]] = []


@contextmanager
def captured(principal: str) -> Iterator[list[Record]]:
    """Every decision on principal's requests while inside, in order: what one component
    called, whatever RECORDS keeps."""
    calls: list[Record] = []
    entry = (principal, calls)
    with _RECORDS_LOCK:
        _CAPTURES.append(entry)
    try:
        yield calls
    finally:
        with _RECORDS_LOCK:
            _CAPTURES.remove(entry)


@contextmanager
def expected_denial(principal: str, action: str) -> Iterator[None]:
    """Mark refusals of (principal, action) as what a test is about (not a finding)."""
    _EXPECTED.add((principal, action))
    try:
        yield
    finally:
        _EXPECTED.discard((principal, action))


def unexpected_denials() -> list[Record]:
    """Refusals no test expected: calls the code makes that IAM would deny (the first
    DENIALS_KEPT of them; denial_count() counts them all)."""
    with _RECORDS_LOCK:
        return list(_DENIALS)


def denial_count() -> int:
    """How many refusals no test expected, kept or not."""
    with _RECORDS_LOCK:
        return _DENIALS_SEEN


def pairs() -> dict[tuple[str, str], tuple[int, int]]:
    """(principal, action) -> (calls allowed, calls refused), roles named by their logical id."""
    out: dict[tuple[str, str], tuple[int, int]] = {}
    with _RECORDS_LOCK:
        decisions = list(_DECISIONS.items())
    for (principal, action, allowed), n in decisions:
        key = (_logical(principal), action)
        ok, no = out.get(key, (0, 0))
        out[key] = (ok + n, no) if allowed else (ok, no + n)
    return dict(sorted(out.items()))


def requests() -> dict[tuple[str, str], int]:
    """Requests that reached the endpoints so far, by (principal, API), e.g.
    ("role/<task role>", "s3.GetObject"); refused ones included."""
    with _RECORDS_LOCK:
        return dict(_REQUESTS)


def transferred() -> dict[tuple[str, str], int]:
    """Bytes of those requests' bodies and their responses' bodies, by (principal, API)."""
    with _RECORDS_LOCK:
        return dict(_BYTES)


def _logical(principal: str) -> str:
    # role/local-<stack>-<persona> -> <persona>; role/<stack>-<LogicalId>-<suffix> -> <LogicalId>
    persona = re.fullmatch(r"role/local-.+-(producer|reader|operator)", principal)
    if persona:
        return persona[1]
    m = re.fullmatch(r"role/.+?-([A-Za-z0-9]+)-[A-Z0-9]+", principal)
    return m[1] if m else principal


def pairs_table(rows: dict[tuple[str, str], tuple[int, int]]) -> list[str]:
    """The pairs as a Markdown table."""
    lines = ["| principal | action | allowed | refused |", "|---|---|---:|---:|"]
    lines += [f"| {p} | `{a}` | {ok} | {no} |" for (p, a), (ok, no) in rows.items()]
    return lines


def _record(rec: Record) -> None:
    global _DENIALS_SEEN
    with _RECORDS_LOCK:
        RECORDS.append(rec)
        for principal, calls in _CAPTURES:
            if principal == rec.principal:
                calls.append(rec)
        _DECISIONS[(rec.principal, rec.action, rec.allowed)] += 1
        if not rec.allowed and not rec.reason.startswith("expected:"):
            _DENIALS_SEEN += 1
            if len(_DENIALS) < DENIALS_KEPT:
                _DENIALS.append(rec)


def _count_request(label: str, api: str, body_bytes: int) -> None:
    with _RECORDS_LOCK:
        _REQUESTS[(label, api)] += 1
        _BYTES[(label, api)] += body_bytes


def _counting(label: str, api: str, head: bool, start_response: Callable[..., Any]) -> Callable[..., Any]:
    """start_response, counting the response body's bytes (its Content-Length; a HEAD has none)."""

    def counted(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        length = next((v for k, v in headers if k.lower() == "content-length"), "0")
        if not head and length.isdigit():
            with _RECORDS_LOCK:
                _BYTES[(label, api)] += int(length)
        return start_response(status, headers, exc_info)

    return counted


# ---- the policies the stack deployed ------------------------------------------------------


class Policies:
    """Identity policies (from the embedded IAM) and resource policies (as the template
    gives them, Deny statements included) of one embedded stack."""

    def __init__(self, region: str) -> None:
        self.region = region
        self.resource: dict[str, dict[str, Any]] = {}  # bucket, queue or key ARN -> policy
        self.managed: dict[str, list[str]] = {}  # role ARN -> attached managed policy ARNs
        self._roles: dict[str, list[dict[str, Any]]] = {}

    def set_resource_policy(self, arn: str, policy: dict[str, Any]) -> None:
        """Record a resource's policy (bucket, queue or key)."""
        self.resource[arn] = policy

    def for_resource(self, arn: str) -> dict[str, Any] | None:
        """The policy that governs arn (an object's is its bucket's)."""
        if arn.startswith("arn:aws:s3:::"):
            return self.resource.get(arn.split("/", 1)[0])
        return self.resource.get(arn)

    def identity(self, role_arn: str) -> list[dict[str, Any]]:
        """A role's inline policies (read from the embedded IAM once) and the AWS managed
        policies the template attaches (moto's CloudFormation does not attach them; their
        documents come with moto)."""
        if role_arn not in self._roles:
            from moto.iam.aws_managed_policies import aws_managed_policies_data
            from moto.iam.models import iam_backends

            role = iam_backends[ACCOUNT]["aws"].get_role_by_arn(role_arn)
            docs = [_load(doc) for doc in role.policies.values()]
            for attached in role.managed_policies.values():  # customer managed, attached by API
                version = next(v for v in attached.versions if v.version_id == attached.default_version_id)
                docs.append(_load(version.document))
            managed = json.loads(aws_managed_policies_data)
            for arn in self.managed.get(role_arn, []):
                docs.append(_load(managed[arn.rsplit("/", 1)[-1]]["Document"]))
            self._roles[role_arn] = docs
        return self._roles[role_arn]


def _load(doc: Any) -> dict[str, Any]:
    if isinstance(doc, dict):
        return doc
    text = str(doc)
    try:
        out: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError:
        out = json.loads(unquote(text))
    return out


def caller(access_key: str) -> tuple[str, str]:
    """(principal ARN, label) of an access key: an assumed role's session, or the root."""
    from moto.sts.models import sts_backends

    if access_key:
        assumed = sts_backends[ACCOUNT]["aws"].get_assumed_role_from_access_key(access_key)
        if assumed is not None:
            return assumed.arn, f"role/{assumed.role_arn.rsplit('/', 1)[-1]}"
    return f"arn:aws:iam::{ACCOUNT}:root", "root"


# ---- requests to IAM requests -------------------------------------------------------------


@dataclass
class Call:
    """What the endpoint knows of one HTTP request."""

    service: str  # the signing name: s3, dynamodb, sqs, ...
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    region: str

    def json(self) -> dict[str, Any]:
        """The body of a JSON-protocol request."""
        return json.loads(self.body or b"{}")

    def form(self) -> dict[str, str]:
        """The body of a query-protocol request."""
        return {k: v[0] for k, v in parse_qs(self.body.decode("utf-8", "replace")).items()}


def _arn(service: str, region: str, resource: str) -> str:
    return f"arn:aws:{service}:{region}:{ACCOUNT}:{resource}"


_S3_BUCKET_GET = {
    "versions": "ListBucketVersions",
    "uploads": "ListBucketMultipartUploads",
    "location": "GetBucketLocation",
    "policy": "GetBucketPolicy",
    "versioning": "GetBucketVersioning",
    "notification": "GetBucketNotification",
    "encryption": "GetEncryptionConfiguration",
    "lifecycle": "GetLifecycleConfiguration",
    "logging": "GetBucketLogging",
    "object-lock": "GetBucketObjectLockConfiguration",
    "publicAccessBlock": "GetBucketPublicAccessBlock",
    "ownershipControls": "GetBucketOwnershipControls",
    "acl": "GetBucketAcl",
    "tagging": "GetBucketTagging",
    "cors": "GetBucketCORS",
}
_S3_BUCKET_PUT = {
    "versioning": "PutBucketVersioning",
    "policy": "PutBucketPolicy",
    "notification": "PutBucketNotification",
    "encryption": "PutEncryptionConfiguration",
    "lifecycle": "PutLifecycleConfiguration",
    "logging": "PutBucketLogging",
    "object-lock": "PutBucketObjectLockConfiguration",
    "publicAccessBlock": "PutBucketPublicAccessBlock",
    "ownershipControls": "PutBucketOwnershipControls",
    "acl": "PutBucketAcl",
    "tagging": "PutBucketTagging",
    "cors": "PutBucketCORS",
}
_S3_OBJECT_SUB = {  # (method, sub-resource) -> action; versioned forms add "Version"
    ("GET", "tagging"): "GetObjectTagging",
    ("PUT", "tagging"): "PutObjectTagging",
    ("DELETE", "tagging"): "DeleteObjectTagging",
    ("GET", "acl"): "GetObjectAcl",
    ("PUT", "acl"): "PutObjectAcl",
    ("GET", "attributes"): "GetObjectAttributes",
    ("GET", "retention"): "GetObjectRetention",
    ("PUT", "retention"): "PutObjectRetention",
    ("GET", "legal-hold"): "GetObjectLegalHold",
    ("PUT", "legal-hold"): "PutObjectLegalHold",
    ("POST", "restore"): "RestoreObject",
}
_VERSIONED = {"GetObject", "DeleteObject", "GetObjectTagging", "PutObjectTagging", "DeleteObjectTagging"}
_VERSIONED |= {"GetObjectAcl", "PutObjectAcl", "GetObjectAttributes"}
_SSE = "x-amz-server-side-encryption"


def s3_checks(call: Call) -> list[Check]:
    """The IAM requests of one S3 REST request (path-style addressing)."""
    parts = call.path.lstrip("/").split("/", 1)
    bucket, key = unquote(parts[0]), unquote(parts[1]) if len(parts) > 1 else ""
    if not bucket:
        return [Check("s3:ListAllMyBuckets", "*")]
    bucket_arn = f"arn:aws:s3:::{bucket}"
    q, m = call.query, call.method
    if not key:
        if m == "GET" or m == "HEAD":
            action = next((a for s, a in _S3_BUCKET_GET.items() if s in q), "ListBucket")
            listing = {f"s3:{k}": q[k] for k in ("prefix", "delimiter", "max-keys") if k in q}
            return [Check(f"s3:{action}", bucket_arn, listing)]
        if m == "PUT":
            return [
                Check(
                    f"s3:{next((a for s, a in _S3_BUCKET_PUT.items() if s in q), 'CreateBucket')}", bucket_arn
                )
            ]
        if m == "DELETE":
            sub = next(
                (a.replace("Put", "Delete", 1) for s, a in _S3_BUCKET_PUT.items() if s in q), "DeleteBucket"
            )
            return [Check(f"s3:{sub}", bucket_arn)]
        if m == "POST" and "delete" in q:
            return [
                Check(
                    "s3:DeleteObjectVersion" if deleted else "s3:DeleteObject",
                    f"{bucket_arn}/{k}",
                    {"s3:versionid": deleted} if deleted else {},
                )
                for k, deleted in _deleted_objects(call.body)
            ]
        return [Check(f"s3:Unmapped{m}Bucket", bucket_arn)]
    object_arn = f"{bucket_arn}/{key}"
    version = q.get("versionId")
    ctx: dict[str, Any] = {"s3:versionid": version} if version else {}
    on_sub = next((a for (meth, s), a in _S3_OBJECT_SUB.items() if meth == m and s in q), None)
    if on_sub:
        versioned = on_sub + ("Version" if version and on_sub in _VERSIONED else "")
        return [Check(f"s3:{versioned}", object_arn, ctx)]
    if m in ("GET", "HEAD"):
        if "uploadId" in q:
            return [Check("s3:ListMultipartUploadParts", object_arn)]
        return [Check("s3:GetObjectVersion" if version else "s3:GetObject", object_arn, ctx)]
    if m == "DELETE":
        if "uploadId" in q:
            return [Check("s3:AbortMultipartUpload", object_arn)]
        return [Check("s3:DeleteObjectVersion" if version else "s3:DeleteObject", object_arn, ctx)]
    if m in ("PUT", "POST"):
        put_ctx = {f"s3:{h}": v for h, v in call.headers.items() if h.startswith(_SSE)}
        checks = [Check("s3:PutObject", object_arn, put_ctx)]
        source = call.headers.get("x-amz-copy-source")
        if source:
            src = urlsplit(unquote(source).lstrip("/"))
            src_version = parse_qs(src.query).get("versionId", [None])[0]
            checks[0].context["s3:x-amz-copy-source"] = unquote(source).lstrip("/")
            checks.append(
                Check(
                    "s3:GetObjectVersion" if src_version else "s3:GetObject",
                    f"arn:aws:s3:::{src.path}",
                    {"s3:versionid": src_version} if src_version else {},
                )
            )
        return checks
    return [Check(f"s3:Unmapped{m}Object", object_arn)]


def _deleted_objects(body: bytes) -> list[tuple[str, str | None]]:
    # A request from this machine's own clients to the loopback endpoint, which moto parses
    # right after in the same way.
    root = ET.fromstring(body)  # noqa: S314
    out = []
    for obj in root.iter():
        if obj.tag.rsplit("}", 1)[-1] != "Object":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child.text or "" for child in obj}
        out.append((fields.get("Key", ""), fields.get("VersionId") or None))
    return out


def _table(region: str, name: str, index: str | None = None) -> str:
    return _arn("dynamodb", region, f"table/{name}" + (f"/index/{index}" if index else ""))


_TRANSACT = {
    "Put": "PutItem",
    "Update": "UpdateItem",
    "Delete": "DeleteItem",
    "ConditionCheck": "ConditionCheckItem",
}


def dynamodb_checks(op: str, body: dict[str, Any], region: str) -> list[Check]:
    """DynamoDB: one IAM request per table; a transaction's per item, by the item's action
    (DynamoDB authorizes TransactWriteItems as the PutItem, UpdateItem, DeleteItem and
    ConditionCheckItem it is made of)."""
    if op == "TransactWriteItems":
        return [
            Check(f"dynamodb:{_TRANSACT[kind]}", _table(region, spec["TableName"]))
            for item in body.get("TransactItems", [])
            for kind, spec in item.items()
        ]
    if op == "TransactGetItems":
        return [
            Check("dynamodb:GetItem", _table(region, i["Get"]["TableName"]))
            for i in body.get("TransactItems", [])
        ]
    if op in ("BatchGetItem", "BatchWriteItem"):
        return [Check(f"dynamodb:{op}", _table(region, t)) for t in body.get("RequestItems", {})]
    if "TableName" in body:
        return [Check(f"dynamodb:{op}", _table(region, body["TableName"], body.get("IndexName")))]
    return [Check(f"dynamodb:{op}", "*")]


def key_arn(key_id: str, region: str) -> str:
    """A KMS key ARN for a key id, key ARN, alias name or alias ARN (as the embedded KMS has it)."""
    from moto.kms.models import kms_backends

    backend = kms_backends[ACCOUNT][region]
    try:
        return str(backend.describe_key(backend.any_id_to_key_id(key_id)).arn)
    except Exception:  # an unknown key: the request is decided on the name it gave
        return key_id if key_id.startswith("arn:") else _arn("kms", region, f"key/{key_id}")


def queue_arn(url_or_name: str, region: str) -> str:
    """An SQS queue's ARN from its URL or name."""
    return _arn("sqs", region, url_or_name.rstrip("/").rsplit("/", 1)[-1])


def ecs_checks(op: str, body: dict[str, Any], region: str) -> list[Check]:
    """ECS: RunTask on the task definition, in the cluster, passing the task's roles (and
    tagging its tasks); StopTask and DescribeTasks on the tasks; DescribeClusters on the clusters."""
    cluster = body.get("cluster", "default")
    cluster_arn = cluster if cluster.startswith("arn:") else _arn("ecs", region, f"cluster/{cluster}")
    ctx = {"ecs:cluster": cluster_arn}
    if op in ("RunTask", "StartTask"):
        taskdef = body["taskDefinition"]
        taskdef_arn = (
            taskdef if taskdef.startswith("arn:") else _arn("ecs", region, f"task-definition/{taskdef}")
        )
        checks = [Check(f"ecs:{op}", taskdef_arn, ctx)]
        if body.get("tags"):
            new_tasks = _arn("ecs", region, f"task/{cluster_arn.rsplit('/', 1)[-1]}/*")
            checks.append(Check("ecs:TagResource", new_tasks, {"ecs:CreateAction": op}))
        for role in _task_roles(taskdef, region, body.get("overrides", {})):
            checks.append(Check("iam:PassRole", role, {"iam:PassedToService": "ecs-tasks.amazonaws.com"}))
        return checks
    if op in ("StopTask", "DescribeTasks"):
        tasks = body.get("tasks") or [body.get("task", "*")]
        return [
            Check(f"ecs:{op}", t if t.startswith("arn:") else _arn("ecs", region, f"task/{cluster}/{t}"), ctx)
            for t in tasks
        ]
    if op == "DescribeClusters":
        return [
            Check(f"ecs:{op}", c if c.startswith("arn:") else _arn("ecs", region, f"cluster/{c}"))
            for c in body.get("clusters") or ["default"]
        ]
    return [Check(f"ecs:{op}", "*")]


def _task_roles(taskdef: str, region: str, overrides: dict[str, Any]) -> list[str]:
    from moto.ecs.models import ecs_backends

    try:
        definition = ecs_backends[ACCOUNT][region].describe_task_definition(taskdef)
    except Exception:  # RunTask itself reports the unknown definition
        return []
    roles = [overrides.get("taskRoleArn") or definition.task_role_arn, overrides.get("executionRoleArn")]
    roles.append(definition.execution_role_arn)
    return sorted({r for r in roles if r})


def kms_direct_check(op: str, body: dict[str, Any], region: str) -> Check:
    """A KMS request made to KMS itself: on the key it names (a Decrypt naming none, on the
    key its ciphertext names, as KMS decides it), with the request context KMS gives a key
    policy: kms:CallerAccount and kms:EncryptionContext:<key> for each pair of the request's
    encryption context (no kms:ViaService: no service made it)."""
    key_id = body.get("KeyId") or (_ciphertext_key(body.get("CiphertextBlob")) if op == "Decrypt" else None)
    ctx: dict[str, Any] = {"kms:CallerAccount": ACCOUNT}
    ctx.update({f"kms:EncryptionContext:{k}": v for k, v in (body.get("EncryptionContext") or {}).items()})
    return Check(f"kms:{op}", key_arn(key_id, region) if key_id else "*", ctx)


def _ciphertext_key(blob: str | None) -> str | None:
    """The key id a ciphertext of the embedded KMS names (moto's format), None if unreadable."""
    import base64

    from moto.kms.utils import _deserialize_ciphertext_blob

    try:
        return str(_deserialize_ciphertext_blob(base64.b64decode(blob or "")).key_id) or None
    except Exception:  # not a ciphertext: KMS itself refuses it
        return None


def json_checks(call: Call) -> list[Check]:
    """The IAM requests of a JSON-protocol request (X-Amz-Target names the operation)."""
    op = call.headers.get("x-amz-target", ".").rsplit(".", 1)[-1]
    body, region = call.json(), call.region
    if call.service == "dynamodb":
        return dynamodb_checks(op, body, region)
    if call.service == "ecs":
        return ecs_checks(op, body, region)
    if call.service == "kms":
        return [kms_direct_check(op, body, region)]
    if call.service == "sqs":
        # SQS authorizes a batch as its single-message action (SendMessageBatch as SendMessage).
        op = op.removesuffix("Batch")
        if "QueueUrl" in body:
            return [Check(f"sqs:{op}", queue_arn(body["QueueUrl"], region))]
        if "QueueName" in body:
            return [Check(f"sqs:{op}", queue_arn(body["QueueName"], region))]
        return [Check(f"sqs:{op}", "*")]
    if call.service == "logs" and "logGroupName" in body:
        stream = f":log-stream:{body['logStreamName']}" if "logStreamName" in body else ""
        return [Check(f"logs:{op}", _arn("logs", region, f"log-group:{body['logGroupName']}{stream}"))]
    return [Check(f"{call.service}:{op}", "*")]


def query_checks(call: Call) -> list[Check]:
    """The IAM requests of a query-protocol request (the form's Action names the operation)."""
    form = call.form()
    op = form.get("Action", "Unknown")
    service = "cloudwatch" if call.service == "monitoring" else call.service
    if service == "sts" and op == "GetCallerIdentity":
        return []  # needs no permission
    if service == "sts" and "RoleArn" in form:
        return [Check(f"sts:{op}", form["RoleArn"])]
    if service == "cloudformation" and "StackName" in form:
        name = form["StackName"]
        arn = name if name.startswith("arn:") else _arn("cloudformation", call.region, f"stack/{name}/*")
        return [Check(f"cloudformation:{op}", arn)]
    return [Check(f"{service}:{op}", "*")]


def lambda_checks(call: Call) -> list[Check]:
    """Lambda's REST API: the function named in the path."""
    m = re.match(r"/[\d-]+/functions/([^/]+)(/.*)?$", call.path)
    if not m:
        return [Check("lambda:Unmapped", "*")]
    fn = unquote(m[1])
    arn = fn if fn.startswith("arn:") else _arn("lambda", call.region, f"function:{fn}")
    tail = m[2] or ""
    action = {
        "/configuration": "GetFunctionConfiguration",
        "/invocations": "InvokeFunction",
    }.get(tail, "GetFunction" if call.method == "GET" else "Unmapped")
    return [Check(f"lambda:{action}", arn)]


# ---- keys used through a service ----------------------------------------------------------


def _kms(action: str, key: str, via: str, region: str, context: dict[str, str]) -> Check:
    ctx: dict[str, Any] = {"kms:ViaService": f"{via}.{region}.amazonaws.com", "kms:CallerAccount": ACCOUNT}
    ctx.update({f"kms:EncryptionContext:{k}": v for k, v in context.items()})
    return Check(f"kms:{action}", key, ctx)


def s3_put_key(bucket: str, headers: dict[str, str], region: str) -> str | None:
    """The KMS key an upload is encrypted under: the one it names, else the bucket default's."""
    sse = headers.get(_SSE)
    if sse == "AES256":
        return None
    if headers.get(f"{_SSE}-aws-kms-key-id"):
        return key_arn(headers[f"{_SSE}-aws-kms-key-id"], region)
    from moto.s3.models import s3_backends

    try:
        rules = s3_backends[ACCOUNT]["aws"].get_bucket(bucket).encryption or {}
    except Exception:
        return None
    for rule in as_list(rules.get("Rule", [])):
        default = rule.get("ApplyServerSideEncryptionByDefault", {})
        if default.get("SSEAlgorithm") == "aws:kms" and default.get("KMSMasterKeyID"):
            return key_arn(default["KMSMasterKeyID"], region)
    return None


def s3_object_key(bucket: str, key: str, version: str | None) -> str | None:
    """The KMS key an object version is stored under (None: not SSE-KMS, or no such object)."""
    from moto.s3.models import s3_backends

    try:
        obj = s3_backends[ACCOUNT]["aws"].get_object(bucket, key, version_id=version)
    except Exception:
        return None
    if obj is None or getattr(obj, "encryption", None) != "aws:kms" or not obj.kms_key_id:
        return None
    return str(obj.kms_key_id)


def kms_checks(call: Call, checks: list[Check]) -> list[Check]:
    """The key uses a request makes through S3, SQS or DynamoDB on the caller's behalf."""
    out: list[Check] = []
    region = call.region
    for check in checks:
        action, resource = check.action, check.resource
        if action == "s3:PutObject":
            if call.method == "PUT" and "uploadId" in call.query and "x-amz-copy-source" not in call.headers:
                continue  # an uploaded part: the data key was generated when the upload began
            bucket = resource.split(":::", 1)[1].split("/", 1)[0]
            key = s3_put_key(bucket, call.headers, region)
            if key:
                out.append(
                    _kms("GenerateDataKey", key, "s3", region, {"aws:s3:arn": f"arn:aws:s3:::{bucket}"})
                )
                if "uploads" in call.query:  # a multipart upload also decrypts its data key
                    out.append(_kms("Decrypt", key, "s3", region, {"aws:s3:arn": f"arn:aws:s3:::{bucket}"}))
        elif action in ("s3:GetObject", "s3:GetObjectVersion") and call.method == "GET":
            bucket, _, key_name = resource.split(":::", 1)[1].partition("/")
            key = s3_object_key(bucket, key_name, check.context.get("s3:versionid"))
            if key:
                out.append(_kms("Decrypt", key, "s3", region, {"aws:s3:arn": f"arn:aws:s3:::{bucket}"}))
        elif action in ("sqs:SendMessage", "sqs:ReceiveMessage"):
            key = _queue_key(resource, region)
            if key:
                kms_action = "Decrypt" if action == "sqs:ReceiveMessage" else "GenerateDataKey"
                out.append(_kms(kms_action, key, "sqs", region, {"aws:sqs:arn": resource}))
    return _unique(out)


def _unique(checks: Iterable[Check]) -> list[Check]:
    seen, out = set(), []
    for c in checks:
        ident = (c.action, c.resource, json.dumps(c.context, sort_keys=True))
        if ident not in seen:
            seen.add(ident)
            out.append(c)
    return out


def _queue_key(arn: str, region: str) -> str | None:
    from moto.sqs.models import sqs_backends

    try:
        queue = sqs_backends[ACCOUNT][region].get_queue(arn.rsplit(":", 1)[-1])
    except Exception:
        return None
    key = getattr(queue, "kms_master_key_id", None)
    return key_arn(key, region) if key else None


_DATA_PLANE = {"GetItem", "PutItem", "UpdateItem", "DeleteItem", "Query", "Scan", "ConditionCheckItem"}
_DATA_PLANE |= {"BatchGetItem", "BatchWriteItem"}


def _table_key(name: str, region: str) -> str | None:
    from moto.dynamodb.models import dynamodb_backends

    try:
        table = dynamodb_backends[ACCOUNT][region].get_table(name)
    except Exception:
        return None
    sse = table.sse_specification or {}
    if not sse.get("Enabled", sse.get("SSEEnabled")) or sse.get("SSEType", "KMS") != "KMS":
        return None
    key = sse.get("KMSMasterKeyId")
    return key_arn(key, region) if key else None


def dynamodb_kms_checks(checks: list[Check], region: str) -> list[Check]:
    """A table under a customer managed key: reading or writing it decrypts the table key."""
    out = []
    for check in checks:
        op = check.action.split(":", 1)[1]
        if op not in _DATA_PLANE or ":table/" not in check.resource:
            continue
        name = check.resource.split(":table/", 1)[1].split("/", 1)[0]
        key = _table_key(name, region)
        if key:
            out.append(_kms("Decrypt", key, "dynamodb", region, {"aws:dynamodb:tableName": name}))
    return _unique(out)


# ---- the WSGI middleware ------------------------------------------------------------------

_CREDENTIAL = re.compile(r"Credential=([^/]+)/\d{8}/([^/]+)/([^/]+)/")


def parse_call(environ: dict[str, Any]) -> tuple[Call, str] | None:
    """The call and its access key, from a signed request (None: unsigned, e.g. moto's API)."""
    headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
    if environ.get("CONTENT_TYPE"):
        headers["content-type"] = environ["CONTENT_TYPE"]
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).items()}
    m = _CREDENTIAL.search(headers.get("authorization", ""))
    if m is None and "X-Amz-Credential" in query:
        m = re.match(r"([^/]+)/\d{8}/([^/]+)/([^/]+)/", query["X-Amz-Credential"] + "/")
    if m is None:
        return None
    access_key, region, service = m[1], m[2], m[3]
    body = b""
    needs_body = service != "s3" or (environ["REQUEST_METHOD"] == "POST" and "delete" in query)
    if needs_body:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
    path = environ.get("PATH_INFO", "/")
    call = Call(service, environ["REQUEST_METHOD"], path, query, headers, body, region)
    return call, access_key


_S3_API = {  # an S3 request's first IAM action -> its API, where the two differ
    "s3:GetObjectVersion": "GetObject",
    "s3:DeleteObjectVersion": "DeleteObject",
    "s3:ListBucketVersions": "ListObjectVersions",
    "s3:GetBucketNotification": "GetBucketNotificationConfiguration",
    "s3:PutBucketNotification": "PutBucketNotificationConfiguration",
}


def api_name(call: Call, checks: list[Check]) -> str:
    """The API a request called, as botocore names it: ``s3.GetObject``, ``dynamodb.Query``."""
    if call.service in _JSON_SERVICES:
        return f"{call.service}.{call.headers.get('x-amz-target', '.').rsplit('.', 1)[-1]}"
    if call.service in _QUERY_SERVICES:
        return f"{call.service}.{call.form().get('Action', 'Unknown')}"
    if call.service != "s3" or not checks:
        return f"{call.service}.{checks[0].action.split(':', 1)[-1] if checks else 'Unknown'}"
    action = checks[0].action
    if call.method == "HEAD":
        return "s3.HeadObject" if "/" in call.path.lstrip("/") else "s3.HeadBucket"
    if action == "s3:ListBucket":
        return "s3.ListObjectsV2" if call.query.get("list-type") == "2" else "s3.ListObjects"
    if call.method == "POST" and "delete" in call.query:
        return "s3.DeleteObjects"
    if action == "s3:PutObject" and "uploads" in call.query:
        return "s3.CreateMultipartUpload"
    if action == "s3:PutObject" and "uploadId" in call.query:
        return "s3.UploadPart" if call.method == "PUT" else "s3.CompleteMultipartUpload"
    if action == "s3:PutObject" and "x-amz-copy-source" in call.headers:
        return "s3.CopyObject"
    return f"s3.{_S3_API.get(action, action.split(':', 1)[-1])}"


def checks_for(call: Call) -> list[Check]:
    """Every IAM request one call makes, the key uses through services included."""
    if call.service == "s3":
        checks = s3_checks(call)
    elif call.service in _JSON_SERVICES:
        checks = json_checks(call)
    elif call.service in _QUERY_SERVICES:
        checks = query_checks(call)
    elif call.service == "lambda":
        checks = lambda_checks(call)
    else:
        checks = [Check(f"{call.service}:Unmapped", "*")]
    extra = kms_checks(call, checks) if call.service in ("s3", "sqs") else []
    if call.service == "dynamodb":
        extra = dynamodb_kms_checks(checks, call.region)
    return checks + extra


def _denied_response(call: Call, message: str) -> tuple[str, list[tuple[str, str]], bytes]:
    request_id = uuid.uuid4().hex
    if call.service == "s3":
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
            f"<Message>{_xml(message)}</Message><RequestId>{request_id}</RequestId></Error>"
        ).encode()
        return "403 Forbidden", [("Content-Type", "application/xml")], b"" if call.method == "HEAD" else body
    if call.service in _JSON_SERVICES or call.service == "lambda":
        headers = [
            ("Content-Type", "application/x-amz-json-1.1"),
            ("x-amzn-ErrorType", "AccessDeniedException"),
            ("x-amzn-RequestId", request_id),
        ]
        if call.service == "sqs":
            headers.append(("x-amzn-query-error", "AccessDenied;Sender"))
        status = "403 Forbidden" if call.service == "lambda" else "400 Bad Request"
        return status, headers, json.dumps({"__type": "AccessDeniedException", "message": message}).encode()
    if call.service == "ec2":
        body = (
            f"<Response><Errors><Error><Code>UnauthorizedOperation</Code><Message>{_xml(message)}</Message>"
            f"</Error></Errors><RequestID>{request_id}</RequestID></Response>"
        ).encode()
        return "403 Forbidden", [("Content-Type", "text/xml")], body
    body = (
        f"<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>{_xml(message)}"
        f"</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>"
    ).encode()
    return "403 Forbidden", [("Content-Type", "text/xml")], body


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Enforcer:
    """WSGI middleware in front of the moto app: authorize, record, refuse or pass on."""

    def __init__(self, app: Callable[..., Any], policies: Policies) -> None:
        self.app, self.policies = app, policies

    def decide(self, principal: str, label: str, check: Check) -> Decision:
        """Decide one IAM request and record it."""
        request = Request(
            principal,
            check.action,
            check.resource,
            {
                "aws:SecureTransport": "true",
                "aws:PrincipalArn": Request(principal, "", "").role_arn,
                "aws:PrincipalAccount": ACCOUNT,
                **check.context,
            },
        )
        identity = [] if request.is_root else self.policies.identity(request.role_arn)
        resource_policy = self.policies.for_resource(check.resource)
        # A key's use is decided by its key policy; CreateKey, ListKeys and the like name no key.
        key_policy = check.action.startswith("kms:") and ":key/" in check.resource
        decision = evaluate(request, identity, resource_policy, key_policy=key_policy)
        reason = decision.reason
        if not decision.allowed and (label, check.action) in _EXPECTED:
            reason = f"expected: {reason}"
        _record(Record(label, check.action, check.resource, decision.allowed, reason, dict(request.context)))
        return decision

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        parsed = parse_call(environ)
        if parsed is None:
            return self.app(environ, start_response)
        call, access_key = parsed
        principal, label = caller(access_key)
        try:
            checks = checks_for(call)
        except Exception as exc:  # a request the mapping cannot read: refuse it, loudly
            checks = [Check(f"{call.service}:Unreadable{type(exc).__name__}", "*")]
        api = api_name(call, checks)
        _count_request(label, api, int(environ.get("CONTENT_LENGTH") or 0))
        start_response = _counting(label, api, call.method == "HEAD", start_response)
        for check in checks:
            decision = self.decide(principal, label, check)
            if not decision.allowed:
                message = (
                    f"User: {principal} is not authorized to perform: {check.action} on resource: "
                    f"{check.resource} ({decision.reason})"
                )
                status, headers, body = _denied_response(call, message)
                start_response(status, headers)
                return [body]
        if call.service == "s3" and checks and checks[0].action in ("s3:GetObject", "s3:GetObjectVersion"):
            return self._missing_is_forbidden(call, principal, label, checks[0], environ, start_response)
        return self.app(environ, start_response)

    def _missing_is_forbidden(
        self,
        call: Call,
        principal: str,
        label: str,
        check: Check,
        environ: dict[str, Any],
        start_response: Callable[..., Any],
    ) -> Any:
        """S3 answers a read of a missing key 404 only to a caller allowed s3:ListBucket on
        the bucket (for that request: no prefix); anyone else gets 403 AccessDenied."""
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured["status"], captured["headers"] = status, headers
            return lambda data: None

        # moto answers (status and headers) before its body is iterated: a found object's
        # bytes pass through untouched, only a 404 is looked at.
        body = self.app(environ, capture)
        if "status" not in captured:  # an app that answers only as its body is read
            body = [b"".join(body)]
        if captured["status"].startswith("404"):
            bucket = check.resource.split(":::", 1)[1].split("/", 1)[0]
            listing = Check("s3:ListBucket", f"arn:aws:s3:::{bucket}")
            if not self.decide(principal, label, listing).allowed:
                getattr(body, "close", lambda: None)()
                status, headers, denied = _denied_response(
                    call,
                    f"User: {principal} is not authorized to perform: s3:ListBucket (the key does not exist)",
                )
                start_response(status, headers)
                return [denied]
        start_response(captured["status"], captured["headers"])
        return body
