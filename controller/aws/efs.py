"""The shared EFS file system profiles mount (`spec.runtime.mountEFS`), made by `km init` when the
configuration names none: encrypted, one mount target per availability zone of the sandboxes' subnets,
behind a security group that admits NFS (2049/tcp) from the VPC only."""

from __future__ import annotations

import time

from controller.aws.clients import client
from controller.aws.config import OperatorConfig


def find_file_system(region: str, token: str) -> str | None:
    found = client("efs", region).describe_file_systems(CreationToken=token)["FileSystems"]
    return str(found[0]["FileSystemId"]) if found else None


def ensure_file_system(region: str, config: OperatorConfig) -> tuple[str, bool]:
    """(file system id, whether it was created now); mount targets are completed either way."""
    from controller.substrates.ec2.network import find_subnets, find_vpc

    token = f"{config.resource_prefix}-efs"
    efs = client("efs", region)
    file_system = find_file_system(region, token)
    created = file_system is None
    if file_system is None:
        made = efs.create_file_system(
            CreationToken=token,
            Encrypted=True,
            PerformanceMode="generalPurpose",
            Tags=[{"Key": "Name", "Value": token}, {"Key": "km:shared", "Value": "true"}],
        )
        file_system = str(made["FileSystemId"])
        _wait_available(region, file_system)
    vpc = find_vpc(region, config)
    group = _ensure_nfs_group(region, token, vpc.vpc_id, vpc.cidr_blocks)
    covered = {target["AvailabilityZoneName"] for target in efs.describe_mount_targets(FileSystemId=file_system)["MountTargets"]}
    for subnet in find_subnets(region, vpc, config):
        if subnet.availability_zone not in covered:
            efs.create_mount_target(FileSystemId=file_system, SubnetId=subnet.subnet_id, SecurityGroups=[group])
            covered.add(subnet.availability_zone)
    return file_system, created


def _wait_available(region: str, file_system: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        [found] = client("efs", region).describe_file_systems(FileSystemId=file_system)["FileSystems"]
        if found["LifeCycleState"] == "available":
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"EFS {file_system} still {found['LifeCycleState']} after {timeout:.0f} s")
        time.sleep(1)


def _ensure_nfs_group(region: str, name: str, vpc_id: str, cidrs: tuple[str, ...]) -> str:
    ec2 = client("ec2", region)
    found = ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc_id]}]
    )["SecurityGroups"]
    if found:
        return str(found[0]["GroupId"])
    group = str(
        ec2.create_security_group(GroupName=name, Description="km: NFS to the shared EFS from the VPC", VpcId=vpc_id)["GroupId"]
    )
    ec2.authorize_security_group_ingress(
        GroupId=group,
        IpPermissions=[{"IpProtocol": "tcp", "FromPort": 2049, "ToPort": 2049, "IpRanges": [{"CidrIp": cidr} for cidr in cidrs]}],
    )
    return group
