"""template.yaml: what a security reviewer checks that the linters do not."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from typing import Any

import pytest

from s3rollup.contract import CONTRACTS, INCOMING, PARTIALS, QUARANTINE, RESULTS
from s3rollup.local import ROOT, load_template

TEMPLATE = load_template()
RESOURCES: dict[str, Any] = TEMPLATE["Resources"]
KEY_ARN = {"Fn::GetAtt": ["DataKey", "Arn"]}


def _of_type(kind: str) -> dict[str, Any]:
    return {k: v["Properties"] for k, v in RESOURCES.items() if v["Type"] == kind}


def _identity_statements() -> list[tuple[str, dict[str, Any]]]:
    """Every statement of every identity policy: inline role policies and SAM Policies."""
    out = []
    for name, props in _of_type("AWS::IAM::Role").items():
        for policy in props.get("Policies", []):
            out += [(name, s) for s in policy["PolicyDocument"]["Statement"]]
    for name, props in _of_type("AWS::Serverless::Function").items():
        for policy in props.get("Policies", []):
            assert isinstance(policy, dict), f"{name}: only inline policy documents are allowed"
            out += [(name, s) for s in policy["Statement"]]
    return out


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# Actions that support no resource-level permission, so Resource "*" is their only form:
# ECR's login token (the execution role needs it to pull the worker image), X-Ray's trace
# and telemetry uploads (the function's active tracing), and the two reads of a task
# cluster's start (the task ARN format, the tasks' network interfaces).
UNSCOPABLE_ACTIONS = {
    "ecr:GetAuthorizationToken",
    "xray:PutTraceSegments",
    "xray:PutTelemetryRecords",
    "ecs:ListAccountSettings",
    "ec2:DescribeNetworkInterfaces",
}


def test_no_identity_policy_grants_a_wildcard_action_or_resource() -> None:
    statements = _identity_statements()
    assert len(statements) >= 10
    for owner, st in statements:
        for action in _as_list(st["Action"]):
            assert action != "*" and not action.endswith(":*"), f"{owner}: {action}"
        if "*" in _as_list(st["Resource"]):
            # Only a statement made of unscopable actions alone may name "*".
            assert set(_as_list(st["Action"])) <= UNSCOPABLE_ACTIONS, (
                f"{owner}: {st.get('Sid')} has Resource '*'"
            )


def test_no_role_or_function_attaches_a_managed_policy() -> None:
    # Managed policies grant on every resource of a kind (the ECS task execution policy: every
    # repository and log group); each role here carries an inline policy scoped to the stack.
    for name, props in _of_type("AWS::IAM::Role").items():
        assert "ManagedPolicyArns" not in props, f"{name}: {props['ManagedPolicyArns']}"
        assert props.get("Policies"), f"{name} has no inline policy"
    roles = _of_type("AWS::IAM::Role")
    for name, props in _of_type("AWS::Serverless::Function").items():
        # A role of this template, whose inline policies the checks here read: left to SAM,
        # the function would get a generated role with managed policies on Resource "*"
        # (AWSLambdaBasicExecutionRole, AWSLambdaSQSQueueExecutionRole, AWSXrayWriteOnlyAccess).
        role = props["Role"]["Fn::GetAtt"]
        assert role[1] == "Arn" and role[0] in roles, f"{name}: a role defined elsewhere escapes these checks"
        assert "Policies" not in props, f"{name}: statements belong in {role[0]}"
    assert not {"Policies", "Role"} & set(TEMPLATE.get("Globals", {}).get("Function", {}))


def test_the_function_role_is_assumed_by_lambda_and_scoped() -> None:
    role = _of_type("AWS::IAM::Role")["IngestFunctionRole"]
    (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "lambda.amazonaws.com"}
    # No source condition Lambda is not documented to meet: it would stop the function.
    assert "Condition" not in trust
    (policy,) = role["Policies"]
    by_sid = {s["Sid"]: s for s in policy["PolicyDocument"]["Statement"]}
    consume = by_sid["ConsumeTheIngestQueue"]
    assert consume["Resource"] == {"Fn::GetAtt": ["IngestQueue", "Arn"]}
    assert set(consume["Action"]) == {
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:GetQueueAttributes",
        "sqs:ChangeMessageVisibility",
    }
    assert "${IngestLogGroup}:log-stream:" in by_sid["WriteTheFunctionLogs"]["Resource"]["Fn::Sub"]
    tag = by_sid["TagTheTasksItRuns"]
    assert tag["Resource"]["Fn::Sub"].endswith(":task/${WorkerCluster}/*")
    assert tag["Condition"] == {"StringEquals": {"ecs:CreateAction": "RunTask"}}
    # Metrics go out as embedded metric format in the log, not through PutMetricData.
    actions = {a for st in by_sid.values() for a in _as_list(st["Action"])}
    assert not [a for a in actions if a.startswith(("cloudwatch:", "logs:CreateLogGroup"))]


@pytest.mark.parametrize(
    "name", ["WorkerExecutionRole", "WorkerTaskRole", "DaskTaskRole", "DaskSchedulerRole"]
)
def test_ecs_assumes_the_worker_roles_only_for_tasks_of_this_account(name: str) -> None:
    # The trust the ECS Developer Guide recommends against the confused deputy ("Task IAM
    # role"); aws:SourceArn cannot name one cluster, so it covers the account's tasks here.
    (trust,) = _of_type("AWS::IAM::Role")[name]["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "ecs-tasks.amazonaws.com"}
    assert trust["Condition"] == {
        "ArnLike": {
            "aws:SourceArn": {"Fn::Sub": "arn:${AWS::Partition}:ecs:${AWS::Region}:${AWS::AccountId}:*"}
        },
        "StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}},
    }


def test_the_execution_role_pulls_only_the_worker_repository_and_writes_only_its_logs() -> None:
    (policy,) = _of_type("AWS::IAM::Role")["WorkerExecutionRole"]["Policies"]
    by_sid = {s["Sid"]: s for s in policy["PolicyDocument"]["Statement"]}
    assert set(by_sid) == {"PullTheWorkerImage", "EcrLogin", "WriteTheWorkerLogs", "WriteTheDaskLogs"}
    pull = by_sid["PullTheWorkerImage"]["Resource"]["Fn::Sub"]
    assert pull[0].endswith(":repository/${Repository}")
    assert "WorkerImageUri" in json.dumps(pull[1])
    assert "${WorkerLogGroup}:log-stream:" in by_sid["WriteTheWorkerLogs"]["Resource"]["Fn::Sub"]
    assert "${DaskLogGroup}:log-stream:dask/" in by_sid["WriteTheDaskLogs"]["Resource"]["Fn::Sub"]


CRYPTO_ACTIONS = ("kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:ReEncrypt")


def test_the_key_policy_separates_administration_from_narrowed_use() -> None:
    # In a key policy, Resource "*" means "this key"; everywhere else it is refused above.
    key = _of_type("AWS::KMS::Key")["DataKey"]
    assert key["EnableKeyRotation"] is True
    statements = {s["Sid"]: s for s in key["KeyPolicy"]["Statement"]}
    admin = statements.pop("AccountAdministers")
    assert not [a for a in admin["Action"] if a.startswith(CRYPTO_ACTIONS)], "administration only"
    assert "Condition" not in admin
    for sid, st in statements.items():
        # Every use is conditioned: on the service it goes through, the encryption context,
        # or the calling resource; never the bare account.
        assert st["Effect"] == "Allow" and st.get("Condition"), sid
        assert "kms:*" not in _as_list(st["Action"]), sid
        conditions = {k for ops in st["Condition"].values() for k in ops}
        assert {"kms:ViaService", "aws:SourceArn"} & conditions or any(
            c.startswith("kms:EncryptionContext:") for c in conditions
        ), sid
        # The key policy never names the stack's roles (their policies name the key: a cycle).
        assert "WorkerTaskRole" not in json.dumps(st) and "IngestFunctionRole" not in json.dumps(st), sid
    roles = statements["StackRolesUseThroughServices"]["Condition"]
    assert roles["ArnLike"]["aws:PrincipalArn"] == {
        "Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:role/${AWS::StackName}-*"
    }
    logs = statements["CloudWatchLogs"]["Condition"]["ArnLike"]["kms:EncryptionContext:aws:logs:arn"]
    assert logs["Fn::Sub"].endswith(":log-group:/s3rollup/${AWS::StackName}/*")


def test_only_an_aws_service_can_obtain_a_grant_on_the_key() -> None:
    # kms:CreateGrant lets its holder hand out use of the key, itself included: never part of
    # administration, and only for the tables DynamoDB encrypts under the key.
    key = _of_type("AWS::KMS::Key")["DataKey"]
    statements = {s["Sid"]: s for s in key["KeyPolicy"]["Statement"]}
    admin = statements["AccountAdministers"]["Action"]
    assert not [a for a in admin if "*" in a or a == "kms:CreateGrant"], admin
    granting = [s for s in statements.values() if "kms:CreateGrant" in _as_list(s["Action"])]
    assert [s["Sid"] for s in granting] == ["GrantsOnlyForTheTables"]
    (grants,) = granting
    assert _as_list(grants["Action"]) == ["kms:CreateGrant"]
    assert grants["Condition"]["Bool"] == {"kms:GrantIsForAWSResource": "true"}
    assert grants["Condition"]["StringEquals"] == {
        "kms:ViaService": {"Fn::Sub": "dynamodb.${AWS::Region}.amazonaws.com"}
    }


def test_s3_uses_the_key_only_for_the_ingest_queue() -> None:
    # S3 documents its key-policy statement without source conditions (its validation event
    # included); SQS names the queue in the encryption context, so that is the scope.
    key = _of_type("AWS::KMS::Key")["DataKey"]
    (st,) = [s for s in key["KeyPolicy"]["Statement"] if s["Principal"] == {"Service": "s3.amazonaws.com"}]
    queue_arn = "arn:${AWS::Partition}:sqs:${AWS::Region}:${AWS::AccountId}:${AWS::StackName}-ingest"
    assert st["Condition"] == {"StringEquals": {"kms:EncryptionContext:aws:sqs:arn": {"Fn::Sub": queue_arn}}}
    queue = _of_type("AWS::SQS::Queue")["IngestQueue"]
    assert queue["QueueName"] == {"Fn::Sub": "${AWS::StackName}-ingest"}


def test_the_worker_task_is_hardened() -> None:
    td = _of_type("AWS::ECS::TaskDefinition")["WorkerTaskDefinition"]
    assert td["RequiresCompatibilities"] == ["FARGATE"] and td["NetworkMode"] == "awsvpc"
    assert td["TaskRoleArn"] != td["ExecutionRoleArn"]
    (container,) = td["ContainerDefinitions"]
    assert container["ReadonlyRootFilesystem"] is True
    assert not str(container["User"]).startswith("0")
    assert container["LogConfiguration"]["LogDriver"] == "awslogs"
    assert any(m["ContainerPath"] == "/tmp" for m in container["MountPoints"])
    cluster = _of_type("AWS::ECS::Cluster")["WorkerCluster"]
    assert {"Name": "containerInsights", "Value": "enabled"} in cluster["ClusterSettings"]


DASK_DEFINITIONS = {
    "DaskSchedulerTaskDefinition": "dask-scheduler",
    "DaskWorkerTaskDefinition": "dask-worker",
}


@pytest.mark.parametrize("name", DASK_DEFINITIONS)
def test_the_dask_tasks_are_hardened_and_named_as_dask_cloudprovider_overrides_them(name: str) -> None:
    td = _of_type("AWS::ECS::TaskDefinition")[name]
    assert td["RequiresCompatibilities"] == ["FARGATE"] and td["NetworkMode"] == "awsvpc"
    assert td["ExecutionRoleArn"] == {"Fn::GetAtt": ["WorkerExecutionRole", "Arn"]}
    # The scheduler holds no data: its role only opens the cluster's TLS; the workers read
    # parts as DaskTaskRole.
    role = "DaskTaskRole" if name == "DaskWorkerTaskDefinition" else "DaskSchedulerRole"
    assert td["TaskRoleArn"] == {"Fn::GetAtt": [role, "Arn"]}
    (container,) = td["ContainerDefinitions"]
    assert container["Name"] == DASK_DEFINITIONS[name]
    assert container["Image"] == {"Ref": "WorkerImageUri"}
    assert container["EntryPoint"] == ["python", "-m", "s3rollup.member"]
    assert container["ReadonlyRootFilesystem"] is True
    assert not str(container["User"]).startswith("0")
    assert any(m["ContainerPath"] == "/tmp" for m in container["MountPoints"])
    logs = container["LogConfiguration"]
    assert logs["LogDriver"] == "awslogs" and logs["Options"]["awslogs-group"] == {"Ref": "DaskLogGroup"}
    assert [p["ContainerPort"] for p in container["PortMappings"]] == [
        8786 if name == "DaskSchedulerTaskDefinition" else 8787
    ]


def test_the_dask_ports_are_open_only_within_the_worker_group() -> None:
    for name in ("WorkerSecurityGroupDaskIngress", "WorkerSecurityGroupDaskEgress"):
        rule = RESOURCES[name]["Properties"]
        peer = rule.get("SourceSecurityGroupId") or rule.get("DestinationSecurityGroupId")
        assert peer == {"Ref": "WorkerSecurityGroup"} and (rule["FromPort"], rule["ToPort"]) == (8786, 8787)
        assert "CidrIp" not in rule


def test_the_job_role_may_run_watch_and_stop_only_the_dask_tasks_and_create_nothing() -> None:
    (policy,) = _of_type("AWS::IAM::Role")["WorkerTaskRole"]["Policies"]
    by_sid = {s["Sid"]: s for s in policy["PolicyDocument"]["Statement"]}
    in_cluster = {"ArnEquals": {"ecs:cluster": {"Fn::GetAtt": ["WorkerCluster", "Arn"]}}}
    run = by_sid["RunTheDaskTasks"]
    assert run["Action"] == "ecs:RunTask" and run["Condition"] == in_cluster
    assert run["Resource"] == [{"Ref": d} for d in DASK_DEFINITIONS]
    watch = by_sid["WatchAndStopTheDaskTasks"]
    assert set(watch["Action"]) == {"ecs:DescribeTasks", "ecs:StopTask"} and watch["Condition"] == in_cluster
    assert watch["Resource"]["Fn::Sub"].endswith(":task/${WorkerCluster}/*")
    passing = by_sid["PassOnlyTheDaskRoles"]
    assert passing["Resource"] == [
        {"Fn::GetAtt": ["DaskSchedulerRole", "Arn"]},
        {"Fn::GetAtt": ["DaskTaskRole", "Arn"]},
        {"Fn::GetAtt": ["WorkerExecutionRole", "Arn"]},
    ]
    assert passing["Condition"] == {"StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}}
    actions = {a for st in by_sid.values() for a in _as_list(st["Action"])}
    never = ("Create", "Register", "Delete", "Deregister", "Authorize", "Attach", "PutRetention")
    assert not [
        a
        for a in actions
        if a.split(":")[0] in ("ecs", "iam", "ec2", "logs") and a.split(":")[1].startswith(never)
    ]


# The encryption context of a Dask cluster's sealed TLS (s3rollup.member.tls_context), and
# only called directly (kms:ViaService absent): what every statement allowing it requires.
SEALED_TLS = {
    "StringEquals": {"kms:EncryptionContext:s3rollup:purpose": "dask-cluster-tls"},
    "Null": {"kms:ViaService": "true"},
}
THROUGH_SERVICES = {"Null": {"kms:ViaService": "false"}}
KEY = {"Fn::GetAtt": ["DataKey", "Arn"]}


def _statements(role: str) -> dict[str, dict[str, Any]]:
    (policy,) = _of_type("AWS::IAM::Role")[role]["Policies"]
    return {s["Sid"]: s for s in policy["PolicyDocument"]["Statement"]}


def test_the_dask_workers_read_parts_write_partials_and_open_the_cluster_tls_only() -> None:
    by_sid = _statements("DaskTaskRole")
    granted = {(a, json.dumps(st["Resource"])) for st in by_sid.values() for a in _as_list(st["Action"])}
    assert {a for a, _ in granted} == {
        "s3:GetObject",
        "s3:GetObjectVersion",
        "s3:PutObject",
        "kms:Decrypt",
        "kms:GenerateDataKey",
    }
    for action, resource in granted:
        if action.startswith("s3:Get"):
            assert resource.endswith('/incoming/*"}'), resource
        elif action == "s3:PutObject":
            assert resource.endswith('/partials/*"}'), resource
    # The key through S3 only (parts and partials), and directly only for the cluster's TLS.
    through_s3 = by_sid["UseTheDataKeyThroughS3"]
    assert through_s3["Resource"] == KEY
    assert through_s3["Condition"] == {
        "StringEquals": {"kms:ViaService": {"Fn::Sub": "s3.${AWS::Region}.amazonaws.com"}}
    }
    tls = by_sid["OpenTheDaskClusterTls"]
    assert (tls["Action"], tls["Resource"], tls["Condition"]) == ("kms:Decrypt", KEY, SEALED_TLS)
    kms = [st for st in by_sid.values() if any(a.startswith("kms:") for a in _as_list(st["Action"]))]
    assert len(kms) == 2


def test_the_dask_scheduler_may_only_open_the_cluster_tls() -> None:
    by_sid = _statements("DaskSchedulerRole")
    assert list(by_sid) == ["OpenTheDaskClusterTls"]
    tls = by_sid["OpenTheDaskClusterTls"]
    assert (tls["Effect"], tls["Action"], tls["Resource"], tls["Condition"]) == (
        "Allow",
        "kms:Decrypt",
        KEY,
        SEALED_TLS,
    )


def test_only_the_job_seals_the_cluster_tls_and_only_the_dask_roles_open_it() -> None:
    # The job encrypts, under the purpose's context only, and never decrypts directly.
    job = _statements("WorkerTaskRole")
    seal = job["SealTheDaskClusterTls"]
    assert (seal["Action"], seal["Resource"], seal["Condition"]) == ("kms:Encrypt", KEY, SEALED_TLS)
    # The function and the job use the key through services only: no direct Decrypt.
    function = {
        s["Sid"]: s
        for s in _of_type("AWS::IAM::Role")["IngestFunctionRole"]["Policies"][0]["PolicyDocument"][
            "Statement"
        ]
    }
    for by_sid in (job, function):
        assert by_sid["UseTheDataKey"]["Condition"] == THROUGH_SERVICES
    direct = {
        (role, a)
        for role in ("IngestFunctionRole", "WorkerTaskRole", "DaskTaskRole", "DaskSchedulerRole")
        for st in _statements(role).values()
        for a in _as_list(st["Action"])
        if a.startswith("kms:")
        and st.get("Condition", {}).get("Null") != {"kms:ViaService": "false"}
        and "kms:ViaService" not in st.get("Condition", {}).get("StringEquals", {})
    }
    assert direct == {
        ("WorkerTaskRole", "kms:Encrypt"),
        ("DaskTaskRole", "kms:Decrypt"),
        ("DaskSchedulerRole", "kms:Decrypt"),
    }
    # and the key policy allows that direct use to the stack's roles, under that purpose only
    key = _of_type("AWS::KMS::Key")["DataKey"]
    statements = {s["Sid"]: s for s in key["KeyPolicy"]["Statement"]}
    sealing = statements["StackRolesSealDaskClusterTls"]
    assert sorted(sealing["Action"]) == ["kms:Decrypt", "kms:Encrypt"]
    assert sealing["Condition"] == {
        "ArnLike": {
            "aws:PrincipalArn": {
                "Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:role/${AWS::StackName}-*"
            }
        },
        **SEALED_TLS,
    }
    # and no other statement allows kms:Encrypt to a principal of the account
    encrypting = [
        sid
        for sid, st in statements.items()
        if "AWS" in st["Principal"] and any(a.startswith("kms:Encrypt") for a in _as_list(st["Action"]))
    ]
    assert encrypting == ["StackRolesSealDaskClusterTls"]
    # and, from private subnets, the KMS endpoint lets the job's Encrypt through
    (endpoint,) = RESOURCES["KmsEndpoint"]["Properties"]["PolicyDocument"]["Statement"]
    assert "kms:Encrypt" in endpoint["Action"] and endpoint["Resource"] == KEY


def test_the_job_gets_the_task_cluster_settings_from_the_parameters() -> None:
    (container,) = _of_type("AWS::ECS::TaskDefinition")["WorkerTaskDefinition"]["ContainerDefinitions"]
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env["S3ROLLUP_FARGATE_THRESHOLD_BYTES"] == {"Ref": "DaskThresholdBytes"}
    assert env["S3ROLLUP_FARGATE_WORKERS"] == {"Ref": "DaskWorkers"}
    assert env["S3ROLLUP_FARGATE_WORKER_CPU"] == {"Ref": "DaskWorkerCpu"}
    assert env["S3ROLLUP_FARGATE_WORKER_MEM"] == {"Ref": "DaskWorkerMemory"}
    assert env["S3ROLLUP_FARGATE_SPOT"] == {"Ref": "DaskFargateSpot"}
    assert env["S3ROLLUP_FARGATE_SCHEDULER_TASK_DEFINITION"] == {"Ref": "DaskSchedulerTaskDefinition"}
    assert env["S3ROLLUP_FARGATE_WORKER_TASK_DEFINITION"] == {"Ref": "DaskWorkerTaskDefinition"}
    threshold = TEMPLATE["Parameters"]["DaskThresholdBytes"]
    assert threshold["MinValue"] == 0 and threshold["Default"] == 10 << 30  # docs/DESIGN.md
    cluster = _of_type("AWS::ECS::Cluster")["WorkerCluster"]
    assert cluster["CapacityProviders"] == ["FARGATE", "FARGATE_SPOT"]


def test_only_incoming_triggers_and_nothing_the_pipeline_writes_is_under_it() -> None:
    bucket = _of_type("AWS::S3::Bucket")["DataBucket"]
    configs = bucket["NotificationConfiguration"]["QueueConfigurations"]
    prefixes = {r["Value"] for c in configs for r in c["Filter"]["S3Key"]["Rules"] if r["Name"] == "prefix"}
    assert prefixes == {INCOMING}
    for written in (QUARANTINE, PARTIALS, RESULTS, CONTRACTS):
        assert not written.startswith(INCOMING) and not INCOMING.startswith(written)


ACCESS_LOG_BUCKET = "AccessLogBucket"


@pytest.mark.parametrize("name", sorted(_of_type("AWS::S3::Bucket")))
def test_every_bucket_is_encrypted_private_versioned_and_tls_only(name: str) -> None:
    props = _of_type("AWS::S3::Bucket")[name]
    (rule,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    if name == ACCESS_LOG_BUCKET:
        # S3 server access logging supports only SSE-S3 default encryption on its destination.
        assert rule["ServerSideEncryptionByDefault"] == {"SSEAlgorithm": "AES256"}
    else:
        assert rule["ServerSideEncryptionByDefault"] == {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": KEY_ARN}
        assert props["LoggingConfiguration"]["DestinationBucketName"] == {"Ref": ACCESS_LOG_BUCKET}
    assert all(props["PublicAccessBlockConfiguration"].values())
    assert len(props["PublicAccessBlockConfiguration"]) == 4
    assert props["OwnershipControls"]["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    assert props["VersioningConfiguration"]["Status"] == "Enabled"
    (policy,) = [p for p in _of_type("AWS::S3::BucketPolicy").values() if p["Bucket"] == {"Ref": name}]
    deny = next(s for s in policy["PolicyDocument"]["Statement"] if s["Sid"] == "DenyInsecureTransport")
    assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_data_and_its_key_outlive_the_stack_but_not_a_failed_first_deploy() -> None:
    # Kept on stack deletion and replacement; deleted when the create that made them rolls
    # back, so a retry finds no fixed-name bucket "already exists". The key goes with the
    # data it protects: a retained bucket or table is unreadable once its key is deleted.
    kept = [n for n, r in RESOURCES.items() if r["Type"] in ("AWS::S3::Bucket", "AWS::DynamoDB::Table")]
    assert len(kept) == 5
    for name in [*kept, "DataKey"]:
        assert RESOURCES[name]["DeletionPolicy"] == "RetainExceptOnCreate", name
        assert RESOURCES[name]["UpdateReplacePolicy"] == "Retain", name


def _condition_holds(operator: str, key: str, expected: Any, request: dict[str, str]) -> bool:
    """One condition of a statement, as IAM evaluates it, for a request's condition keys.

    A key absent from the request makes a condition false, except that a negated operator
    (StringNotEquals) or an ...IfExists one is then true (IAM User Guide, "Condition
    operators"); Null tests presence alone.
    """
    wanted = {json.dumps(v, sort_keys=True) for v in _as_list(expected)}
    value = request.get(key)
    negated = operator.startswith(("StringNot", "ArnNot"))
    if operator == "Null":
        return (value is None) == (wanted == {json.dumps("true")})
    if value is None:
        return negated or operator.endswith("IfExists")
    return (json.dumps(value, sort_keys=True) in wanted) != negated


def _bucket_policy_denies_put(bucket: str, request: dict[str, Any]) -> bool:
    """Whether a Deny statement of the bucket's policy refuses an s3:PutObject request."""
    (policy,) = [p for p in _of_type("AWS::S3::BucketPolicy").values() if p["Bucket"] == {"Ref": bucket}]
    denies = [
        st
        for st in policy["PolicyDocument"]["Statement"]
        if st["Effect"] == "Deny" and {"s3:PutObject", "s3:*"} & set(_as_list(st["Action"]))
    ]
    return any(
        all(
            _condition_holds(op, key, expected, request)
            for op, keys in st.get("Condition", {}).items()
            for key, expected in keys.items()
        )
        for st in denies
    )


SSE = "s3:x-amz-server-side-encryption"


@pytest.mark.parametrize(
    ("headers", "denied"),
    [
        ({}, False),  # `aws s3 cp` without encryption options: the bucket default applies
        ({SSE: "aws:kms", f"{SSE}-aws-kms-key-id": KEY_ARN}, False),  # what s3rollup sends
        ({SSE: "AES256"}, True),
        ({SSE: "aws:kms"}, True),  # S3 would use the AWS managed key aws/s3
        ({SSE: "aws:kms", f"{SSE}-aws-kms-key-id": "arn:aws:kms:eu-west-1:111122223333:key/other"}, True),
        ({SSE: "aws:kms:dsse", f"{SSE}-aws-kms-key-id": KEY_ARN}, True),
        ({f"{SSE}-customer-algorithm": "AES256"}, True),
    ],
)
def test_the_data_bucket_takes_objects_under_the_stack_key_only(
    headers: dict[str, str], denied: bool
) -> None:
    request = {"aws:SecureTransport": "true", **headers}
    assert _bucket_policy_denies_put("DataBucket", request) is denied


def test_access_logs_go_to_their_own_bucket_and_only_the_logging_service_writes_them() -> None:
    log_bucket = _of_type("AWS::S3::Bucket")[ACCESS_LOG_BUCKET]
    assert "LoggingConfiguration" not in log_bucket and "ObjectLockEnabled" not in log_bucket
    assert any("ExpirationInDays" in r for r in log_bucket["LifecycleConfiguration"]["Rules"])
    (policy,) = [
        p for p in _of_type("AWS::S3::BucketPolicy").values() if p["Bucket"] == {"Ref": ACCESS_LOG_BUCKET}
    ]
    grants = [s for s in policy["PolicyDocument"]["Statement"] if s["Effect"] == "Allow"]
    sources = [p for p in _of_type("AWS::S3::Bucket").values() if "LoggingConfiguration" in p]
    assert len(grants) == len(sources) == 2
    prefixes = {p["LoggingConfiguration"]["LogFilePrefix"] for p in sources}
    for st in grants:
        assert st["Principal"] == {"Service": "logging.s3.amazonaws.com"} and st["Action"] == "s3:PutObject"
        assert st["Condition"]["StringEquals"] == {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
        assert "aws:SourceArn" in st["Condition"]["ArnEquals"]
        resource = st["Resource"]["Fn::Sub"]
        assert any(resource == f"${{{ACCESS_LOG_BUCKET}.Arn}}/{p}*" for p in prefixes), resource


def _rules_under(rules: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """The lifecycle rules that apply to some key under prefix."""
    out = []
    for rule in rules:
        p = rule.get("Prefix", rule.get("Filter", {}).get("Prefix", ""))
        if prefix.startswith(p) or p.startswith(prefix):
            out.append(rule)
    return out


def test_lifecycle_never_expires_a_current_raw_part() -> None:
    # Each job reconciles against the listing of incoming/: an expired current version would
    # silently leave the statistics. Raw parts only change storage class.
    rules = _of_type("AWS::S3::Bucket")["DataBucket"]["LifecycleConfiguration"]["Rules"]
    under_incoming = _rules_under(rules, INCOMING)
    assert under_incoming
    for rule in under_incoming:
        assert not {"ExpirationInDays", "ExpirationDate"} & set(rule), rule["Id"]
    tiering = [t for r in under_incoming for t in r.get("Transitions", [])]
    assert tiering == [
        {"StorageClass": "INTELLIGENT_TIERING", "TransitionInDays": {"Ref": "RawPartsTieringDays"}}
    ]
    assert any(r.get("NoncurrentVersionExpiration") for r in under_incoming)
    assert any(r.get("AbortIncompleteMultipartUpload") for r in under_incoming)
    quarantine = [r for r in _rules_under(rules, QUARANTINE) if "ExpirationInDays" in r]
    assert [r["ExpirationInDays"] for r in quarantine] == [{"Ref": "QuarantineDays"}]


def _rule_value(node: Any, params: dict[str, str]) -> Any:
    """Evaluate the rule functions the template uses against parameter values."""
    if not isinstance(node, dict):
        return [_rule_value(n, params) for n in node] if isinstance(node, list) else node
    ((fn, arg),) = node.items()
    args = _rule_value(arg, params)
    functions = {
        "Ref": lambda: params[arg],
        "Fn::Equals": lambda: str(args[0]) == str(args[1]),
        "Fn::Contains": lambda: str(args[1]) in [str(v) for v in args[0]],
        "Fn::Not": lambda: not args[0],
        "Fn::And": lambda: all(args),
        "Fn::Or": lambda: any(args),
    }
    return functions[fn]()


def _rules_accept(params: dict[str, str]) -> bool:
    """Whether CloudFormation's Rules would let a stack be created with these parameters."""
    declared = TEMPLATE["Parameters"]
    values: dict[str, Any] = {k: str(v["Default"]) for k, v in declared.items() if "Default" in v} | params
    for name, value in values.items():
        if declared[name]["Type"] == "CommaDelimitedList" or declared[name]["Type"].startswith("List<"):
            values[name] = value.split(",")
    for rule in TEMPLATE.get("Rules", {}).values():
        if "RuleCondition" in rule and not _rule_value(rule["RuleCondition"], values):
            continue
        if not all(_rule_value(a["Assert"], values) for a in rule["Assertions"]):
            return False
    return True


# The Fargate task sizes, from the ECS Developer Guide ("Task CPU and memory"): CPU units ->
# the memory range in MiB and its step.
FARGATE_MEMORY = {
    1024: (2048, 8192, 1024),
    2048: (4096, 16384, 1024),
    4096: (8192, 30720, 1024),
    8192: (16384, 61440, 4096),
    16384: (32768, 122880, 8192),
}


def test_only_task_sizes_fargate_offers_pass_the_template_rules() -> None:
    cpus = TEMPLATE["Parameters"]["WorkerCpu"]["AllowedValues"]
    assert sorted(int(c) for c in cpus) == sorted(FARGATE_MEMORY)
    for cpu in cpus:
        low, high, step = FARGATE_MEMORY[int(cpu)]
        for memory in range(512, 131072 + 1, 512):
            offered = low <= memory <= high and (memory - low) % step == 0
            accepted = _rules_accept({"WorkerCpu": cpu, "WorkerMemory": str(memory)})
            assert accepted == offered, (cpu, memory)
    assert _rules_accept({})  # the defaults are a size Fargate offers


ENDPOINT_SERVICES = {
    "Gateway": {"s3", "dynamodb"},
    "Interface": {"ecr.api", "ecr.dkr", "logs", "kms", "sts", "ecs", "ec2"},
}


def test_vpc_endpoints_come_only_with_the_parameter_and_admit_only_the_workers() -> None:
    # Off by default (the subnets then need NAT); on, every service the tasks call from
    # private subnets without a public IP: image pull, logs, data, key, credentials.
    assert TEMPLATE["Parameters"]["CreateVpcEndpoints"]["Default"] == "false"
    assert TEMPLATE["Conditions"]["WithVpcEndpoints"] == {
        "Fn::Equals": [{"Ref": "CreateVpcEndpoints"}, "true"]
    }
    endpoints = {n: r for n, r in RESOURCES.items() if r["Type"] == "AWS::EC2::VPCEndpoint"}
    services: dict[str, set[str]] = {"Gateway": set(), "Interface": set()}
    for name, res in endpoints.items():
        props = res["Properties"]
        assert res["Condition"] == "WithVpcEndpoints", name
        prefix = "com.amazonaws.${AWS::Region}."
        assert props["ServiceName"]["Fn::Sub"].startswith(prefix), name
        services[props["VpcEndpointType"]].add(props["ServiceName"]["Fn::Sub"].removeprefix(prefix))
        if props["VpcEndpointType"] == "Gateway":
            assert props["RouteTableIds"] == {"Ref": "PrivateRouteTableIds"}, name
        else:
            assert props["PrivateDnsEnabled"] is True and props["SubnetIds"] == {"Ref": "PrivateSubnetIds"}
            assert props["SecurityGroupIds"] == [{"Ref": "VpcEndpointSecurityGroup"}], name
        if "PolicyDocument" in props:  # a perimeter: never every action on every resource
            for st in props["PolicyDocument"]["Statement"]:
                assert not (st["Action"] in ("*", ["*"]) and st["Resource"] in ("*", ["*"])), name
    assert services == ENDPOINT_SERVICES
    group = RESOURCES["VpcEndpointSecurityGroup"]
    assert group["Condition"] == "WithVpcEndpoints"
    assert group["Properties"]["SecurityGroupIngress"] == [
        {
            "Description": "HTTPS from the worker tasks",
            "IpProtocol": "tcp",
            "FromPort": 443,
            "ToPort": 443,
            "SourceSecurityGroupId": {"Ref": "WorkerSecurityGroup"},
        }
    ]
    # The gateway endpoints need the subnets' route tables: refused before anything is made.
    assert not _rules_accept({"CreateVpcEndpoints": "true"})
    assert _rules_accept({"CreateVpcEndpoints": "true", "PrivateRouteTableIds": "rtb-1,rtb-2"})


def _event_matches(pattern: dict[str, Any], event: dict[str, Any]) -> bool:
    """EventBridge matching for the pattern forms the template uses ($or, anything-but)."""
    for field, wanted in pattern.items():
        if field == "$or":
            if not any(_event_matches(alternative, event) for alternative in wanted):
                return False
        elif isinstance(wanted, dict):
            values = _as_list(event.get(field, []))
            if not any(isinstance(v, dict) and _event_matches(wanted, v) for v in values):
                return False
        else:
            values = _as_list(event[field]) if field in event else []
            if not any(
                (v != rule["anything-but"])
                if isinstance(rule, dict) and "anything-but" in rule
                else v == rule
                for rule in wanted
                for v in values
            ):
                return False
    return True


# ECS's event for a worker task whose job exited with 1 (EventBridge, "ECS Task State Change";
# the cluster as the template names it). Not in events/: the function never receives it.
ECS_TASK_STOPPED: dict[str, Any] = {
    "source": "aws.ecs",
    "detail-type": "ECS Task State Change",
    "detail": {
        "clusterArn": {"Fn::GetAtt": ["WorkerCluster", "Arn"]},
        "launchType": "FARGATE",
        "group": "family:s3rollup-worker",
        "startedBy": "s3rollup-ingest",
        "desiredStatus": "STOPPED",
        "lastStatus": "STOPPED",
        "stopCode": "EssentialContainerExited",
        "stoppedReason": "Essential container in task exited",
        "containers": [{"name": "worker", "lastStatus": "STOPPED", "exitCode": 1}],
    },
}


TASK_DEFINITION_FAMILY = RESOURCES["WorkerTaskDefinition"]["Properties"]["Family"]


def test_a_worker_task_that_fails_or_never_starts_raises_the_alarm() -> None:
    # A task that never starts emits no metric, so ECS's own task event is the alarm.
    rule = _of_type("AWS::Events::Rule")["WorkerTaskFailedRule"]
    assert rule["Targets"] == [{"Id": "AlarmTopic", "Arn": {"Ref": "AlarmTopic"}}]
    pattern = json.loads(json.dumps(rule["EventPattern"]))
    assert pattern["detail"]["clusterArn"] == [{"Fn::GetAtt": ["WorkerCluster", "Arn"]}]
    # The job's task definition's family, as ECS names a RunTask's group (stack s3rollup).
    assert pattern["detail"]["group"] == [{"Fn::Sub": "family:${AWS::StackName}-worker"}]
    assert TASK_DEFINITION_FAMILY == {"Fn::Sub": "${AWS::StackName}-worker"}
    pattern["detail"]["group"] = ["family:s3rollup-worker"]
    failed = json.loads(json.dumps(ECS_TASK_STOPPED))
    assert _event_matches(pattern, failed)
    # A Dask task of a cluster round that stops is the job's to handle, not an alarm.
    dask_worker = json.loads(json.dumps(failed))
    dask_worker["detail"] |= {
        "group": "family:s3rollup-dask-worker",
        "containers": [{"name": "dask-worker", "exitCode": 137}],
    }
    assert not _event_matches(pattern, dask_worker)
    finished = json.loads(json.dumps(failed))
    finished["detail"]["containers"][0]["exitCode"] = 0
    assert not _event_matches(pattern, finished)
    never_started = json.loads(json.dumps(failed))
    never_started["detail"] |= {"stopCode": "TaskFailedToStart", "containers": [{"name": "worker"}]}
    assert _event_matches(pattern, never_started)
    other_cluster = json.loads(json.dumps(failed))
    other_cluster["detail"]["clusterArn"] = "arn:aws:ecs:us-east-1:123456789012:cluster/other"
    assert not _event_matches(pattern, other_cluster)
    # Only that rule (and the stack's alarms) may publish to the topic; the key lets
    # EventBridge encrypt for this topic alone: SNS supports no aws:SourceArn or
    # aws:SourceAccount in a key policy for EventBridge.
    (policy,) = _of_type("AWS::SNS::TopicPolicy").values()
    assert policy["Topics"] == [{"Ref": "AlarmTopic"}]
    publishers = {s["Principal"]["Service"]: s for s in policy["PolicyDocument"]["Statement"]}
    assert publishers["events.amazonaws.com"]["Condition"] == {
        "ArnEquals": {"aws:SourceArn": {"Fn::GetAtt": ["WorkerTaskFailedRule", "Arn"]}}
    }
    assert "aws:SourceArn" in publishers["cloudwatch.amazonaws.com"]["Condition"]["ArnLike"]
    key = _of_type("AWS::KMS::Key")["DataKey"]
    (events,) = [
        s for s in key["KeyPolicy"]["Statement"] if s["Principal"] == {"Service": "events.amazonaws.com"}
    ]
    topic_arn = "arn:${AWS::Partition}:sns:${AWS::Region}:${AWS::AccountId}:${AWS::StackName}-alarms"
    assert events["Condition"] == {
        "StringEquals": {"kms:EncryptionContext:aws:sns:topicArn": {"Fn::Sub": topic_arn}}
    }
    assert _of_type("AWS::SNS::Topic")["AlarmTopic"]["TopicName"] == {"Fn::Sub": "${AWS::StackName}-alarms"}


def test_the_worker_image_must_be_an_ecr_uri() -> None:
    pattern = re.compile(TEMPLATE["Parameters"]["WorkerImageUri"]["AllowedPattern"])
    assert pattern.match("123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/s3rollup-worker:1.2.0")
    assert pattern.match("123456789012.dkr.ecr.eu-west-1.amazonaws.com/w@sha256:" + "ab" * 32)
    for bad in ("python:3.12-slim", "docker.io/library/s3rollup:1", "123456789012.dkr.ecr.x.amazonaws.com/w"):
        assert not pattern.match(bad), bad


def test_every_checkov_skip_says_why() -> None:
    skips = [
        (name, skip)
        for name, res in RESOURCES.items()
        for skip in res.get("Metadata", {}).get("checkov", {}).get("skip", [])
    ]
    assert skips
    for name, skip in skips:
        assert re.fullmatch(r"CKV_AWS_\d+", skip["id"]) and len(skip.get("comment", "")) > 40, name


def test_every_table_queue_topic_and_log_group_uses_the_stack_key() -> None:
    for name, props in _of_type("AWS::DynamoDB::Table").items():
        assert props["SSESpecification"] == {
            "SSEEnabled": True,
            "SSEType": "KMS",
            "KMSMasterKeyId": KEY_ARN,
        }, name
        assert props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    for name, props in _of_type("AWS::SQS::Queue").items():
        assert props["KmsMasterKeyId"] == {"Ref": "DataKey"}, name
    for name, props in _of_type("AWS::SNS::Topic").items():
        assert props["KmsMasterKeyId"] == {"Ref": "DataKey"}, name
    for name, props in _of_type("AWS::Logs::LogGroup").items():
        assert props["KmsKeyId"] == KEY_ARN and props["RetentionInDays"], name


def test_the_ingest_queue_outlives_six_function_timeouts_and_redrives() -> None:
    queue = _of_type("AWS::SQS::Queue")["IngestQueue"]
    timeout = TEMPLATE["Globals"]["Function"]["Timeout"]
    assert queue["VisibilityTimeout"] >= 6 * timeout
    assert queue["RedrivePolicy"]["maxReceiveCount"] >= 1
    fn = _of_type("AWS::Serverless::Function")["IngestFunction"]
    assert fn["Events"]["Ingest"]["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert TEMPLATE["Globals"]["Function"]["Runtime"] == "python3.12"


def test_the_queue_caps_the_function_concurrency_without_reserving_any() -> None:
    # A reservation fails in accounts with a low concurrency limit; the event source's
    # maximum concurrency (2 to 1000) bounds the same fan-out without one.
    assert "ReservedConcurrentExecutions" not in TEMPLATE["Globals"]["Function"]
    for name, props in _of_type("AWS::Serverless::Function").items():
        assert "ReservedConcurrentExecutions" not in props, name
        for event in props["Events"].values():
            if event["Type"] == "SQS":
                assert 2 <= event["Properties"]["ScalingConfig"]["MaximumConcurrency"] <= 1000, name


def test_the_function_reconciles_every_dataset_on_a_schedule() -> None:
    fn = _of_type("AWS::Serverless::Function")["IngestFunction"]
    schedules = [e["Properties"] for e in fn["Events"].values() if e["Type"] == "Schedule"]
    assert schedules == [
        {
            "Schedule": {"Fn::Sub": "rate(${ReconcileMinutes} minutes)"},
            "Description": schedules[0]["Description"],
        }
    ]
    # rate(1 minutes) is not a valid expression: the plural needs at least 2.
    assert TEMPLATE["Parameters"]["ReconcileMinutes"]["MinValue"] >= 2
    sample = json.loads((ROOT / "events" / "scheduled-reconcile.json").read_text())
    assert (sample["source"], sample["detail-type"]) == ("aws.events", "Scheduled Event")


def _readme_deploy_overrides(env: str) -> dict[str, str]:
    """The --parameter-overrides of the README's `sam deploy --config-env <env>` command."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"sam deploy --config-env {env} ")]
    args = shlex.split(line)
    return dict(kv.split("=", 1) for kv in args[args.index("--parameter-overrides") + 1].split())


def test_the_prod_deploy_command_gives_every_parameter_without_a_default() -> None:
    # samconfig.toml cannot carry an account's VPC, subnets and image; the README's command
    # gives them, and since a command-line --parameter-overrides replaces the environment's
    # list (aws-sam-cli#2380), it must repeat prod's settings, value for value.
    config = tomllib.loads((ROOT / "samconfig.toml").read_text())
    deploy = config["prod"]["deploy"]["parameters"]
    prod = dict(kv.split("=", 1) for kv in deploy["parameter_overrides"].split())
    command = _readme_deploy_overrides("prod")
    required = {k for k, v in TEMPLATE["Parameters"].items() if "Default" not in v}
    assert required == {"VpcId", "PrivateSubnetIds", "WorkerImageUri"}
    assert required <= set(command) and not required & set(prod)
    assert {k: command[k] for k in prod} == prod
    assert set(command) <= set(TEMPLATE["Parameters"])
    assert re.compile(TEMPLATE["Parameters"]["WorkerImageUri"]["AllowedPattern"]).match(
        command["WorkerImageUri"]
    )
    assert _rules_accept(command)
    assert deploy["s3_prefix"] and deploy["resolve_s3"] is True


# The longest stack name s3rollup takes (README, "Deploying to AWS"; samconfig.toml).
MAX_STACK_NAME = 27


def test_a_stack_name_within_the_limit_keeps_every_generated_name_whole() -> None:
    # Stack names name the buckets, <stack>-anchors-<account>-<region>: S3 takes lower case
    # only and 63 characters, and region names run to 14 ("ap-southeast-3"). CloudFormation
    # names a role <stack>-<LogicalId>-<12 characters> and, past IAM's 64, shortens the stack
    # and logical parts to 25 characters each: the key policy's role/<stack>-* condition would
    # then match no role. Within the limit, neither happens.
    assert len(f"{'s' * MAX_STACK_NAME}-anchors-{'0' * 12}-{'x' * 14}") <= 63
    for logical, props in _of_type("AWS::IAM::Role").items():
        assert "RoleName" not in props, logical
        assert len(f"{'s' * MAX_STACK_NAME}-{logical}-{'X' * 12}") <= 64, logical
    config = tomllib.loads((ROOT / "samconfig.toml").read_text())
    for env in ("default", "prod"):
        name = config[env]["global"]["parameters"]["stack_name"]
        assert re.fullmatch(r"[a-z][a-z0-9-]*", name) and len(name) <= MAX_STACK_NAME, env
        # Every role's name is generated, so CAPABILITY_IAM is the one acknowledgement needed.
        assert config[env]["deploy"]["parameters"]["capabilities"] == "CAPABILITY_IAM", env


def test_samconfig_has_default_and_prod_overriding_only_template_parameters() -> None:
    config = tomllib.loads((ROOT / "samconfig.toml").read_text())
    assert {"default", "prod"} <= set(config)
    for env in ("default", "prod"):
        deploy = config[env]["deploy"]["parameters"]
        overrides = dict(kv.split("=", 1) for kv in deploy["parameter_overrides"].split())
        assert set(overrides) <= set(TEMPLATE["Parameters"]), env
        # Deploy-time values only: credentials come from the AWS chain, never from this file.
        text = json.dumps(config[env]).lower()
        assert not re.search(r"secret|password|token|aws_access_key|credential", text), env
