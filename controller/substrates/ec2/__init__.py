"""The ec2 substrate's resource steps: small idempotent functions, each finding its resource by tag first.

`ensure_sandbox` converges all of them for a compiled plan; `destroy_all` removes them again.
"""

from controller.substrates.ec2.errors import CapacityError, Ec2Error, as_capacity_error
from controller.substrates.ec2.iam import delete_instance_profile, delete_role, ensure_instance_profile, ensure_role
from controller.substrates.ec2.images import Image, architecture_for, resolve_ami
from controller.substrates.ec2.instances import (
    Instance,
    describe_instance,
    ensure_instance,
    find_instance,
    launch_instance,
    start_instance,
    stop_instance,
    terminate_and_wait,
)
from controller.substrates.ec2.network import Subnet, Vpc, delete_security_group, ensure_security_group, find_subnets, find_vpc
from controller.substrates.ec2.polling import Polling
from controller.substrates.ec2.provision import SandboxResources, ensure_sandbox
from controller.substrates.ec2.shape import DataVolume, Ec2Plan, ec2_plan
from controller.substrates.ec2.tags import SandboxRef, SandboxTags, find_by_tag
from controller.substrates.ec2.teardown import Removed, TeardownIncomplete, destroy_all
from controller.substrates.ec2.volumes import ensure_data_volume

__all__ = [
    "CapacityError",
    "DataVolume",
    "Ec2Error",
    "Ec2Plan",
    "Image",
    "Instance",
    "Polling",
    "Removed",
    "SandboxRef",
    "SandboxResources",
    "SandboxTags",
    "Subnet",
    "TeardownIncomplete",
    "Vpc",
    "architecture_for",
    "as_capacity_error",
    "delete_instance_profile",
    "delete_role",
    "delete_security_group",
    "describe_instance",
    "destroy_all",
    "ec2_plan",
    "ensure_data_volume",
    "ensure_instance",
    "ensure_instance_profile",
    "ensure_role",
    "ensure_sandbox",
    "ensure_security_group",
    "find_by_tag",
    "find_instance",
    "find_subnets",
    "find_vpc",
    "launch_instance",
    "resolve_ami",
    "start_instance",
    "stop_instance",
    "terminate_and_wait",
]
