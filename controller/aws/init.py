"""`km init`: the account-wide resources every ec2 sandbox relies on, made idempotently.

- the artifacts bucket: SSE-S3 encryption, all public access blocked, a lifecycle rule that aborts
  stale multipart uploads and expires telemetry after 90 days;
- the DynamoDB tables (sandboxes, schedules);
- the shared EFS file system, unless the configuration names one;
- the teardown handler: its role, its Lambda (`controller.lifecycle.handler`, code packaged from this
  installation and replaced only when it changed), and the role EventBridge Scheduler assumes to call it.

Each step looks before it makes anything, so a second run makes nothing and an interrupted run is
finished by the next. `plan()` says what a run would make, without making it (`km init --dry-run`).
The configuration file is written when there is none (region, prefix, the EFS id), which also tells
later commands that this operator uses ec2.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controller.aws.clients import account_id, client, error_code
from controller.aws.config import OperatorConfig, write_config_if_missing
from controller.aws.efs import ensure_file_system, find_file_system
from controller.aws.lambda_package import build_zip, code_sha256

Progress = Callable[[str], None]
HANDLER = "controller.lifecycle.handler"
RUNTIME = "python3.11"
TELEMETRY_DAYS = 90


@dataclass(frozen=True)
class SharedResource:
    kind: str  # s3-bucket, dynamodb-table, iam-role, lambda-function
    name: str
    state: str  # exists, missing, created, updated

    def as_json(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "state": self.state}


@dataclass(frozen=True)
class Names:
    prefix: str
    region: str
    account: str
    bucket: str
    sandboxes_table: str
    schedules_table: str
    handler_role: str
    scheduler_role: str
    handler: str

    @classmethod
    def of(cls, config: OperatorConfig, region: str, account: str) -> Names:
        prefix = config.resource_prefix
        return cls(
            prefix=prefix,
            region=region,
            account=account,
            bucket=config.bucket(account, region),
            sandboxes_table=config.table("sandboxes"),
            schedules_table=config.table("schedules"),
            handler_role=f"{prefix}-ttl-handler",
            scheduler_role=f"{prefix}-ttl-scheduler",
            handler=f"{prefix}-ttl-handler",
        )

    def handler_arn(self) -> str:
        return f"arn:aws:lambda:{self.region}:{self.account}:function:{self.handler}"


def names_for(config: OperatorConfig) -> Names:
    region = config.effective_region()
    return Names.of(config, region, account_id(region))


def plan(config: OperatorConfig) -> list[SharedResource]:
    """Every shared resource and whether it exists; nothing is changed."""
    from controller.state.dynamodb import missing_tables

    names = names_for(config)
    absent = missing_tables(config, names.region)
    return [
        SharedResource("s3-bucket", names.bucket, "exists" if _bucket_exists(names) else "missing"),
        *(SharedResource("dynamodb-table", table, "missing" if table in absent else "exists") for table in _tables(names)),
        *(SharedResource("iam-role", role, "exists" if _role_exists(role) else "missing") for role in _roles(names)),
        SharedResource("lambda-function", names.handler, "exists" if _function(names) is not None else "missing"),
        _efs_state(names, config),
    ]


def initialise(config: OperatorConfig, progress: Progress = lambda _: None) -> list[SharedResource]:
    """Make what is missing (and bring what exists up to date); returns each resource with what was done."""
    from controller.state.dynamodb import ensure_tables

    names = names_for(config)
    done = [_ensure_bucket(names, progress)]
    progress("making sure the DynamoDB tables exist")
    created = ensure_tables(config, names.region)
    done += [SharedResource("dynamodb-table", table, "created" if table in created else "exists") for table in _tables(names)]
    done.append(_ensure_role(names.handler_role, "lambda.amazonaws.com", _handler_policy(names), progress))
    done.append(_ensure_handler(names, config, progress))
    done.append(_ensure_role(names.scheduler_role, "scheduler.amazonaws.com", _scheduler_policy(names), progress))
    efs_id = config.efs_id
    if efs_id is None:
        progress("making sure the shared EFS file system and its mount targets exist")
        efs_id, made = ensure_file_system(names.region, config)
        done.append(SharedResource("efs-file-system", efs_id, "created" if made else "exists"))
    else:
        done.append(SharedResource("efs-file-system", efs_id, "configured"))
    written = write_config_if_missing({"region": names.region, "resource_prefix": config.resource_prefix, "efs_id": efs_id})
    if written is not None:
        progress(f"wrote the km configuration {written}")
    return done


def _efs_state(names: Names, config: OperatorConfig) -> SharedResource:
    if config.efs_id:
        return SharedResource("efs-file-system", config.efs_id, "configured")
    found = find_file_system(names.region, f"{config.resource_prefix}-efs")
    return SharedResource("efs-file-system", found or f"{config.resource_prefix}-efs", "exists" if found else "missing")


# ---- the bucket --------------------------------------------------------------------------------------


def _bucket_exists(names: Names) -> bool:
    try:
        client("s3", names.region).head_bucket(Bucket=names.bucket)
    except Exception as error:
        if error_code(error) in ("404", "NoSuchBucket", "NotFound"):
            return False
        raise
    return True


def _ensure_bucket(names: Names, progress: Progress) -> SharedResource:
    s3 = client("s3", names.region)
    state = "exists"
    if not _bucket_exists(names):
        progress(f"creating the artifacts bucket {names.bucket}")
        location = {} if names.region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": names.region}}
        s3.create_bucket(Bucket=names.bucket, **location)
        state = "created"
    # Settings are re-applied every time: cheap, and a bucket someone loosened is tightened again.
    s3.put_bucket_encryption(
        Bucket=names.bucket,
        ServerSideEncryptionConfiguration={"Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]},
    )
    s3.put_public_access_block(
        Bucket=names.bucket,
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": True,
            "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        },
    )
    s3.put_bucket_lifecycle_configuration(
        Bucket=names.bucket,
        LifecycleConfiguration={
            "Rules": [
                {
                    "ID": "km-abort-stale-uploads",
                    "Status": "Enabled",
                    "Filter": {"Prefix": ""},
                    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7},
                },
                {
                    "ID": "km-expire-telemetry",
                    "Status": "Enabled",
                    "Filter": {"Prefix": "telemetry/"},
                    "Expiration": {"Days": TELEMETRY_DAYS},
                },
            ]
        },
    )
    return SharedResource("s3-bucket", names.bucket, state)


# ---- the tables --------------------------------------------------------------------------------------


def _tables(names: Names) -> tuple[str, str]:
    return names.sandboxes_table, names.schedules_table


# ---- roles and the handler ---------------------------------------------------------------------------


def _roles(names: Names) -> tuple[str, str]:
    return names.handler_role, names.scheduler_role


def _role_exists(role: str) -> bool:
    try:
        client("iam", "us-east-1").get_role(RoleName=role)
    except Exception as error:
        if error_code(error) == "NoSuchEntity":
            return False
        raise
    return True


def _ensure_role(role: str, service: str, policy: dict[str, Any], progress: Progress) -> SharedResource:
    iam = client("iam", "us-east-1")
    trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}],
    }
    state = "exists"
    if not _role_exists(role):
        progress(f"creating the IAM role {role}")
        iam.create_role(
            RoleName=role,
            AssumeRolePolicyDocument=json.dumps(trust),
            Description="km: account-wide sandbox lifecycle",
            Tags=[{"Key": "km:shared", "Value": "true"}],
        )
        state = "created"
    iam.put_role_policy(RoleName=role, PolicyName="km", PolicyDocument=json.dumps(policy))
    return SharedResource("iam-role", role, state)


def _handler_policy(names: Names) -> dict[str, Any]:
    """What the teardown handler does: stop or tear down a sandbox's instance, volume, group, role and record."""
    table_arns = [f"arn:aws:dynamodb:{names.region}:{names.account}:table/{t}" for t in _tables(names)]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": [
                    "ec2:Describe*",
                    "ec2:StopInstances",
                    "ec2:TerminateInstances",
                    "ec2:DeleteVolume",
                    "ec2:DetachVolume",
                    "ec2:DeleteSecurityGroup",
                ],
                "Resource": "*",
            },
            {
                "Effect": "Allow",
                "Action": [
                    "iam:GetRole",
                    "iam:DeleteRole",
                    "iam:DeleteRolePolicy",
                    "iam:ListRolePolicies",
                    "iam:GetInstanceProfile",
                    "iam:RemoveRoleFromInstanceProfile",
                    "iam:DeleteInstanceProfile",
                ],
                "Resource": [
                    f"arn:aws:iam::{names.account}:role/{names.prefix}-*",
                    f"arn:aws:iam::{names.account}:instance-profile/{names.prefix}-*",
                ],
            },
            {
                "Effect": "Allow",
                "Action": ["dynamodb:*Item", "dynamodb:Query", "dynamodb:TransactWriteItems"],
                "Resource": table_arns,
            },
            {"Effect": "Allow", "Action": ["scheduler:DeleteSchedule", "scheduler:GetSchedule"], "Resource": "*"},
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"], "Resource": f"arn:aws:s3:::{names.bucket}/*"},
            {
                "Effect": "Allow",
                "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
                "Resource": "*",
            },
        ],
    }


def _scheduler_policy(names: Names) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "lambda:InvokeFunction", "Resource": names.handler_arn()}],
    }


def _function(names: Names) -> dict[str, Any] | None:
    try:
        found = client("lambda", names.region).get_function(FunctionName=names.handler)
    except Exception as error:
        if error_code(error) == "ResourceNotFoundException":
            return None
        raise
    return dict(found["Configuration"])


def _ensure_handler(names: Names, config: OperatorConfig, progress: Progress) -> SharedResource:
    code = build_zip()
    environment = {
        "Variables": {
            "KM_RESOURCE_PREFIX": config.resource_prefix,
            "KM_ARTIFACTS_BUCKET": names.bucket,
            "KM_SANDBOXES_TABLE": names.sandboxes_table,
            "KM_SCHEDULES_TABLE": names.schedules_table,
        }
    }
    lam = client("lambda", names.region)
    existing = _function(names)
    if existing is None:
        progress(f"deploying the teardown handler {names.handler} ({len(code) // 1024} KiB)")
        role_arn = f"arn:aws:iam::{names.account}:role/{names.handler_role}"
        for attempt in range(10):  # a new role takes a few seconds to be assumable by Lambda
            try:
                lam.create_function(
                    FunctionName=names.handler,
                    Runtime=RUNTIME,
                    Role=role_arn,
                    Handler=HANDLER,
                    Code={"ZipFile": code},
                    Timeout=300,
                    MemorySize=512,
                    Environment=environment,
                    Description="km: applies a sandbox's teardown policy when its TTL fires",
                )
                break
            except Exception as error:
                if error_code(error) != "InvalidParameterValueException" or attempt == 9:
                    raise
                time.sleep(2)
        return SharedResource("lambda-function", names.handler, "created")
    if existing.get("CodeSha256") == code_sha256(code) and existing.get("Environment") == environment:
        return SharedResource("lambda-function", names.handler, "exists")
    progress(f"updating the teardown handler {names.handler}")
    lam.update_function_code(FunctionName=names.handler, ZipFile=code)
    lam.get_waiter("function_updated_v2").wait(FunctionName=names.handler, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    lam.update_function_configuration(FunctionName=names.handler, Environment=environment)
    return SharedResource("lambda-function", names.handler, "updated")
