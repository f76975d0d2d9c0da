"""The embedded default: the whole stack on this machine, built from template.yaml.

- a moto server on 127.0.0.1 is the AWS endpoint, and every request to it is authorized as
  IAM would authorize it (local_iam: the roles', bucket, queue and key policies);
- template.yaml is translated by aws-sam-translator and deployed to moto's CloudFormation,
  so every name, prefix, key and setting comes from the template;
- what moto's CloudFormation skips (bucket notification, versioning, lifecycle, access
  logging, bucket and queue policies) is applied through the service APIs from the same
  template resources;
- the dispatcher stands in for Lambda's SQS event source mapping: it polls the ingest
  queue with the mapping's batch size and calls the real handler with the event Lambda
  would pass, deleting only the messages the handler did not report as failed;
- the function's environment is read back from the deployed function, and the handler runs
  with its execution role's credentials;
- a periodic reconcile finds parts whose events never came (moto sends no delete events);
- the embedded ECS plays Fargate (``run_tasks``, on by default): the function launches jobs
  with RunTask, as on AWS, and a RunTask of the worker's task definition starts the worker as
  a process here with the task role's credentials; so does one from SAM's Lambda container.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import importlib.util
import io
import ipaddress
import itertools
import json
import logging
import os
import sys
import threading
import time
import uuid
import warnings
import zipfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from . import local_objects
from .aws import LOCAL_OPERATOR, Aws, assume_role, credentials_env
from .errors import ConfigError
from .events import records, sqs_record

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "template.yaml"
HANDLER_DIR = ROOT / "functions" / "ingest"
LOCAL_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": LOCAL_OPERATOR["AccessKeyId"],
    "AWS_SECRET_ACCESS_KEY": LOCAL_OPERATOR["SecretAccessKey"],
}
BOOTSTRAP_BUCKET = "s3rollup-local-artifacts"
# A lifecycle "day" of the embedded stack, in seconds: NoncurrentVersionDays (90) keeps a
# replaced version for 90 minutes here (NoncurrentExpiry).
LIFECYCLE_DAY_SECONDS = 60.0
# Docker's default bridge: SAM's Lambda containers and the worker's container reach this
# machine at its address (worker/build_local_base.sh fixes it at 172.31.250.1).
DOCKER_BRIDGE = "docker0"


def component_role(aws: Aws, stack_name: str, component: str) -> str:
    """The role AWS runs a component of the stack with: ``function`` the execution role,
    ``worker`` the worker task definition's task role (read with the operator's ``aws``)."""
    outputs = stack_outputs(aws, stack_name)
    if component == "function":
        return function_role(aws, outputs["IngestFunctionName"])
    if component == "worker":
        ecs = aws.client("ecs")
        taskdef = ecs.describe_task_definition(taskDefinition=outputs["WorkerTaskDefinitionArn"])
        return str(taskdef["taskDefinition"]["taskRoleArn"])
    raise ConfigError(f"no component {component!r}: function or worker")


def component_credentials(aws: Aws, stack_name: str, component: str) -> dict[str, str]:
    """The credentials a component started outside this process uses against the embedded
    stack, as AWS hands them out (SAM's Lambda container: the execution role's; a worker
    container: the task role's), from the endpoint's STS, as environment variables."""
    role = component_role(aws, stack_name, component)
    return credentials_env(assume_role(aws, role, f"s3rollup-{component}"))


def docker_bridge_address() -> str | None:
    """The IPv4 address of Docker's default bridge on this machine (its containers' gateway),
    or None without one."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            # SIOCGIFADDR: the interface's address, as `ip addr show docker0` prints it.
            packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", DOCKER_BRIDGE.encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def check_listen_address(host: str) -> str:
    """host, if the embedded stack may listen there: a loopback address, or the Docker bridge's
    gateway (reachable from this machine's containers only). Never 0.0.0.0 or a public one."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise ConfigError(
            f"--host {host}: give an IP address, a loopback one or Docker's bridge gateway"
        ) from None
    bridge = docker_bridge_address()
    if loopback or host == bridge:
        return host
    where = f"Docker's bridge gateway {bridge}" if bridge else "Docker's bridge gateway (no docker0 here)"
    raise ConfigError(
        f"--host {host}: the embedded stack listens only on a loopback address or on {where}, "
        "never on an address other machines reach"
    )


# ---- template ---------------------------------------------------------------------------------


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    """template.yaml as a dict (CloudFormation short forms expanded)."""
    from samtranslator.yaml_helper import yaml_parse

    doc: dict[str, Any] = yaml_parse(path.read_text())
    return doc


def translate(template: dict[str, Any], code_uri: str) -> dict[str, Any]:
    """The SAM template as plain CloudFormation, with the function code at code_uri."""
    from samtranslator.translator.transform import transform

    class _NoManagedPolicies:
        def load(self) -> dict[str, str]:
            return {}

    doc = json.loads(json.dumps(template))
    for res in doc["Resources"].values():
        if res["Type"] == "AWS::Serverless::Function":
            res["Properties"]["CodeUri"] = code_uri
            res.pop("Metadata", None)
    out: dict[str, Any] = transform(doc, {}, _NoManagedPolicies())
    return out


class Resolver:
    """Resolves the intrinsic functions the template uses, against a deployed stack."""

    def __init__(
        self,
        aws: Aws,
        stack: str,
        params: dict[str, str],
        physical: dict[str, str],
        types: dict[str, str],
    ) -> None:
        self.aws, self.stack, self.params, self.physical, self.types = (
            aws,
            stack,
            params,
            physical,
            types,
        )
        self.account = aws.client("sts").get_caller_identity()["Account"]

    def pseudo(self, name: str) -> str | None:
        """A pseudo parameter's value."""
        return {
            "AWS::AccountId": self.account,
            "AWS::Region": self.aws.region,
            "AWS::Partition": "aws",
            "AWS::StackName": self.stack,
            "AWS::URLSuffix": "amazonaws.com",
        }.get(name)

    def ref(self, name: str) -> str:
        """Ref: a parameter, a pseudo parameter or a resource's physical id."""
        value = self.pseudo(name) or self.params.get(name) or self.physical.get(name)
        if value is None:
            raise ConfigError(f"template: cannot resolve Ref {name}")
        return value

    def get_att(self, name: str, attr: str) -> str:
        """Fn::GetAtt for the attributes the template's skipped resources use."""
        typ, pid = self.types.get(name), self.physical.get(name, "")
        if attr == "Arn" and typ == "AWS::SQS::Queue":
            sqs = self.aws.client("sqs")
            url = sqs.get_queue_url(QueueName=pid.rsplit("/", 1)[-1])["QueueUrl"]
            return str(
                sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            )
        if attr == "Arn" and typ == "AWS::KMS::Key":
            # moto's DescribeKey fails on keys whose policy CloudFormation gave as an object.
            return f"arn:aws:kms:{self.aws.region}:{self.account}:key/{pid}"
        if attr == "Arn" and typ == "AWS::S3::Bucket":
            return f"arn:aws:s3:::{pid}"
        if attr == "Arn" and typ == "AWS::IAM::Role":
            return f"arn:aws:iam::{self.account}:role/{pid}"
        if attr == "Arn" and typ == "AWS::ECS::Cluster":
            return (
                pid
                if pid.startswith("arn:")
                else f"arn:aws:ecs:{self.aws.region}:{self.account}:cluster/{pid}"
            )
        raise ConfigError(f"template: cannot resolve GetAtt {name}.{attr}")

    def resolve(self, node: Any) -> Any:
        """Resolve every intrinsic function in node."""
        if isinstance(node, list):
            return [self.resolve(n) for n in node]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((fn, arg),) = node.items()
            if fn == "Ref":
                return self.ref(arg)
            if fn == "Fn::GetAtt":
                name, attr = arg if isinstance(arg, list) else arg.split(".", 1)
                return self.get_att(name, attr)
            if fn == "Fn::Sub":
                return self._sub(arg)
            if fn == "Fn::Join":
                sep, items = arg
                return sep.join(self.resolve(items))
        return {k: self.resolve(v) for k, v in node.items()}

    def _sub(self, arg: Any) -> str:
        text, extra = (arg, {}) if isinstance(arg, str) else (arg[0], arg[1])
        out, i = [], 0
        while i < len(text):
            j = text.find("${", i)
            if j < 0:
                out.append(text[i:])
                break
            k = text.index("}", j)
            out.append(text[i:j])
            name = text[j + 2 : k]
            if name in extra:
                out.append(str(self.resolve(extra[name])))
            elif "." in name and not name.startswith("AWS::"):
                res, attr = name.split(".", 1)
                out.append(self.get_att(res, attr))
            else:
                out.append(self.ref(name))
            i = k + 1
        return "".join(out)


# ---- the stack --------------------------------------------------------------------------------


@dataclass
class StackInfo:
    """Names of the deployed stack's resources (from its outputs) and the endpoint."""

    endpoint_url: str
    region: str
    stack_name: str
    outputs: dict[str, str]
    function_env: dict[str, str] = field(default_factory=dict)
    batch_size: int = 10
    queue_arn: str = ""
    # What moto's CloudFormation skips: applied from the template by the embedded stack
    # (descriptions), and left out wholly or in part (logical ids).
    applied: list[str] = field(default_factory=list)
    not_applied: list[str] = field(default_factory=list)
    not_applied_note: str = ""
    function_role_arn: str = ""
    persona_roles: dict[str, str] = field(default_factory=dict)  # producer, reader, operator

    def as_json(self) -> dict[str, Any]:
        """What `s3rollup up` prints once it is ready."""
        o = self.outputs
        return {
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "stack": self.stack_name,
            "bucket": o["DataBucketName"],
            "queue": o["IngestQueueUrl"],
            "dead_letter_queue": o["IngestDeadLetterQueueUrl"],
            "audit_table": o["AuditTableName"],
            "state_table": o["StateTableName"],
            "kms_key_arn": o["DataKeyArn"],
            "audit_anchor_bucket": o["AuditAnchorBucketName"],
        }

    def provision_note(self) -> str:
        """One line: what the embedded stack applied itself where moto's CloudFormation stops,
        and what it could not apply."""
        return (
            f"embedded stack: applied what moto's CloudFormation skips ({'; '.join(self.applied)}); "
            f"not applied: {self.not_applied_note or 'nothing'}"
        )


def stack_outputs(aws: Aws, stack_name: str) -> dict[str, str]:
    """A deployed stack's outputs (the way every command finds the bucket and tables)."""
    stacks = aws.client("cloudformation").describe_stacks(StackName=stack_name)["Stacks"]
    return {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs", [])}


def function_role(aws: Aws, function_name: str) -> str:
    """A deployed function's execution role ARN."""
    return str(aws.client("lambda").get_function_configuration(FunctionName=function_name)["Role"])


def function_environment(aws: Aws, function_name: str) -> dict[str, str]:
    """A deployed function's environment variables (the dispatcher's and SAM's source)."""
    fn = aws.client("lambda").get_function_configuration(FunctionName=function_name)
    return {k: str(v) for k, v in fn.get("Environment", {}).get("Variables", {}).items()}


def _code_zip() -> bytes:
    # The function's code as `sam build` would ship it: the handler and the library.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(HANDLER_DIR / "app.py", "app.py")
        for py in sorted((ROOT / "s3rollup").glob("*.py")):
            z.write(py, f"s3rollup/{py.name}")
    return buf.getvalue()


def provision(
    aws: Aws,
    stack_name: str = "s3rollup",
    template_path: Path = TEMPLATE,
    policies: Any = None,
    parameters: dict[str, str] | None = None,
) -> StackInfo:
    """Deploy template.yaml to the endpoint's CloudFormation and apply what it skips; hand the
    bucket, queue and key policies, as the template gives them, to the endpoint's IAM
    (``policies``, a ``local_iam.Policies``). ``parameters`` override the template's
    defaults, as `sam deploy --parameter-overrides` would."""
    template = load_template(template_path)
    ec2 = aws.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.42.0.0/16")["Vpc"]["VpcId"]
    # As the VPC endpoints' private DNS needs (CreateVpcEndpoints); each task's network
    # interface then has a private DNS name, as ECS reports it.
    ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.42.{i}.0/24")["Subnet"]["SubnetId"] for i in (1, 2)
    ]
    s3 = aws.s3
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=BOOTSTRAP_BUCKET)
    code = _code_zip()
    code_key = f"ingest-{hashlib.sha256(code).hexdigest()[:16]}.zip"
    s3.put_object(Bucket=BOOTSTRAP_BUCKET, Key=code_key, Body=code)
    cfn = translate(template, f"s3://{BOOTSTRAP_BUCKET}/{code_key}")
    # The dispatcher below is the event source mapping; moto's own would try to run the
    # function in a container.
    mappings = {k: v for k, v in cfn["Resources"].items() if v["Type"] == "AWS::Lambda::EventSourceMapping"}
    for k in mappings:
        del cfn["Resources"][k]
    account = aws.client("sts").get_caller_identity()["Account"]
    params = {
        "VpcId": vpc,
        "PrivateSubnetIds": ",".join(subnets),
        # The template accepts ECR images only (the execution role pulls from that
        # repository); locally the launcher runs the worker without pulling anything.
        "WorkerImageUri": f"{account}.dkr.ecr.{aws.region}.amazonaws.com/s3rollup-worker:local",
        **(parameters or {}),
    }
    cf = aws.client("cloudformation")
    unsupported = _moto_unsupported()
    unsupported.types.clear()
    cf.create_stack(
        StackName=stack_name,
        TemplateBody=json.dumps(cfn),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
        Capabilities=["CAPABILITY_IAM", "CAPABILITY_AUTO_EXPAND"],
    )
    waiter_deadline = time.monotonic() + 120
    while True:
        stack = cf.describe_stacks(StackName=stack_name)["Stacks"][0]
        if stack["StackStatus"] == "CREATE_COMPLETE":
            break
        if stack["StackStatus"].endswith("FAILED") or time.monotonic() > waiter_deadline:
            raise ConfigError(
                f"embedded stack failed: {stack['StackStatus']} {stack.get('StackStatusReason', '')}"
            )
        time.sleep(0.2)
    summaries = cf.list_stack_resources(StackName=stack_name)["StackResourceSummaries"]
    physical = {r["LogicalResourceId"]: r.get("PhysicalResourceId", "") for r in summaries}
    types = {k: v["Type"] for k, v in cfn["Resources"].items()}
    defaults = {k: str(v["Default"]) for k, v in template.get("Parameters", {}).items() if "Default" in v}
    resolver = Resolver(aws, stack_name, {**defaults, **params}, physical, types)
    skipped = _apply_skipped(aws, cfn, resolver, set(unsupported.types))
    if policies is not None:
        for arn, policy in resource_policies(cfn, resolver).items():
            policies.set_resource_policy(arn, policy)
        for logical, res in cfn["Resources"].items():
            if res["Type"] == "AWS::IAM::Role" and res["Properties"].get("ManagedPolicyArns"):
                arn = f"arn:aws:iam::{resolver.account}:role/{physical[logical]}"
                policies.managed[arn] = resolver.resolve(res["Properties"]["ManagedPolicyArns"])
    outputs = stack_outputs(aws, stack_name)

    env = function_environment(aws, outputs["IngestFunctionName"])
    mapping = next(iter(mappings.values()))["Properties"] if mappings else {}
    personas = persona_roles(aws, stack_name, outputs)
    return StackInfo(
        endpoint_url=str(aws.endpoint_url),
        region=aws.region,
        stack_name=stack_name,
        outputs=outputs,
        function_env=env,
        batch_size=int(mapping.get("BatchSize", 10)),
        queue_arn=str(resolver.resolve(mapping.get("EventSourceArn", ""))),
        applied=skipped.applied,
        not_applied=skipped.not_applied,
        not_applied_note=skipped.note,
        function_role_arn=function_role(aws, outputs["IngestFunctionName"]),
        persona_roles=personas,
    )


def lifecycle_rule(rule: dict[str, Any]) -> dict[str, Any]:
    """A CloudFormation lifecycle rule (resolved) in the shape of the S3 API."""
    out: dict[str, Any] = {
        "ID": rule["Id"],
        "Status": rule["Status"],
        "Filter": {"Prefix": rule.get("Prefix", "")},
    }
    if "ExpirationInDays" in rule:
        out["Expiration"] = {"Days": int(rule["ExpirationInDays"])}
    elif "ExpiredObjectDeleteMarker" in rule:
        out["Expiration"] = {"ExpiredObjectDeleteMarker": bool(rule["ExpiredObjectDeleteMarker"])}
    if "Transitions" in rule:
        out["Transitions"] = [
            {"StorageClass": t["StorageClass"], "Days": int(t["TransitionInDays"])}
            for t in rule["Transitions"]
        ]
    if "NoncurrentVersionExpiration" in rule:
        days = rule["NoncurrentVersionExpiration"]["NoncurrentDays"]
        out["NoncurrentVersionExpiration"] = {"NoncurrentDays": int(days)}
    if "AbortIncompleteMultipartUpload" in rule:
        days = rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"]
        out["AbortIncompleteMultipartUpload"] = {"DaysAfterInitiation": int(days)}
    unknown = set(rule) - {
        "Id",
        "Status",
        "Prefix",
        "ExpirationInDays",
        "ExpiredObjectDeleteMarker",
        "Transitions",
        "NoncurrentVersionExpiration",
        "AbortIncompleteMultipartUpload",
    }
    if unknown:  # a rule the embedded stack would apply only in part
        raise ConfigError(f"template: lifecycle rule {rule['Id']}: cannot apply {sorted(unknown)}")
    return out


def _apply_bucket_properties(s3: Any, bucket: str, props: dict[str, Any]) -> None:
    """Bucket properties moto's CloudFormation leaves out (versioning, Object Lock, lifecycle,
    access logging among them). moto keeps the lifecycle rules (it does not run them)."""
    if "VersioningConfiguration" in props:
        s3.put_bucket_versioning(
            Bucket=bucket, VersioningConfiguration={"Status": props["VersioningConfiguration"]["Status"]}
        )
    if "PublicAccessBlockConfiguration" in props:
        s3.put_public_access_block(
            Bucket=bucket, PublicAccessBlockConfiguration=props["PublicAccessBlockConfiguration"]
        )
    if "ObjectLockConfiguration" in props:
        lock = json.loads(json.dumps(props["ObjectLockConfiguration"]))
        retention = lock.get("Rule", {}).get("DefaultRetention", {})
        for unit in ("Days", "Years"):
            if unit in retention:  # parameters resolve to strings; the API wants a number
                retention[unit] = int(retention[unit])
        s3.put_object_lock_configuration(Bucket=bucket, ObjectLockConfiguration=lock)
    if "OwnershipControls" in props:
        s3.put_bucket_ownership_controls(Bucket=bucket, OwnershipControls=props["OwnershipControls"])
    if "LifecycleConfiguration" in props:
        rules = [lifecycle_rule(r) for r in props["LifecycleConfiguration"]["Rules"]]
        s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})
    if "LoggingConfiguration" in props:
        # moto, like S3, refuses this unless the destination's policy grants the logging service.
        config = props["LoggingConfiguration"]
        s3.put_bucket_logging(
            Bucket=bucket,
            BucketLoggingStatus={
                "LoggingEnabled": {
                    "TargetBucket": config["DestinationBucketName"],
                    "TargetPrefix": config.get("LogFilePrefix", ""),
                }
            },
        )


@dataclass
class Skipped:
    """What moto's CloudFormation skipped, and what became of it."""

    applied: list[str]  # descriptions, for the one line `up` and the demo print
    not_applied: list[str]  # logical ids of resources left out wholly or in part
    note: str  # the resources left out, by type


# Bucket properties moto's CloudFormation leaves out, applied by _apply_bucket_properties.
_BUCKET_PROPERTIES = {
    "NotificationConfiguration": "notification",
    "VersioningConfiguration": "versioning",
    "PublicAccessBlockConfiguration": "public access block",
    "ObjectLockConfiguration": "Object Lock",
    "OwnershipControls": "ownership",
    "LifecycleConfiguration": "lifecycle",
    "LoggingConfiguration": "access logging",
}
# Resource types the embedded stack applies through the service APIs itself.
_APPLIED_TYPES = {"AWS::S3::BucketPolicy", "AWS::SQS::QueuePolicy"}


class _UnsupportedTypes(logging.Filter):
    """Takes moto's "No Moto CloudFormation support for <type>" (logged per resource, twice
    over) off its log and keeps the types: provision() says in one line what it applied
    instead and what it could not."""

    def __init__(self) -> None:
        super().__init__()
        self.types: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("No Moto CloudFormation support") and record.args:
            self.types.add(str(record.args[0] if isinstance(record.args, tuple) else record.args))
            return False
        return True


def _moto_unsupported() -> _UnsupportedTypes:
    """The filter on moto's log that collects the resource types its CloudFormation skips."""
    moto_log = logging.getLogger("moto")
    for f in moto_log.filters:
        if isinstance(f, _UnsupportedTypes):
            return f
    found = _UnsupportedTypes()
    moto_log.addFilter(found)
    return found


def _apply_skipped(aws: Aws, cfn: dict[str, Any], resolver: Resolver, types: set[str]) -> Skipped:
    """Apply the resources and properties moto's CloudFormation does not (of its unsupported
    resource types, types); say what was left out."""
    s3, sqs = aws.s3, aws.client("sqs")
    skipped: list[str] = []
    unsupported: dict[str, list[str]] = {}
    for logical, res in cfn["Resources"].items():
        if res["Type"] in types:
            unsupported.setdefault(res["Type"], []).append(logical)
    partly = 0
    # Bucket policies first: access logging needs its destination's grant in place.
    for logical, res in cfn["Resources"].items():
        if res["Type"] == "AWS::S3::BucketPolicy":
            # Every policy is resolved (so a broken one fails here), but only its Allow
            # statements are applied: moto evaluates a Deny statement without its conditions,
            # so the TLS-only and key-only denies would refuse every request. AWS evaluates
            # them as written.
            policy = resolver.resolve(res["Properties"]["PolicyDocument"])
            allows = [st for st in policy["Statement"] if st["Effect"] == "Allow"]
            if allows:
                s3.put_bucket_policy(
                    Bucket=resolver.resolve(res["Properties"]["Bucket"]),
                    Policy=json.dumps({**policy, "Statement": allows}),
                )
            if len(allows) < len(policy["Statement"]):
                skipped.append(logical)
                partly += 1
    for logical, res in cfn["Resources"].items():
        props = res.get("Properties", {})
        if res["Type"] == "AWS::S3::Bucket":
            _apply_bucket_properties(s3, resolver.physical[logical], resolver.resolve(props))
        if res["Type"] == "AWS::S3::Bucket" and "NotificationConfiguration" in props:
            config = resolver.resolve(props["NotificationConfiguration"])
            queues = [
                {
                    "QueueArn": q["Queue"],
                    "Events": [q["Event"]],
                    "Filter": {"Key": {"FilterRules": q["Filter"]["S3Key"]["Rules"]}},
                }
                for q in config.get("QueueConfigurations", [])
            ]
            s3.put_bucket_notification_configuration(
                Bucket=resolver.physical[logical],
                NotificationConfiguration={"QueueConfigurations": queues},
            )
        elif res["Type"] == "AWS::ECS::TaskDefinition":
            _complete_task_definition(aws.region, resolver.physical[logical], resolver.resolve(props))
        elif res["Type"] == "AWS::SQS::QueuePolicy":
            policy = json.dumps(resolver.resolve(props["PolicyDocument"]))
            for url in resolver.resolve(props["Queues"]):
                real = sqs.get_queue_url(QueueName=url.rsplit("/", 1)[-1])["QueueUrl"]
                sqs.set_queue_attributes(QueueUrl=real, Attributes={"Policy": policy})
    labels = sorted(
        {
            label
            for res in cfn["Resources"].values()
            if res["Type"] == "AWS::S3::Bucket"
            for prop, label in _BUCKET_PROPERTIES.items()
            if prop in res.get("Properties", {})
        }
    )
    applied = [
        f"{len(unsupported[t])} {t}" + (" (Allow statements)" if t == "AWS::S3::BucketPolicy" else "")
        for t in sorted(_APPLIED_TYPES & set(unsupported))
    ]
    if labels:
        applied.append(f"bucket {', '.join(labels)}")
    left = {t: ids for t, ids in sorted(unsupported.items()) if t not in _APPLIED_TYPES}
    skipped += [logical for ids in left.values() for logical in ids]
    note = [f"the Deny statements of {partly} bucket policies"] if partly else []
    note += [f"{len(ids)} {t}" for t, ids in left.items()]
    return Skipped(applied, skipped, ", ".join(note))


def _complete_task_definition(region: str, arn: str, props: dict[str, Any]) -> None:
    """moto's CloudFormation registers a task definition with its containers only: give it
    the roles (RunTask passes them; ECS gives the task role's credentials to the task) and
    its network mode (awsvpc: each task gets a network interface of its own)."""
    from moto.ecs.models import ecs_backends

    account = arn.split(":")[4]
    definition = ecs_backends[account][region].describe_task_definition(arn)
    definition.task_role_arn = str(props.get("TaskRoleArn", ""))
    definition.execution_role_arn = str(props.get("ExecutionRoleArn", ""))
    definition.network_mode = str(props.get("NetworkMode", definition.network_mode))


def resource_policies(cfn: dict[str, Any], resolver: Resolver) -> dict[str, dict[str, Any]]:
    """Every bucket, queue and key policy of the stack, whole and resolved, by resource ARN."""
    out: dict[str, dict[str, Any]] = {}
    for logical, res in cfn["Resources"].items():
        props = res.get("Properties", {})
        if res["Type"] == "AWS::S3::BucketPolicy":
            out[f"arn:aws:s3:::{resolver.resolve(props['Bucket'])}"] = resolver.resolve(
                props["PolicyDocument"]
            )
        elif res["Type"] == "AWS::SQS::QueuePolicy":
            for url in resolver.resolve(props["Queues"]):
                arn = f"arn:aws:sqs:{resolver.aws.region}:{resolver.account}:{url.rsplit('/', 1)[-1]}"
                out[arn] = resolver.resolve(props["PolicyDocument"])
        elif res["Type"] == "AWS::KMS::Key":
            out[resolver.get_att(logical, "Arn")] = resolver.resolve(props["KeyPolicy"])
    return out


# The template's user policies, by the persona the embedded stack runs under them.
PERSONAS = {
    "producer": ("ProducerPolicyArn",),
    "reader": ("ReaderPolicyArn",),
    "operator": ("ReaderPolicyArn", "OperatorPolicyArn"),
}


def persona_roles(aws: Aws, stack_name: str, outputs: dict[str, str]) -> dict[str, str]:
    """A role per persona with exactly the template's policies for it attached, as an
    administrator would attach them (named outside the stack's role-name prefix, which the
    key policy reserves for the stack's own roles); role ARN by persona."""
    iam = aws.client("iam")
    account = aws.client("sts").get_caller_identity()["Account"]
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
                "Action": "sts:AssumeRole",
            }
        ],
    }
    roles = {}
    for persona, policies in PERSONAS.items():
        name = f"local-{stack_name}-{persona}"
        role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
        for output in policies:
            iam.attach_role_policy(RoleName=name, PolicyArn=outputs[output])
        roles[persona] = str(role)
    return roles


def assume(aws: Aws, role_arn: str, session: str) -> dict[str, str]:
    """A role's temporary credentials from the endpoint's STS, as Lambda and ECS take them."""
    return assume_role(aws, role_arn, session)


# ---- the dispatcher (Lambda's SQS event source mapping) -------------------------------------


@dataclass
class FakeContext:
    """The parts of Lambda's context object the handler uses."""

    function_name: str
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = ""
    function_version: str = "$LATEST"
    log_group_name: str = ""
    log_stream_name: str = ""
    remaining_ms: int = 60_000  # the dispatcher has no deadline; tests set one

    def get_remaining_time_in_millis(self) -> int:
        """Lambda's remaining-time call."""
        return self.remaining_ms


def load_handler(env: dict[str, str]) -> ModuleType:
    """Import functions/ingest/app.py after putting the function's environment in place."""
    os.environ.update(env)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("s3rollup_ingest_app", HANDLER_DIR / "app.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Background(abc.ABC):
    """A loop (``run``, until ``_stop`` is set) in a daemon thread of its own."""

    thread_name = "s3rollup"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @abc.abstractmethod
    def run(self) -> None:
        """The loop: each subclass's own (Dispatcher, NoncurrentExpiry)."""

    def start(self) -> None:
        """Run in a background thread."""
        self._thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and wait for it."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)


class Dispatcher(_Background):
    """Polls the ingest queue and invokes the handler as Lambda's SQS integration would."""

    thread_name = "s3rollup-dispatcher"

    def __init__(
        self, info: StackInfo, aws: Aws, reconcile_every: float = 5.0, log_level: str | None = None
    ) -> None:
        super().__init__()
        self.info, self.aws = info, aws
        self.reconcile_every = reconcile_every
        env = dict(info.function_env)
        if log_level:
            env["POWERTOOLS_LOG_LEVEL"] = log_level
        env.update(
            POWERTOOLS_TRACE_DISABLED="true",
            POWERTOOLS_METRICS_DISABLED="true",
            AWS_ENDPOINT_URL=info.endpoint_url,
            AWS_REGION=info.region,
            AWS_DEFAULT_REGION=info.region,
        )
        for k, v in LOCAL_CREDENTIALS.items():
            env.setdefault(k, os.environ.get(k, v))
        self.env = env
        # The function's execution role: the event source mapping polls the queue with it,
        # and the handler's clients use it, as Lambda gives a function its role's keys.
        self.function_aws = Aws(
            info.region,
            info.endpoint_url,
            credentials=assume(aws, info.function_role_arn, info.outputs["IngestFunctionName"]),
        )
        self.app = self.container()
        self.queue_url = self.aws.client("sqs").get_queue_url(
            QueueName=info.outputs["IngestQueueUrl"].rsplit("/", 1)[-1]
        )["QueueUrl"]
        self._reconciler: threading.Thread | None = None
        self.invocations = 0
        self.failures = 0

    def container(self) -> ModuleType:
        """The handler as a new Lambda container loads it: its own globals, the function's
        environment, the execution role's credentials."""
        app = load_handler(self.env)
        app.service(self.function_aws)
        return app

    def event_for(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """The SQS event Lambda passes for a batch of messages."""
        return records(
            [
                sqs_record(
                    m["Body"],
                    queue_arn=self.info.queue_arn,
                    region=self.info.region,
                    message_id=m["MessageId"],
                    receipt_handle=m["ReceiptHandle"],
                    attributes=m.get("Attributes", {}),
                    message_attributes=m.get("MessageAttributes", {}),
                    md5_of_body=m.get("MD5OfBody", ""),
                )
                for m in messages
            ]
        )

    def poll_once(self, wait_seconds: int = 1) -> int:
        """Receive one batch, invoke the handler, delete what succeeded; return messages seen."""
        sqs = self.function_aws.client("sqs")
        messages = sqs.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=min(10, self.info.batch_size),
            WaitTimeSeconds=wait_seconds,
            AttributeNames=["All"],
        ).get("Messages", [])
        if not messages:
            return 0
        self.invocations += 1
        try:
            response = self.app.handler(
                self.event_for(messages), FakeContext(self.info.outputs["IngestFunctionName"])
            )
            failed = {f["itemIdentifier"] for f in (response or {}).get("batchItemFailures", [])}
        except Exception as exc:  # the whole batch failed: every message returns to the queue
            log.error("handler failed for a whole batch", extra={"error": type(exc).__name__})
            failed = {m["MessageId"] for m in messages}
        self.failures += len(failed)
        done = [m for m in messages if m["MessageId"] not in failed]
        for i in range(0, len(done), 10):
            sqs.delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[
                    {"Id": str(j), "ReceiptHandle": m["ReceiptHandle"]}
                    for j, m in enumerate(done[i : i + 10])
                ],
            )
        return len(messages)

    def reconcile(self) -> list[str]:
        """Find parts whose events never came, in every dataset (as the scheduled function
        does on AWS); return the datasets whose reconcile failed (each one is logged)."""
        return self.app.service().reconcile_all(actor="local:reconcile")

    def run(self) -> None:
        """Poll until stopped; every few seconds start a reconcile on a thread of its own,
        as the schedule invokes the function apart from its queue's batches: a pass over a
        large dataset takes seconds here, which events must not wait behind."""
        last = time.monotonic()
        while not self._stop.is_set():
            try:
                self.poll_once()
                idle = self._reconciler is None or not self._reconciler.is_alive()
                if self.reconcile_every and idle and time.monotonic() - last > self.reconcile_every:
                    self._reconciler = threading.Thread(
                        target=self._reconcile_logged, name="s3rollup-reconcile", daemon=True
                    )
                    self._reconciler.start()
                    last = time.monotonic()
            except Exception as exc:  # keep serving: one bad poll must not stop ingestion
                log.error("dispatcher poll failed", extra={"error": type(exc).__name__})
                time.sleep(0.5)

    def _reconcile_logged(self) -> None:
        try:
            self.reconcile()
        except Exception as exc:  # the next run tries again; each dataset's failure is logged
            log.error("reconcile failed", extra={"error": type(exc).__name__})

    def stop(self) -> None:
        """Stop polling and wait for local workers."""
        super().stop()
        if self._reconciler:
            self._reconciler.join(timeout=60)
        launcher = getattr(self.app.service(), "launcher", None)
        if launcher is not None and hasattr(launcher, "wait"):
            launcher.wait(timeout=60)


_DYNAMODB_LOCK = threading.RLock()


def serialize_dynamodb() -> None:
    """Make the embedded DynamoDB apply one request at a time, as DynamoDB's transactions are
    serializable. moto's backend is not thread-safe: concurrent TransactWriteItems corrupt
    its tables (HTTP 500, retried by botocore) and writes that both "succeeded" are lost."""
    from moto.dynamodb.responses import DynamoHandler

    if getattr(DynamoHandler.call_action, "_s3rollup_serialized", False):
        return
    original = DynamoHandler.call_action

    def call_action(self: Any) -> Any:
        with _DYNAMODB_LOCK:
            return original(self)

    call_action._s3rollup_serialized = True  # type: ignore[attr-defined]
    DynamoHandler.call_action = call_action  # type: ignore[method-assign]


_QUERY = threading.local()


def partition_queries() -> None:
    """Make the embedded DynamoDB's Query read only the partition it names, from its start.

    moto's Query takes every item of the table (all partition keys), keeps those of the
    partition, sorts them with Python-level comparisons and then skips to the page's start,
    for each page: at 20,000 parts one registry page took about 3 s on this machine (so a
    reconcile pass of ten took half a minute, in the dispatcher's thread), and every
    `State.parts` or audit read paid it too. Here a Query on a table's own key (no index,
    ascending) hands moto only that partition's items, sorted by the sort key's value
    (UTF-8 order for strings, as DynamoDB), starting after the ExclusiveStartKey or the key
    condition's `>`/`>=` bound, and (when every item from there matches the condition) no
    more than the page needs. moto then pages, filters and projects them as before.
    """
    from moto.dynamodb.models.table import Table

    if getattr(Table.query, "_s3rollup_partition", False):
        return
    original_query, original_all_items = Table.query, Table.all_items

    def all_items(self: Any) -> Any:
        if getattr(_QUERY, "table", None) is self:
            return _QUERY.rows
        return original_all_items(self)

    def query(
        self: Any,
        hash_key: Any,
        range_comparison: Any,
        range_objs: Any,
        limit: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        exclusive_start_key, scan_index_forward = args[0], args[1]
        index_name = args[3] if len(args) > 3 else kwargs.get("index_name")
        legacy = set(kwargs) - {
            "index_name",
            "consistent_read",
            "filter_expression",
            "hash_key_conditions",
            "range_key_conditions",
        }
        rows = None
        if (
            hash_key is not None
            and index_name is None
            and self.range_key_attr
            and scan_index_forward is not False
        ):
            rows = _partition_rows(
                self, hash_key, range_comparison, range_objs, limit, exclusive_start_key, not legacy
            )
        if rows is None:
            return original_query(self, hash_key, range_comparison, range_objs, limit, *args, **kwargs)
        _QUERY.table, _QUERY.rows = self, rows
        try:
            return original_query(self, hash_key, range_comparison, range_objs, limit, *args, **kwargs)
        finally:
            _QUERY.table = _QUERY.rows = None

    query._s3rollup_partition = True  # type: ignore[attr-defined]
    Table.query = query  # type: ignore[method-assign]
    Table.all_items = all_items  # type: ignore[method-assign]


def _partition_rows(
    table: Any,
    hash_key: Any,
    comparison: str | None,
    values: list[Any],
    limit: int | None,
    start_key: Any,
    plain: bool,
) -> list[Any] | None:
    """The items of one partition a Query page can return, in sort key order (None: let moto
    take every item, as for a sort key that is neither a string nor a number)."""
    import bisect

    from moto.dynamodb.models.dynamo_type import DynamoType

    part = table.items.get(hash_key)
    if not part:
        return []
    if any(r.type not in ("S", "N") for r in part) or any(v.type not in ("S", "N") for v in values):
        return None
    ranges = sorted(part, key=lambda r: r.cast_value)
    values_sorted = [r.cast_value for r in ranges]
    start, exact = 0, plain
    if start_key:
        start = bisect.bisect_right(values_sorted, DynamoType(start_key[table.range_key_attr]).cast_value)
    if comparison in (">", "GT"):
        start = max(start, bisect.bisect_right(values_sorted, values[0].cast_value))
    elif comparison in (">=", "GE"):
        start = max(start, bisect.bisect_left(values_sorted, values[0].cast_value))
    elif comparison is not None:
        exact = False
    # moto reads one item past a full page to say there is more.
    stop = start + limit + 1 if limit and exact else None
    return [part[r] for r in ranges[start:stop]]


_TRANSACTION = threading.local()


def light_transactions() -> None:
    """Make the embedded DynamoDB's TransactWriteItems cost what it touches, not its tables.

    To roll a failed transaction back, moto deep-copies every table the transaction names
    before it starts, whatever their size: each registry or audit write copied every item of
    both tables, so a write's time grew with the parts and records stored (and, with moto's
    instance tracker, its memory too). Here only the items the transaction names are saved
    (one copy each) and put back if it fails; the tables themselves are not copied. Requests
    are serialised (serialize_dynamodb), so nothing else changes those items meanwhile.
    """
    import moto.dynamodb.models as ddb_models

    if isinstance(ddb_models.copy, _TransactionCopy):
        return
    original = ddb_models.DynamoDBBackend.transact_write_items

    def transact_write_items(self: Any, transact_items: list[dict[str, Any]]) -> Any:
        saved = _touched_items(self, transact_items)
        _TRANSACTION.active = True
        try:
            return original(self, transact_items)
        except Exception:
            for table, hash_key, range_key, item in saved:
                _put_back(table, hash_key, range_key, item)
            raise
        finally:
            _TRANSACTION.active = False

    ddb_models.DynamoDBBackend.transact_write_items = transact_write_items  # type: ignore[method-assign]
    ddb_models.copy = _TransactionCopy(ddb_models.copy, ddb_models.Table)  # type: ignore[assignment]


def _touched_items(backend: Any, transact_items: list[dict[str, Any]]) -> list[tuple[Any, Any, Any, Any]]:
    """(table, hash key, range key, a copy of the item or None) for each item a transaction
    names (moto itself reports unknown tables and malformed keys)."""
    import copy

    from moto.dynamodb.models.dynamo_type import DynamoType

    saved = []
    for entry in transact_items:
        try:
            _, op = next(iter(entry.items()))
            table = backend.get_table(op["TableName"])
            key = op["Item"] if "Item" in op else op["Key"]
            hash_key = DynamoType(key[table.hash_key_attr])
            range_key = DynamoType(key[table.range_key_attr]) if table.range_key_attr else None
            item = table.get_item(hash_key, range_key)
        except Exception:  # noqa: S112 - moto refuses the transaction and says why
            continue
        saved.append((table, hash_key, range_key, copy.deepcopy(item)))
    return saved


def _put_back(table: Any, hash_key: Any, range_key: Any, item: Any) -> None:
    """Restore one item as it was before a failed transaction (None: it did not exist)."""
    if range_key is None:
        if item is None:
            table.items.pop(hash_key, None)
        else:
            table.items[hash_key] = item
        return
    if item is not None:
        table.items[hash_key][range_key] = item
        return
    partition = table.items.get(hash_key)
    if partition is not None:
        partition.pop(range_key, None)
        if not partition:
            del table.items[hash_key]


class _TransactionCopy:
    """moto.dynamodb.models' ``copy`` module, but a table is not copied inside a transaction
    (light_transactions)."""

    def __init__(self, module: Any, table_class: type) -> None:
        self._module, self._table_class = module, table_class

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def deepcopy(self, obj: Any, memo: Any = None) -> Any:
        if getattr(_TRANSACTION, "active", False) and isinstance(obj, self._table_class):
            return obj  # the rollback copy: the items touched are saved instead
        return self._module.deepcopy(obj, memo)


_LISTING = threading.local()


def light_version_listings() -> None:
    """Make the embedded S3's ListObjectVersions copy no object bytes.

    moto's copies every version of every key in the bucket (``copy.deepcopy``: bytes and
    all, whatever the prefix asked for) to mark the latest ones, and its instance tracker
    keeps each copy for the life of the process. Every job lists its dataset's versions, so
    the embedded stack's memory grew with parts x listings, and each listing's time with the
    bytes in the bucket. Here a listing's copies are shallow: each shares its version's
    attributes and bytes (read-only: a listing reads names, versions, ETags, sizes and
    dates), is not tracked, and never closes the version's buffer when it is collected.
    """
    import moto.s3.models as s3_models

    if isinstance(s3_models.copy, _ListingCopy):
        return
    original = s3_models.S3Backend.list_object_versions

    def list_object_versions(self: Any, *args: Any, **kwargs: Any) -> Any:
        _LISTING.active = True
        try:
            return original(self, *args, **kwargs)
        finally:
            _LISTING.active = False

    s3_models.S3Backend.list_object_versions = list_object_versions  # type: ignore[method-assign]
    s3_models.copy = _ListingCopy(s3_models.copy, s3_models.FakeKey)  # type: ignore[assignment]


class _ListingCopy:
    """moto.s3.models' ``copy`` module, but for a version listing (light_version_listings)."""

    def __init__(self, module: Any, key_class: Any) -> None:
        self._module, self._key_class = module, key_class
        self._listed: dict[type, type] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def deepcopy(self, obj: Any, memo: Any = None) -> Any:
        if not getattr(_LISTING, "active", False) or not isinstance(obj, list):
            return self._module.deepcopy(obj, memo)
        return [self._listed_copy(version) for version in obj]

    def _listed_copy(self, version: Any) -> Any:
        if isinstance(version, self._key_class) and version._etag is None:
            with version.lock:  # computed once, on the version, as a GET would
                version.etag  # noqa: B018
        cls = self._listed.get(type(version))
        if cls is None:
            # object.__new__ skips moto's instance tracker; no __del__: the bytes are the
            # version's, not the copy's.
            cls = type(f"Listed{type(version).__name__}", (type(version),), {"__del__": lambda self: None})
            self._listed[type(version)] = cls
        listed: Any = object.__new__(cls)
        listed.__dict__.update(version.__dict__)
        return listed


def untrack_moto_instances() -> None:
    """Make moto forget the model instances it made once nothing else holds them.

    moto appends every instance of its models (each S3 object version and every copy of one,
    each DynamoDB item, each SQS message, ...) to a per-class list for the life of the
    process, used only to reset its backends, which the embedded stack never does: its
    memory grew with every request that created an object, deleted or not. Here instances
    are not tracked; an S3 version no bucket holds any more closes its buffer when collected.
    """
    from moto.core.common_models import BaseModel
    from moto.s3.models import FakeKey

    if getattr(BaseModel.__new__, "_s3rollup_untracked", False):
        return

    def new(cls: type, *args: Any, **kwargs: Any) -> Any:
        return super(BaseModel, cls).__new__(cls)  # type: ignore[misc]

    new._s3rollup_untracked = True  # type: ignore[attr-defined]
    BaseModel.__new__ = staticmethod(new)  # type: ignore[method-assign]
    for cls in _model_classes(BaseModel):
        cls.instances_tracked.clear()  # type: ignore[attr-defined]
    # Collected, not leaked: dispose without moto's "not disposed of in time" warning.
    FakeKey.__del__ = lambda self: self.dispose()  # type: ignore[method-assign]


_UNCOUNTED = threading.local()  # set while moto sends or receives (count_queues_when_asked)


def count_queues_when_asked() -> None:
    """Let moto's SQS count a queue's messages only when a request asks for the counts.

    moto computes a queue's ApproximateNumberOfMessages (and ...Delayed, ...NotVisible) by
    walking every message in it, and builds all three whenever anything reads the queue's
    attributes: on every SendMessage (each S3 notification), for a setting it reads there,
    and on ReceiveMessage for every message it considers, for the retention period. Neither
    uses the counts. With thousands of notifications queued, every send and receive cost
    grew with the backlog: a bulk upload's parts were published at a few a second. Here the
    counts are not computed inside a send or a receive; GetQueueAttributes computes them
    exactly, as before.
    """
    from moto.sqs.models import Queue, SQSBackend

    if getattr(SQSBackend.send_message, "_s3rollup_uncounted", False):
        return

    def uncounted(method: Any) -> Any:
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            outer = getattr(_UNCOUNTED, "active", False)
            _UNCOUNTED.active = True
            try:
                return method(self, *args, **kwargs)
            finally:
                _UNCOUNTED.active = outer

        run._s3rollup_uncounted = True  # type: ignore[attr-defined]
        return run

    def counted(count: Any) -> property:
        def get(self: Any) -> int:
            return 0 if getattr(_UNCOUNTED, "active", False) else int(count(self))

        return property(get)

    for name in (
        "approximate_number_of_messages",
        "approximate_number_of_messages_delayed",
        "approximate_number_of_messages_not_visible",
    ):
        setattr(Queue, name, counted(getattr(Queue, name).fget))
    SQSBackend.send_message = uncounted(SQSBackend.send_message)  # type: ignore[method-assign]
    SQSBackend.receive_message = uncounted(SQSBackend.receive_message)  # type: ignore[method-assign]


def list_moto_modules_once() -> None:
    """Let moto's server list its own package once, not on every request.

    To route a request, moto's server asks whether the host names one of its service
    packages, and answers by listing its package directory (about 150 stat calls) on every
    request: a tenth of the endpoint's time under load. The directory does not change while
    the process runs.
    """
    from moto import backends

    if getattr(backends.list_of_moto_modules, "_s3rollup_once", False):
        return
    modules = tuple(backends.list_of_moto_modules())

    def listed() -> tuple[str, ...]:
        return modules

    listed._s3rollup_once = True  # type: ignore[attr-defined]
    backends.list_of_moto_modules = listed


def _model_classes(base: type) -> list[type]:
    out, todo = [], [base]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in out if "instances_tracked" in c.__dict__]


class NoncurrentExpiry(_Background):
    """Runs the buckets' NoncurrentVersionExpiration lifecycle rules, which moto keeps but
    never runs, with a day scaled to ``day_seconds``.

    Every publish writes new versions of a dataset's manifest, partials and results, and
    every replaced part leaves its old version: on AWS the rule removes each version
    NoncurrentDays after it stopped being current; here it is removed NoncurrentDays x
    ``day_seconds`` after that, so an embedded stack that runs for days holds the versions of
    a bounded window rather than every version ever written. A removed version disappears as
    S3's lifecycle removes it: from listings and GETs of its version id. Current versions are
    never removed (the rules for current objects, transitions and delete markers are not run).
    """

    thread_name = "s3rollup-lifecycle"

    def __init__(self, day_seconds: float) -> None:
        super().__init__()
        self.day_seconds = day_seconds
        self.removed = 0

    def sweep(self) -> int:
        """Remove the noncurrent versions whose time is up in every bucket; return how many."""
        import datetime

        from moto.core.utils import utcnow
        from moto.s3.models import s3_backends

        from .local_iam import ACCOUNT

        removed = 0
        now = utcnow()
        for bucket in list(s3_backends[ACCOUNT]["aws"].buckets.values()):
            rules = [
                (
                    r.filter.prefix
                    if r.filter is not None and r.filter.prefix is not None
                    else r.prefix or "",
                    float(r.nve_noncurrent_days),
                )
                for r in bucket.rules
                if r.status == "Enabled" and r.nve_noncurrent_days is not None
            ]
            if not rules:
                continue
            for name in list(bucket.keys.keys()):
                days = [d for prefix, d in rules if name.startswith(prefix)]
                versions = bucket.keys.getlist(name) or []
                if not days or len(versions) < 2:
                    continue
                cutoff = now - datetime.timedelta(seconds=min(days) * self.day_seconds)
                # A version became noncurrent when the next one was written; the last is current.
                expired = [v for v, nxt in itertools.pairwise(list(versions)) if nxt.last_modified < cutoff]
                for version in expired:
                    # In place on moto's own list: a concurrent write appends to the same list.
                    with contextlib.suppress(ValueError):
                        versions.remove(version)
                removed += len(expired)
        self.removed += removed
        return removed

    def run(self) -> None:
        """Sweep until stopped, a few times per scaled day (at most once a second)."""
        while not self._stop.wait(min(60.0, max(1.0, self.day_seconds / 4))):
            try:
                self.sweep()
            except Exception as exc:  # keep sweeping: one bad pass must not stop the bound
                log.error("noncurrent version expiry failed", extra={"error": type(exc).__name__})


def enforcing_moto_server(policies: Any, ip_address: str, port: int) -> Any:
    """moto's threaded server, with every request authorized by local_iam first."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    from .local_iam import Enforcer

    class _Server(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = Enforcer(DomainDispatcherApplication(create_backend_app), policies)
            self._server = make_server(
                self._ip_address, self._port, app, True, request_handler=MotoRequestHandler
            )
            self._server_ready_event.set()
            self._server.serve_forever()

    return _Server(ip_address=ip_address, port=port, verbose=False)


_TASK_RUNNERS: dict[str, TaskRunner] = {}  # by cluster ARN


def run_ecs_tasks() -> None:
    """Make the embedded ECS hand the tasks of each cluster whose stack has a runner
    (EmbeddedStack(run_tasks=True)) to that runner: RunTask starts them, DescribeTasks
    reports their state, StopTask stops them. moto itself only records the tasks."""
    from moto.ecs.models import EC2ContainerServiceBackend as Backend

    if getattr(Backend.run_task, "_s3rollup_runs", False):
        return
    run_task, describe_tasks, stop_task = Backend.run_task, Backend.describe_tasks, Backend.stop_task

    def run(self: Any, cluster: str, taskdef: str, count: int, overrides: Any, *a: Any, **k: Any) -> Any:
        tasks = run_task(self, cluster, taskdef, count, overrides, *a, **k)
        for task in tasks:
            runner = _TASK_RUNNERS.get(task.cluster_arn)
            if runner is not None:
                runner.run(self, task)
        return tasks

    def describe(self: Any, cluster: str, tasks: list[str]) -> Any:
        found = describe_tasks(self, cluster, tasks)
        for task in found:
            runner = _TASK_RUNNERS.get(task.cluster_arn)
            if runner is not None:
                runner.dask.refresh(task)
        return found

    def stop(self: Any, cluster: str, task: str, reason: str) -> Any:
        stopped = stop_task(self, cluster, task, reason)
        runner = _TASK_RUNNERS.get(stopped.cluster_arn)
        if runner is not None:
            runner.dask.stop(stopped.task_arn)
        return stopped

    run._s3rollup_runs = True  # type: ignore[attr-defined]
    Backend.run_task = run  # type: ignore[method-assign,assignment]
    Backend.describe_tasks = describe  # type: ignore[method-assign,assignment]
    Backend.stop_task = stop  # type: ignore[method-assign,assignment]


# The containers of the Dask task definitions (template.yaml), by the names
# dask-cloudprovider overrides.
DASK_CONTAINERS = ("dask-scheduler", "dask-worker")


class DaskTasks:
    """Plays Fargate for the Dask scheduler and worker task definitions of one stack.

    RunTask of either starts its container's entry point and the request's command as a
    process here, with the task definition's environment, the request's and the task role's
    credentials (none for a definition without one). Fargate gives each task a network
    interface of its own: here each task gets a loopback address of its own (127.x.y.z,
    which the embedded EC2 reports as the interface's private IP), and the process listens
    there only (``--host``). DescribeTasks says RUNNING while the process lives, STOPPED once
    it has ended; StopTask ends it (SIGTERM, then SIGKILL).
    """

    def __init__(self, endpoint_url: str, region: str, agent: Aws) -> None:
        self.endpoint_url, self.region, self.agent = endpoint_url, region, agent
        self.processes: dict[str, Any] = {}  # task ARN -> subprocess.Popen
        self.addresses: dict[str, str] = {}  # task ARN -> its loopback address
        # Containers whose next task never comes up (as when its image cannot be pulled).
        self.fail_next: set[str] = set()
        self._lock = threading.Lock()

    @staticmethod
    def container(definition: Any) -> dict[str, Any] | None:
        """The Dask container of a task definition, or None for any other definition."""
        containers = definition.container_definitions
        if len(containers) == 1 and containers[0].get("name") in DASK_CONTAINERS:
            return dict(containers[0])
        return None

    def start(self, backend: Any, task: Any, container: dict[str, Any], role: str) -> None:
        """Start the task's process (in RunTask's request: DescribeTasks sees it at once)."""
        import subprocess

        task._transitions = []  # moto's own lifecycle would report it STOPPED at once
        address = self._address()
        if address is None:  # as a task whose network interface cannot be set up
            self._stopped(task, "ResourceInitializationError: the Dask ports are taken", None)
            return
        self._give_address(backend, task, address)
        name = container["name"]
        if name in self.fail_next:
            self.fail_next.discard(name)
            self._stopped(task, "CannotPullContainerError: the image could not be pulled", None)
            return
        override: dict[str, Any] = next(
            (o for o in task.overrides.get("containerOverrides", []) if o.get("name") == name), {}
        )
        command = [
            *container.get("entryPoint", []),
            *(override.get("command") or container.get("command", [])),
        ]
        if command and command[0] == "python":
            command[0] = sys.executable  # the image's python: this environment's
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({e["name"]: str(e["value"]) for e in container.get("environment", [])})
        env.update({e["name"]: str(e["value"]) for e in override.get("environment", [])})
        if role:
            env.update(credentials_env(assume_role(self.agent, role, f"ecs-{task.id}")))
        env.update(AWS_ENDPOINT_URL=self.endpoint_url, AWS_REGION=self.region, AWS_DEFAULT_REGION=self.region)
        proc = subprocess.Popen(
            [*command, "--host", address], env=env, stdin=subprocess.DEVNULL, start_new_session=True
        )
        with self._lock:
            self.processes[task.task_arn] = proc
            self.addresses[task.task_arn] = address
        task.status = "RUNNING"
        log.info("dask task started", extra={"container": name, "pid": proc.pid, "address": address})

    def refresh(self, task: Any) -> None:
        """Report a task whose process has ended as STOPPED, with its exit code."""
        proc = self.processes.get(task.task_arn)
        if proc is not None and task.status == "RUNNING" and proc.poll() is not None:
            self._stopped(task, "Essential container in task exited", proc.returncode)

    def stop(self, task_arn: str) -> None:
        """End a task's process (StopTask): SIGTERM, SIGKILL after 10 s."""
        import subprocess

        proc = self.processes.get(task_arn)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def running(self) -> list[str]:
        """ARNs of the tasks whose process still runs."""
        with self._lock:
            return [arn for arn, proc in self.processes.items() if proc.poll() is None]

    def stop_all(self) -> None:
        """End every task's process (the stack is going away)."""
        for arn in list(self.processes):
            self.stop(arn)

    @staticmethod
    def _stopped(task: Any, reason: str, exit_code: int | None) -> None:
        task.status = task.desired_status = "STOPPED"
        task.stopped_reason = reason
        for container in task.containers:
            container.exit_code = exit_code

    @staticmethod
    def _give_address(backend: Any, task: Any, address: str) -> None:
        from moto.ec2.models import ec2_backends

        for attachment in task.attachments:
            details = {d["name"]: d for d in attachment["details"]}
            eni = ec2_backends[backend.account_id][backend.region_name].get_network_interface(
                details["networkInterfaceId"]["value"]
            )
            eni.private_ip_address = address
            eni.private_ip_addresses = [{"Primary": True, "PrivateIpAddress": address}]
            details["privateIPv4Address"]["value"] = address

    def _address(self) -> str | None:
        """A loopback address no other task here uses, where the Dask ports are free; None
        when none is found within 30 s (a process on this machine listening on every
        interface at those ports takes them on every loopback address)."""
        import random
        import socket

        from .job import SCHEDULER_PORT, WORKER_PORT

        deadline = time.monotonic() + 30
        while True:
            address = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
            try:
                for port in (SCHEDULER_PORT, WORKER_PORT):
                    with socket.socket() as sock:
                        sock.bind((address, port))
            except OSError:
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.2)
                continue
            if address not in self.addresses.values():
                return address


class TaskRunner:
    """Plays Fargate for one stack: a RunTask of its worker task definition starts the worker
    as a process on this machine (LocalLauncher), with the task definition's environment,
    the request's overrides and this stack's endpoint; the Dask task definitions' tasks are
    DaskTasks'."""

    def __init__(self, info: StackInfo, aws: Aws) -> None:
        from .config import Settings
        from .launch import LocalLauncher

        self.settings = Settings.from_env(info.function_env)
        env = {
            "AWS_ENDPOINT_URL": info.endpoint_url,
            "AWS_REGION": info.region,
            "AWS_DEFAULT_REGION": info.region,
        }
        # The launcher gives each worker the task role's credentials, as ECS does.
        self.launcher = LocalLauncher(self.settings, aws.client("ecs"), extra_env=env, agent=aws)
        self.dask = DaskTasks(info.endpoint_url, info.region, aws)
        # RunTask may tag its tasks when the long task ARN format is on, as it is by default
        # on AWS (dask-cloudprovider asks ListAccountSettings; moto has no default).
        aws.client("ecs").put_account_setting(name="taskLongArnFormat", value="enabled")
        self.started: deque[str] = deque(maxlen=1000)  # the latest job ids started

    def run(self, backend: Any, task: Any) -> None:
        """Run a task RunTask created: a Dask member, or the job its overrides name."""
        definition = backend.describe_task_definition(task.task_definition_arn)
        container = self.dask.container(definition)
        if container is not None:
            self.dask.start(backend, task, container, str(definition.task_role_arn or ""))
            return
        overrides = {
            e["name"]: str(e["value"])
            for container in task.overrides.get("containerOverrides", [])
            for e in container.get("environment", [])
        }
        # Off the request's thread: the worker starts in the background.
        threading.Thread(target=self, args=(overrides,), name="s3rollup-task", daemon=True).start()

    def __call__(self, overrides: dict[str, str]) -> None:
        """Run the job RunTask asked for (its overrides name the dataset and job)."""
        dataset, job_id = overrides.get("S3ROLLUP_DATASET"), overrides.get("S3ROLLUP_JOB_ID")
        if not (dataset and job_id):
            log.error("RunTask without a dataset and job id: no worker started")
            return
        self.started.append(job_id)
        self.launcher.launch(dataset, job_id)

    def register(self) -> None:
        """Receive the RunTask requests of this stack's cluster."""
        run_ecs_tasks()
        _TASK_RUNNERS[self.settings.ecs_cluster] = self

    def stop(self, timeout: float = 60) -> None:
        """Receive no more requests; wait for the workers started; end the Dask tasks."""
        _TASK_RUNNERS.pop(self.settings.ecs_cluster, None)
        self.launcher.wait(timeout=timeout)
        self.dask.stop_all()


class EmbeddedStack:
    """moto server + provisioned stack + dispatcher, as one context manager."""

    def __init__(
        self,
        port: int = 0,
        stack_name: str = "s3rollup",
        region: str = "us-east-1",
        dispatch: bool = True,
        reconcile_every: float = 5.0,
        log_level: str | None = None,
        host: str = "127.0.0.1",
        run_tasks: bool = True,
        reconcile_grace: int | None = None,
        lifecycle_day_seconds: float = LIFECYCLE_DAY_SECONDS,
    ) -> None:
        """``reconcile_grace`` deploys the stack with that ReconcileGraceSeconds (tests that
        drop an event and reconcile at once use 0); None keeps the template's default."""
        self.port, self.stack_name, self.region = port, stack_name, region
        self.reconcile_grace = reconcile_grace
        # The buckets' noncurrent-version expiration runs with a day this long (NoncurrentExpiry).
        self.expiry = NoncurrentExpiry(lifecycle_day_seconds)
        self.dispatch, self.reconcile_every, self.log_level = dispatch, reconcile_every, log_level
        self.host, self.run_tasks = check_listen_address(host), run_tasks
        self.server: Any = None
        self.info: StackInfo | None = None
        self.dispatcher: Dispatcher | None = None
        self.tasks: TaskRunner | None = None
        self.aws: Aws | None = None
        self._saved_env: dict[str, str | None] = {}

    def __enter__(self) -> EmbeddedStack:
        from . import local_iam

        # moto reports each resource type its CloudFormation skips, and werkzeug each
        # request: the skipped ones are applied by _apply_skipped, the requests are noise.
        warnings.filterwarnings("ignore", message=".*not supported by moto's CloudFormation.*")
        # Metrics are off locally (no CloudWatch); powertools warns about that on every batch.
        warnings.filterwarnings("ignore", message="No application metrics to publish")
        logging.getLogger("werkzeug").setLevel(logging.ERROR)

        serialize_dynamodb()
        partition_queries()
        light_transactions()
        light_version_listings()
        untrack_moto_instances()
        list_moto_modules_once()
        count_queues_when_asked()
        local_objects.seal_object_bytes()
        local_objects.batch_access_logs()
        local_objects.index_key_names()
        # Loopback, or the Docker bridge's gateway: the embedded endpoint is for this machine
        # and its containers (check_listen_address).
        self.policies = local_iam.Policies(self.region)
        self.server = enforcing_moto_server(self.policies, ip_address=self.host, port=self.port)
        self.server.start()
        host, port = self.server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        names = [*LOCAL_CREDENTIALS, "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"]
        self._saved_env = {k: os.environ.get(k) for k in names}
        for k, v in LOCAL_CREDENTIALS.items():
            os.environ.setdefault(k, v)
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        os.environ["AWS_REGION"] = os.environ["AWS_DEFAULT_REGION"] = self.region
        self.aws = Aws(self.region, endpoint)
        overrides = (
            {} if self.reconcile_grace is None else {"ReconcileGraceSeconds": str(self.reconcile_grace)}
        )
        self.info = provision(self.aws, self.stack_name, policies=self.policies, parameters=overrides)
        self.expiry.start()
        if self.run_tasks:
            self.tasks = TaskRunner(self.info, self.aws)
            self.tasks.register()
        if self.dispatch:
            self.dispatcher = Dispatcher(self.info, self.aws, self.reconcile_every, self.log_level)
            self.dispatcher.start()
        return self

    def credentials(self, persona: str) -> dict[str, str]:
        """Environment variables that make a process a producer, reader or operator."""
        assert self.aws and self.info
        return credentials_env(assume(self.aws, self.info.persona_roles[persona], f"local-{persona}"))

    def aws_as(self, role_arn: str) -> Aws:
        """Clients of this stack's endpoint with a role's credentials (assumed at its STS)."""
        assert self.aws and self.info
        creds = assume(self.aws, role_arn, role_arn.rsplit("/", 1)[-1])
        return Aws(self.region, self.info.endpoint_url, credentials=creds)

    def __exit__(self, *exc: object) -> None:
        if self.dispatcher:
            self.dispatcher.stop()
        if self.tasks:
            self.tasks.stop()
        self.expiry.stop()
        if self.server:
            self.server.stop()
        # The process's environment as it was: another stack may still be serving it.
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
