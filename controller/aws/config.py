"""The operator's km configuration for AWS: a YAML file, overridden by environment variables, with defaults
that need no file at all (prefix `km`, the artifacts bucket named after the account and region, the
default VPC).

File: `$KM_CONFIG`, else `$XDG_CONFIG_HOME/km/config.yaml`, else `~/.config/km/config.yaml`. Every field
can be overridden by `KM_<FIELD>` in upper case (`KM_REGION`, `KM_ARTIFACTS_BUCKET`, …). An unknown key
in the file is an error that names it, as for profiles.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

CONFIG_ENV = "KM_CONFIG"
DEFAULT_REGION = "us-east-1"


class OperatorConfigError(ValueError):
    """The configuration cannot be used; the message names the file or variable and the field."""


class OperatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    resource_prefix: str = Field("km", pattern=r"^[a-z][a-z0-9-]{0,15}$", description="Prefix of every resource km makes.")
    region: str | None = Field(None, description="Default region; else AWS_REGION / AWS_DEFAULT_REGION, else us-east-1.")
    artifacts_bucket: str | None = Field(None, description="Default: <prefix>-artifacts-<account>-<region>.")
    sandboxes_table: str | None = Field(None, description="Default: <prefix>-sandboxes.")
    schedules_table: str | None = Field(None, description="Default: <prefix>-schedules.")
    vpc_id: str | None = Field(None, description="Default: the region's default VPC.")
    subnet_ids: list[str] = Field(default_factory=list, description="Default: the VPC's default-for-AZ subnets.")
    efs_id: str | None = Field(None, description="EFS file system for profiles that mount it.")
    notification_email: str | None = Field(None, description="Where lifecycle notifications go.")
    pip_index_url: str | None = Field(
        None, description="Python package index instances install the host agent's dependencies from (default PyPI)."
    )

    def effective_region(self, env: Mapping[str, str] | None = None) -> str:
        env = os.environ if env is None else env
        return self.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION

    def table(self, kind: str) -> str:
        """The DynamoDB table for `sandboxes` or `schedules`."""
        configured = self.sandboxes_table if kind == "sandboxes" else self.schedules_table
        return configured or f"{self.resource_prefix}-{kind}"

    def bucket(self, account: str, region: str) -> str:
        return self.artifacts_bucket or f"{self.resource_prefix}-artifacts-{account}-{region}"


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "km" / "config.yaml"


def load_operator_config(env: Mapping[str, str] | None = None) -> OperatorConfig:
    """The file (when there is one) with `KM_<FIELD>` variables on top; defaults for the rest."""
    env = os.environ if env is None else env
    path = config_path(env)
    values: dict[str, Any] = {}
    if path.is_file():
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise OperatorConfigError(f"{path}: not valid YAML: {error}") from error
        if not isinstance(loaded, dict):
            raise OperatorConfigError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        values.update({str(key).replace("-", "_"): value for key, value in loaded.items()})
    elif env.get(CONFIG_ENV):
        raise OperatorConfigError(f"{CONFIG_ENV}={env[CONFIG_ENV]}: no such file")
    for name, field in OperatorConfig.model_fields.items():
        variable = f"KM_{name.upper()}"
        if env.get(variable):
            values[name] = env[variable].split(",") if field.annotation == list[str] else env[variable]
    try:
        return OperatorConfig.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        raise OperatorConfigError(f"km configuration ({path} and KM_* variables): {problems}") from error


def write_config_if_missing(values: dict[str, Any], env: Mapping[str, str] | None = None) -> Path | None:
    """Write the configuration file with `values` when there is none; returns the path written, or None."""
    path = config_path(env)
    if path.is_file():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# km configuration, written by `km init`; every key can be overridden by KM_<KEY> in the environment.\n"
    path.write_text(header + yaml.safe_dump({key: value for key, value in values.items() if value is not None}, sort_keys=True))
    return path
