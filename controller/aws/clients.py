"""boto3 clients for km: one session per process, the standard retry mode, and endpoints from the environment.

boto3 itself honours `AWS_ENDPOINT_URL` and the per-service `AWS_ENDPOINT_URL_<SERVICE>` variables, so
the whole ec2 substrate runs against a moto server on loopback in tests, and against the operator's
account otherwise, with nothing km-specific to configure. Credentials come from the normal boto3 chain.
Throttling (ThrottlingException, 503) is retried by botocore's standard mode with jittered backoff.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

RETRY_ATTEMPTS = 8
_lock = threading.Lock()


@functools.cache
def _session(region: str) -> Any:
    import boto3

    return boto3.session.Session(region_name=region)


def client(service: str, region: str) -> Any:
    """A boto3 client for `service` in `region` (clients are thread-safe; sessions are not, hence the lock)."""
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": RETRY_ATTEMPTS}, connect_timeout=10, read_timeout=60)
    with _lock:
        return _session(region).client(service, config=config)


def account_id(region: str) -> str:
    """The caller's account (STS GetCallerIdentity), for names such as the default artifacts bucket."""
    return str(client("sts", region).get_caller_identity()["Account"])


def error_code(error: BaseException) -> str | None:
    """The AWS error code of a botocore ClientError (`ConditionalCheckFailedException`, …), else None."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None
