"""The user data an EC2 sandbox boots with: its identity, then the profile's compiled first-boot script.

The compiled `userdata.sh` is the same for every sandbox of a profile and reads who it is from
`/etc/km/sandbox.env`; on EC2 nothing else can write that file before first boot, so the user data
writes it and then runs the compiled script.

EC2 limits user data to 16 KB. When the base64 form is larger, the whole script goes to
`s3://<artifacts>/artifacts/<sandbox_id>/km-userdata.sh` and the instance boots a short stub that fetches
it through a presigned HTTPS URL with python3 (present on every supported image; no AWS CLI and no
credentials needed on the box), checks its SHA-256 and runs it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shlex
from collections.abc import Mapping
from typing import Any

from controller.aws.clients import client
from controller.substrates.ec2.errors import Ec2Error, as_ec2_error, is_aws_error

USERDATA_LIMIT_BYTES = 16 * 1024  # of the base64-encoded user data, as RunInstances receives it
# The stub fetches within a minute of launch; the URL outlives that comfortably. A URL signed with
# temporary credentials stops working when they expire, whichever comes first.
USERDATA_URL_SECONDS = 2 * 3600
STUB_SCRIPT_PATH = "/var/lib/km/userdata.sh"
SANDBOX_ENV_FILE = "/etc/km/sandbox.env"
_ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


def userdata_key(sandbox_id: str) -> str:
    return f"artifacts/{sandbox_id}/km-userdata.sh"


def sandbox_userdata(compiled_userdata: str, identity: Mapping[str, str]) -> str:
    """`identity` (KM_SANDBOX_ID, KM_REGION, …) written to /etc/km/sandbox.env, then the compiled script unchanged.

    Values are shell-quoted: the compiled script sources the file, and `host_agent.config.load_identity`
    strips the quotes.
    """
    lines = []
    for name, value in identity.items():
        if not _ENV_NAME.fullmatch(name) or "\n" in value or "\r" in value:
            raise Ec2Error(f"sandbox identity {name}={value!r} cannot be written to {SANDBOX_ENV_FILE}")
        lines.append(f"{name}={shlex.quote(value)}")
    prelude = "\n".join(
        [
            "#!/bin/bash",
            "# km: this sandbox's identity, then its profile's first-boot script (below, unchanged).",
            "set -euo pipefail",
            "install -d -m 0755 /etc/km",
            f"cat > {SANDBOX_ENV_FILE} <<'KM_SANDBOX_ENV'",
            *lines,
            "KM_SANDBOX_ENV",
            f"chmod 0644 {SANDBOX_ENV_FILE}",
        ]
    )
    return prelude + "\n" + compiled_userdata


def encoded_size(userdata: str) -> int:
    return len(base64.b64encode(userdata.encode("utf-8")))


def needs_offload(userdata: str) -> bool:
    return encoded_size(userdata) > USERDATA_LIMIT_BYTES


def boot_stub(url: str, sha256: str, script_path: str = STUB_SCRIPT_PATH) -> str:
    """A short script that downloads the real boot script from `url`, checks it, and execs it."""
    fetch = "\n".join(
        [
            "import hashlib, os, sys, urllib.request",
            f"body = urllib.request.urlopen({json.dumps(url)}, timeout=30).read()",
            f"if hashlib.sha256(body).hexdigest() != {json.dumps(sha256)}:",
            '    sys.exit("km: the fetched boot script does not match its checksum")',
            "with os.fdopen(os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700), 'wb') as target:",
            "    target.write(body)",
        ]
    )
    return "\n".join(
        [
            "#!/bin/bash",
            "# km: the boot script is larger than EC2 user data allows; fetch it from the artifacts bucket and run it.",
            "set -euo pipefail",
            f"script={shlex.quote(script_path)}",
            'install -d -m 0755 "$(dirname "$script")"',
            "for attempt in 1 2 3 4 5 6 7 8 9 10; do",
            """  if python3 - "$script" <<'KM_FETCH'; then exec /bin/bash "$script"; fi""",
            fetch,
            "KM_FETCH",
            '  echo "km: fetching the boot script failed (attempt $attempt of 10)" >&2',
            "  sleep 5",
            "done",
            'echo "km: could not fetch the boot script from the artifacts bucket" >&2',
            "exit 1",
            "",
        ]
    )


def offload_userdata(region: str, bucket: str, sandbox_id: str, userdata: str) -> str:
    """Upload the full script to the artifacts bucket and return the stub that boots it."""
    body = userdata.encode("utf-8")
    key = userdata_key(sandbox_id)
    try:
        client("s3", region).put_object(Bucket=bucket, Key=key, Body=body, ContentType="text/x-shellscript")
    except Exception as error:
        if not is_aws_error(error):
            raise
        fix = "run km init to create the artifacts bucket" if is_aws_error(error, "NoSuchBucket") else ""
        raise as_ec2_error(error, f"uploading the boot script to s3://{bucket}/{key}", fix) from None
    url = _presigning_client(region).generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=USERDATA_URL_SECONDS
    )
    stub = boot_stub(str(url), hashlib.sha256(body).hexdigest())
    if needs_offload(stub):
        raise Ec2Error(
            f"the boot stub for {sandbox_id} is itself over EC2's user data limit ({encoded_size(stub)} bytes encoded)"
        )
    return stub


def _presigning_client(region: str) -> Any:
    """An S3 client that signs with SigV4: botocore presigns with SigV2 by default, which newer buckets refuse."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session(region_name=region).client("s3", config=Config(signature_version="s3v4"))
