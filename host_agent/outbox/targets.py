"""Where run files go: an S3 prefix on EC2, a directory on the host for the local substrate.

`SandboxIdentity.artifacts_uri` names the place; `target_for` turns it into an `UploadTarget`. A target
only copies one file to one key and raises when the store is unreachable: retrying is the uploader's job,
so the S3 client is built with short timeouts and no retries of its own.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit


class ArtifactsUriError(ValueError):
    """The artifacts URI names no place the outbox can write to."""

    def __init__(self, uri: str, cause: str) -> None:
        super().__init__(f"artifacts URI {uri!r}: {cause}; expected s3://bucket[/prefix], file:///dir or /dir")
        self.uri = uri


class UploadTarget(Protocol):
    """A store that accepts one file under one key."""

    def put(self, key: str, source: Path) -> None:
        """Copy `source` to `key`, replacing what was there; raise (OSError, botocore errors) when the store is down."""
        ...


def _checked_key(key: str) -> list[str]:
    """Keys are relative paths made by the outbox; refuse anything that could escape or alias in the target."""
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"invalid upload key {key!r}")
    return parts


class DirectoryTarget:
    """A directory on the host (local substrate); each file appears whole or not at all (tmp + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __str__(self) -> str:
        return str(self.root)

    def put(self, key: str, source: Path) -> None:
        destination = self.root.joinpath(*_checked_key(key))
        destination.parent.mkdir(parents=True, exist_ok=True)
        temporary = destination.with_name(f".{destination.name}.{secrets.token_hex(4)}.tmp")
        try:
            with source.open("rb") as reader, temporary.open("wb") as writer:
                shutil.copyfileobj(reader, writer)
                writer.flush()
                os.fsync(writer.fileno())
            os.replace(temporary, destination)
        finally:
            temporary.unlink(missing_ok=True)


class S3Target:
    """An S3 bucket and prefix. The endpoint comes from AWS_ENDPOINT_URL(_S3), which boto3 reads itself."""

    CONNECT_TIMEOUT_SECONDS = 3.0
    READ_TIMEOUT_SECONDS = 20.0

    def __init__(self, bucket: str, prefix: str = "", *, region: str | None = None) -> None:
        # Imported here: boto3 takes most of a second to import and only the S3 case needs it.
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = Config(
            connect_timeout=self.CONNECT_TIMEOUT_SECONDS,
            read_timeout=self.READ_TIMEOUT_SECONDS,
            retries={"total_max_attempts": 1, "mode": "standard"},
        )
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
        # A session of its own: the default session is not thread-safe, the client it makes is.
        self._client: Any = boto3.session.Session().client("s3", region_name=region, config=config)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def object_key(self, key: str) -> str:
        relative = "/".join(_checked_key(key))
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def put(self, key: str, source: Path) -> None:
        with source.open("rb") as body:
            self._client.put_object(Bucket=self.bucket, Key=self.object_key(key), Body=body)


def target_for(artifacts_uri: str, *, region: str | None = None) -> UploadTarget:
    """The target an artifacts URI names: `s3://bucket[/prefix]`, `file:///dir` or an absolute `/dir`.

    `region` overrides AWS_REGION / AWS_DEFAULT_REGION (the daemon knows it from host-agent.json).
    """
    parts = urlsplit(artifacts_uri)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ArtifactsUriError(artifacts_uri, "no bucket")
        return S3Target(parts.netloc, parts.path, region=region)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ArtifactsUriError(artifacts_uri, f"file URIs on another host ({parts.netloc}) are not supported")
        return DirectoryTarget(Path(unquote(parts.path)))
    if parts.scheme == "" and artifacts_uri.startswith("/"):
        return DirectoryTarget(Path(artifacts_uri))
    raise ArtifactsUriError(artifacts_uri, "unsupported scheme" if parts.scheme else "a local directory must be absolute")
