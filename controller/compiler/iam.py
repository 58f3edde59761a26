"""The sandbox role's policy: only what km's own parts need, only in the allowed regions.

Sandbox-specific names are not known when a profile is compiled, so the document carries
placeholders (`${km:SandboxId}`, `${km:ArtifactsBucket}`) that
`render_iam_policy` fills in at create; the compiled file stays one per profile and hashable.
"""

from __future__ import annotations

import json
from typing import Any

from controller.profile import SandboxProfile

SANDBOX_ID = "${km:SandboxId}"
ARTIFACTS_BUCKET = "${km:ArtifactsBucket}"
# Prefixes of the artifacts bucket a sandbox writes to; each is followed by the sandbox id.
SANDBOX_PREFIXES = ("agent-runs", "artifacts", "telemetry", "learn")

# Converse and ConverseStream are authorised through these two actions; they are not IAM actions of their own.
BEDROCK_INVOKE_ACTIONS = [
    "bedrock:InvokeModel",
    "bedrock:InvokeModelWithResponseStream",
]


def allowed_regions(profile: SandboxProfile) -> list[str]:
    identity = profile.spec.identity
    return list(identity.allowed_regions) if identity is not None else [profile.spec.runtime.region]


def iam_policy(profile: SandboxProfile) -> dict[str, Any]:
    regions = allowed_regions(profile)
    own_objects = [f"arn:aws:s3:::{ARTIFACTS_BUCKET}/{prefix}/{SANDBOX_ID}/*" for prefix in SANDBOX_PREFIXES]
    statements: list[dict[str, Any]] = [
        {
            "Sid": "DenyOutsideAllowedRegions",
            "Effect": "Deny",
            "Action": "*",
            "Resource": "*",
            "Condition": {"StringNotEquals": {"aws:RequestedRegion": regions}},
        },
        {
            "Sid": "OwnArtifacts",
            "Effect": "Allow",
            "Action": ["s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload"],
            "Resource": own_objects,
        },
        {
            "Sid": "ListOwnArtifacts",
            "Effect": "Allow",
            "Action": "s3:ListBucket",
            "Resource": f"arn:aws:s3:::{ARTIFACTS_BUCKET}",
            "Condition": {"StringLike": {"s3:prefix": [f"{prefix}/{SANDBOX_ID}/*" for prefix in SANDBOX_PREFIXES]}},
        },
        {
            "Sid": "CommandChannel",
            "Effect": "Allow",
            "Action": [
                "ssm:UpdateInstanceInformation",
                "ssmmessages:CreateControlChannel",
                "ssmmessages:CreateDataChannel",
                "ssmmessages:OpenControlChannel",
                "ssmmessages:OpenDataChannel",
                "ec2messages:AcknowledgeMessage",
                "ec2messages:DeleteMessage",
                "ec2messages:FailMessage",
                "ec2messages:GetEndpoint",
                "ec2messages:GetMessages",
                "ec2messages:SendReply",
            ],
            "Resource": "*",
        },
    ]
    if profile.spec.execution.use_bedrock:
        statements.append(
            {
                "Sid": "BedrockInvoke",
                "Effect": "Allow",
                "Action": BEDROCK_INVOKE_ACTIONS,
                "Resource": [
                    # Cross-region inference profiles (us.anthropic.…) invoke the model in other regions of
                    # their geography; the region lock still applies to the region the call is made in.
                    "arn:aws:bedrock:*::foundation-model/*",
                    *(f"arn:aws:bedrock:{region}:*:inference-profile/*" for region in regions),
                ],
            }
        )
    identity = profile.spec.identity
    if identity is not None and identity.allowed_secret_paths:
        statements.append(
            {
                "Sid": "ReadAllowedSecrets",
                "Effect": "Allow",
                "Action": ["ssm:GetParameter", "ssm:GetParameters"],
                "Resource": [
                    f"arn:aws:ssm:{region}:*:parameter{path}" for region in regions for path in identity.allowed_secret_paths
                ],
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


def render_iam_policy(policy: dict[str, Any], sandbox_id: str, artifacts_bucket: str) -> dict[str, Any]:
    """The policy for one sandbox, placeholders replaced."""
    text = json.dumps(policy)
    for placeholder, value in ((SANDBOX_ID, sandbox_id), (ARTIFACTS_BUCKET, artifacts_bucket)):
        text = text.replace(placeholder, value)
    rendered: dict[str, Any] = json.loads(text)
    return rendered
