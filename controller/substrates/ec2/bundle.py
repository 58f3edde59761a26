"""The host agent as an EC2 instance installs it at first boot when its image does not carry one.

Stock AMIs have no `km-host-agent`, and the compiled userdata must start one. The bundle is a
reproducible tar.gz of this installation's `host_agent` and `ebpf` packages (with the compiled BPF
objects, so the instance needs no compiler), the daemon's requirements and `install-host-agent.sh`.
It is stored once per content in the artifacts bucket (`km/host-agent/<sha256>.tar.gz`) and the
instance fetches it through a presigned URL, checks its SHA-256 and runs the installer, which takes the
Python dependencies from PyPI (or the index in `KM_PIP_INDEX_URL`) while the egress gate is not yet up.

The BPF objects are compiled for this machine's architecture; an instance of another architecture
needs an image with the host agent baked in, and is refused here with that fix.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import platform
import tarfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from controller.aws.clients import client
from controller.images.recipe import sandbox_requirements
from controller.substrates.ec2.errors import Ec2Error, as_ec2_error, is_aws_error
from controller.substrates.ec2.images import Architecture
from ebpf.objects import ObjectError, build_all

BUNDLE_URL_SECONDS = 2 * 3600  # the instance fetches it within minutes of launch
PACKAGES = ("host_agent", "ebpf")
INSTALLER = "install-host-agent.sh"
_SKIPPED_PARTS = frozenset({"__pycache__"})
_MACHINE_ARCH: dict[str, Architecture] = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass(frozen=True)
class Bundle:
    data: bytes
    sha256: str

    @property
    def key(self) -> str:
        return f"km/host-agent/{self.sha256}.tar.gz"


def local_architecture() -> Architecture | None:
    return _MACHINE_ARCH.get(platform.machine())


def _package_files(name: str) -> list[tuple[str, Path]]:
    root = Path(str(resources.files(name)))
    objects = {path.resolve() for path in build_all()} if name == "ebpf" else set()
    found: list[tuple[str, Path]] = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or set(relative.parts) & _SKIPPED_PARTS or path.suffix == ".pyc":
            continue
        if path.suffix == ".o" and path.resolve() not in objects:
            continue  # stale objects of edited sources stay home
        found.append((f"{name}/{relative.as_posix()}", path))
    return found


def _add(archive: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    archive.addfile(info, io.BytesIO(data))


def build_bundle() -> Bundle:
    """The bundle for this installation: the same code always gives the same bytes (fixed times,
    owners and order), so its hash names it and an unchanged installation uploads nothing."""
    try:
        files = [entry for package in PACKAGES for entry in _package_files(package)]
    except ObjectError as error:
        raise Ec2Error(f"building the host agent bundle: {error}") from None
    installer = resources.files("controller.substrates.ec2").joinpath(INSTALLER).read_bytes()
    requirements = ("\n".join(sandbox_requirements()) + "\n").encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        _add(archive, INSTALLER, installer, 0o755)
        _add(archive, "requirements.txt", requirements)
        for name, path in files:
            _add(archive, name, path.read_bytes())
    compressed = io.BytesIO()
    with gzip.GzipFile(fileobj=compressed, mode="wb", mtime=0, filename="") as stream:
        stream.write(raw.getvalue())
    data = compressed.getvalue()
    return Bundle(data, hashlib.sha256(data).hexdigest())


def publish_bundle(region: str, bucket: str, architecture: Architecture, bundle: Bundle | None = None) -> dict[str, str]:
    """Upload the bundle unless the bucket has it; the boot environment that makes userdata install it."""
    here = local_architecture()
    if architecture != here:
        raise Ec2Error(
            f"the instance runs {architecture} but this machine builds the host agent's BPF objects for {here}: "
            f"use an instance type of {here}, or an image with km-host-agent baked in (spec.runtime.ami)"
        )
    bundle = bundle or build_bundle()
    s3 = client("s3", region)
    try:
        s3.head_object(Bucket=bucket, Key=bundle.key)
    except Exception as error:
        if not is_aws_error(error, "404", "NoSuchKey", "NotFound"):
            raise as_ec2_error(error, f"checking s3://{bucket}/{bundle.key}") from error
        try:
            s3.put_object(Bucket=bucket, Key=bundle.key, Body=bundle.data, ContentType="application/gzip")
        except Exception as put_error:
            raise as_ec2_error(put_error, f"uploading the host agent bundle to s3://{bucket}/{bundle.key}") from put_error
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": bundle.key}, ExpiresIn=BUNDLE_URL_SECONDS)
    return {"KM_HOST_AGENT_BUNDLE_URL": str(url), "KM_HOST_AGENT_BUNDLE_SHA256": bundle.sha256}
