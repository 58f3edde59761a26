"""The ec2 substrate: the same operations as the local one, on the operator's AWS account.

Records live in DynamoDB; resources are converged by the resource steps in this package (each found by
tag first, so a create killed anywhere and re-run ends with one of everything); the TTL is an
EventBridge Scheduler one-shot; commands reach the sandbox through SSM Run Command. What the sandbox
uploads (agent runs, telemetry) is read from S3 into a local cache, so `km agent results` and `km otel`
read files exactly as on the local substrate.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Collection
from datetime import datetime
from pathlib import Path
from typing import Any

from controller.aws.clients import account_id, client
from controller.aws.config import OperatorConfig, load_operator_config
from controller.aws.efs import find_file_system
from controller.channel.ssm import ChannelError, SsmChannel, bash_script, host_agent_script
from controller.schedule.ttl import TtlTarget, delete_ttl_schedule, ensure_ttl_schedule
from controller.state import SandboxRecord, StateStore
from controller.substrates.ec2.bundle import local_architecture, publish_bundle
from controller.substrates.ec2.errors import CapacityError, Ec2Error, is_aws_error
from controller.substrates.ec2.images import Image
from controller.substrates.ec2.instances import find_instance, start_instance, stop_instance
from controller.substrates.ec2.provision import ensure_sandbox
from controller.substrates.ec2.tags import SandboxRef, SandboxTags
from controller.substrates.ec2.teardown import destroy_all
from controller.substrates.local.substrate import PlanInput, Progress, SubstrateError
from controller.substrates.records import creator, creator_alive, policy_changes, starting_record

CACHE_ENV = "KM_CACHE_DIR"


def applied_plan_key(sandbox_id: str) -> str:
    return f"artifacts/{sandbox_id}/applied-plan.json"


_LIVE = {"pending": "running", "running": "running"}


def cache_root() -> Path:
    """Where S3 artifacts are mirrored for reading: `$KM_CACHE_DIR`, else the XDG cache directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "km"


class Ec2Substrate:
    def __init__(self, store: StateStore, config: OperatorConfig | None = None) -> None:
        self.store = store
        self.config = config or load_operator_config()
        self.prefix = self.config.resource_prefix

    # ---- create -------------------------------------------------------------------------------
    finishes_interrupted = True  # every resource step is found by tag first: a killed create can go on

    def create(
        self,
        compiled: PlanInput,
        alias: str,
        profile_file: str | None = None,
        progress: Progress = lambda _: None,
        avoid_numbers: Collection[int] = (),
    ) -> SandboxRecord:
        plan = compiled.plan
        starting = starting_record(plan, alias, profile_file, "ec2", {"resource_prefix": self.prefix})
        record = self.store.insert(starting, avoid_numbers)
        progress(f"{record.sandbox_id}: created record for alias {alias} in {record.region}")
        return self._provision(record, compiled, progress)

    def finish_create(self, record: SandboxRecord, compiled: PlanInput, progress: Progress = lambda _: None) -> SandboxRecord:
        """Go on with a create that was killed: the same sandbox id, so what it made is found and kept."""
        claimed = self.store.update(record.sandbox_id, expected_status="starting", resources={**record.resources, **creator()})
        progress(f"{record.sandbox_id}: finishing the interrupted create of {record.alias}")
        return self._provision(claimed, compiled, progress)

    def _provision(self, record: SandboxRecord, compiled: PlanInput, progress: Progress) -> SandboxRecord:
        """Converge every resource of a `starting` record, then mark it running; on failure remove them."""
        plan, alias = compiled.plan, record.alias
        sandbox_id, region, ttl_expiry = record.sandbox_id, record.region, record.ttl_expiry
        try:
            account = account_id(region)
            bucket = self.config.bucket(account, region)
            made = ensure_sandbox(
                region,
                SandboxTags.for_plan(sandbox_id, self.prefix, plan),
                plan,
                compiled.userdata,
                artifacts_bucket=bucket,
                config=self._with_efs(region),
                alias=alias,
                boot_env=lambda image: self._host_agent_env(region, bucket, image, progress),
            )
            progress(f"{sandbox_id}: instance {made.instance.instance_id} is {made.instance.state}")
            if ttl_expiry is not None:
                ensure_ttl_schedule(self.prefix, sandbox_id, ttl_expiry, self._ttl_target(region, account), region)
            self._save_applied_plan(region, bucket, sandbox_id, plan)
            resources = {
                **record.resources,
                "instance_id": made.instance.instance_id,
                "security_group_id": made.security_group_id,
                "bucket": bucket,
            }
            return self.store.update(sandbox_id, status="running", resources=resources)
        except CapacityError as error:
            progress(f"{sandbox_id}: no capacity; removing what was made")
            self._remove(record)
            self.store.update(sandbox_id, status="nocap", failure_reason=str(error))
            raise SubstrateError(f"create {alias} ({sandbox_id}): no capacity: {error.aws_message}") from None
        except BaseException as error:
            progress(f"{sandbox_id}: create failed, removing what was made")
            self._remove(record)
            self.store.delete(sandbox_id)
            if isinstance(error, Ec2Error):
                raise SubstrateError(f"create {alias} ({sandbox_id}) failed: {error}") from None
            raise

    def _host_agent_env(self, region: str, bucket: str, image: Image, progress: Progress) -> dict[str, str]:
        """Publish the host agent bundle for an instance about to launch (a stock image lacks the daemon).

        An `ami-…` given in the profile may be one with km-host-agent baked in, whatever its architecture:
        it gets the bundle only when it can use it."""
        if image.source == "literal" and image.architecture != local_architecture():
            return {}
        progress(f"host agent bundle for {image.image_id} ({image.architecture})")
        return publish_bundle(region, bucket, image.architecture)

    def set_ttl(self, record: SandboxRecord, expiry: datetime) -> None:
        """Move the sandbox's TTL schedule (`km extend`); the handler ignores the old time if it fires anyway."""
        region = record.region
        ensure_ttl_schedule(self._prefix(record), record.sandbox_id, expiry, self._ttl_target(region, account_id(region)), region)

    def _with_efs(self, region: str) -> OperatorConfig:
        """The configuration, with the EFS `km init` made when none is configured."""
        if self.config.efs_id:
            return self.config
        found = find_file_system(region, f"{self.prefix}-efs")
        return self.config.model_copy(update={"efs_id": found}) if found else self.config

    def _ttl_target(self, region: str, account: str) -> TtlTarget:
        return TtlTarget(
            f"arn:aws:lambda:{region}:{account}:function:{self.prefix}-ttl-handler",
            f"arn:aws:iam::{account}:role/{self.prefix}-ttl-scheduler",
        )

    def applied_plan(self, record: SandboxRecord) -> dict[str, Any] | None:
        """The plan the sandbox was last converged to, kept in S3 (to name the fields a new plan changes)."""
        bucket = record.resources.get("bucket")
        if not bucket:
            return None
        try:
            body = client("s3", record.region).get_object(Bucket=bucket, Key=applied_plan_key(record.sandbox_id))["Body"]
            return dict(json.loads(body.read()))
        except Exception as error:  # missing or unreadable: convergence still works from the hashes
            if is_aws_error(error) or isinstance(error, ValueError):
                return None
            raise

    def _save_applied_plan(self, region: str, bucket: str, sandbox_id: str, plan: dict[str, Any]) -> None:
        body = (json.dumps(plan, indent=2, sort_keys=True) + "\n").encode()
        client("s3", region).put_object(
            Bucket=bucket, Key=applied_plan_key(sandbox_id), Body=body, ContentType="application/json"
        )

    def apply_policy(self, record: SandboxRecord, compiled: PlanInput) -> SandboxRecord:
        """Live policy change through SSM: the compiled update rewrites host-agent.json, the environment and
        configFiles and reloads the daemon (no reboot); then the record and the TTL schedule follow."""
        status = self.observe(record)
        if status != "running":
            raise SubstrateError(f"{record.alias} ({record.sandbox_id}) is {status}; resume it before changing its policy")
        try:
            result = SsmChannel(record.region).run(self._instance_id(record), bash_script(compiled.policy_update), timeout=120)
        except ChannelError as error:
            raise SubstrateError(f"updating {record.alias} ({record.sandbox_id}) in place: {error}") from None
        if result.returncode != 0:
            detail = result.stderr.strip() or result.stdout.strip()
            raise SubstrateError(f"updating {record.alias} ({record.sandbox_id}) in place failed: {detail}")
        self._save_applied_plan(record.region, self._bucket(record), record.sandbox_id, compiled.plan)
        changes = policy_changes(record, compiled.plan)
        expiry = changes["ttl_expiry"]
        if isinstance(expiry, datetime):
            self.set_ttl(record, expiry)
        else:
            delete_ttl_schedule(self._prefix(record), record.sandbox_id, record.region)
        return self.store.update(record.sandbox_id, **changes)

    # ---- observe and lifecycle ------------------------------------------------------------------
    def observe(self, record: SandboxRecord) -> str:
        """The live status; a `starting` record whose creator is gone is a create that was killed (even if
        its instance runs: later steps may be missing), which convergence finishes."""
        if record.status == "starting":
            return "creating" if creator_alive(record) else "starting"
        if record.status in ("nocap", "failed", "destroying"):
            return record.status
        instance = find_instance(record.region, SandboxRef(record.sandbox_id, self._prefix(record)))
        if instance is None:
            return "failed"  # terminated behind km's back: convergence replaces it
        if instance.state in _LIVE:
            return "running"
        return record.status if record.status in ("stopped", "paused") else "stopped"

    def destroy(self, record: SandboxRecord, force: bool = False) -> None:
        if record.locked and not force:
            raise SubstrateError(f"{record.alias} ({record.sandbox_id}) is locked; `km unlock {record.alias}` first")
        self.store.update(record.sandbox_id, status="destroying")
        self._remove(record)
        self.store.delete(record.sandbox_id)

    def _remove(self, record: SandboxRecord) -> None:
        prefix = self._prefix(record)
        delete_ttl_schedule(prefix, record.sandbox_id, record.region)
        try:
            destroy_all(record.sandbox_id, record.region, prefix)
        except Ec2Error as error:
            raise SubstrateError(f"destroying {record.alias} ({record.sandbox_id}): {error}") from None

    def stop(self, record: SandboxRecord) -> SandboxRecord:
        self._refuse_locked(record)
        stop_instance(record.region, self._instance_id(record), hibernate=False)
        return self.store.update(record.sandbox_id, status="stopped")

    def pause(self, record: SandboxRecord) -> SandboxRecord:
        """Hibernate (memory kept on the root volume); an instance that cannot is stopped, and says so."""
        self._refuse_locked(record)
        outcome = stop_instance(record.region, self._instance_id(record), hibernate=True)
        return self.store.update(record.sandbox_id, status="paused" if outcome == "hibernated" else "stopped")

    def resume(self, record: SandboxRecord, progress: Progress = lambda _: None) -> SandboxRecord:
        try:
            start_instance(record.region, self._instance_id(record))
        except CapacityError as error:
            raise SubstrateError(f"resume {record.alias} ({record.sandbox_id}): no capacity: {error.aws_message}") from None
        progress(f"{record.sandbox_id}: starting")
        return self.store.update(record.sandbox_id, status="running")

    # ---- into the sandbox -----------------------------------------------------------------------
    def host_agent_command(
        self, record: SandboxRecord, args: list[str], input_text: str | None = None, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`km-host-agent ARGS` as root on the instance, through SSM Run Command."""
        if self.observe(record) != "running":
            raise SubstrateError(f"{record.alias} ({record.sandbox_id}) is not running; start it with `km resume {record.alias}`")
        script = host_agent_script(args, input_text)
        try:
            result = SsmChannel(record.region).run(self._instance_id(record), script, timeout=timeout or 120.0)
        except ChannelError as error:
            raise SubstrateError(str(error)) from None
        return subprocess.CompletedProcess(["km-host-agent", *args], result.returncode, result.stdout, result.stderr)

    def shell(self, record: SandboxRecord, command: list[str] | None, root: bool, working_dir: str, tty: bool) -> int:
        raise SubstrateError(
            f"km shell on ec2 goes through Session Manager: `aws ssm start-session --target {self._instance_id(record)}` "
            "(needs the session-manager-plugin)"
        )

    def attach_run_session(self, record: SandboxRecord, session: str) -> int:
        raise SubstrateError(
            f"attaching to {session} on ec2 goes through Session Manager: `aws ssm start-session --target "
            f"{self._instance_id(record)}`, then `tmux -S /run/km-agent/tmux.sock attach -t {session}`"
        )

    # ---- what the sandbox uploaded ---------------------------------------------------------------
    def agent_runs_dir(self, record: SandboxRecord) -> Path:
        """The sandbox's uploaded runs, mirrored from S3 (`agent-runs/<sandbox>/`)."""
        return self._mirror(record, f"agent-runs/{record.sandbox_id}/")

    def telemetry_dir(self, record: SandboxRecord) -> Path:
        """The sandbox's uploaded telemetry, mirrored from S3 (`telemetry/<sandbox>/<signal>/`)."""
        return self._mirror(record, f"telemetry/{record.sandbox_id}/")

    def _mirror(self, record: SandboxRecord, prefix: str) -> Path:
        """Download the objects under `prefix` not yet in the cache (files only ever appear whole)."""
        target = cache_root() / "artifacts" / prefix
        bucket = self._bucket(record)
        s3 = client("s3", record.region)
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                relative = str(item["Key"])[len(prefix) :]
                if not relative or ".." in relative.split("/"):
                    continue
                local = target / relative
                if local.is_file() and local.stat().st_size == item["Size"]:
                    continue
                local.parent.mkdir(parents=True, exist_ok=True)
                temporary = local.with_name(f".{local.name}.part")
                s3.download_file(bucket, item["Key"], str(temporary))
                temporary.replace(local)
        return target

    # ---- helpers --------------------------------------------------------------------------------
    def _bucket(self, record: SandboxRecord) -> str:
        """The artifacts bucket the sandbox was made with (the configured one for records that predate it)."""
        return record.resources.get("bucket") or self.config.bucket(account_id(record.region), record.region)

    def _prefix(self, record: SandboxRecord) -> str:
        return record.resources.get("resource_prefix", self.prefix)

    def _instance_id(self, record: SandboxRecord) -> str:
        instance_id = record.resources.get("instance_id")
        if not instance_id:
            instance = find_instance(record.region, SandboxRef(record.sandbox_id, self._prefix(record)))
            if instance is None:
                missing = f"{record.alias} ({record.sandbox_id}) has no instance"
                raise SubstrateError(f"{missing}; `km destroy {record.alias}` cleans up")
            instance_id = instance.instance_id
        return instance_id

    def _refuse_locked(self, record: SandboxRecord) -> None:
        if record.locked:
            raise SubstrateError(f"{record.alias} ({record.sandbox_id}) is locked; `km unlock {record.alias}` first")
