"""What can go wrong provisioning a sandbox on EC2, as types the caller can act on.

`CapacityError` is the one the caller treats differently: AWS had no capacity (or the account hit a
limit) for the requested instance, so the sandbox's status becomes `nocap` rather than `failed`; trying
again later, elsewhere or with another instance type may work.
"""

from __future__ import annotations

from controller.aws.clients import error_code

# Codes RunInstances/StartInstances return when the instance could be launched but AWS could not
# place it now, or the account's limits forbid it; none of them is a mistake in the request itself.
CAPACITY_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "InsufficientReservedInstanceCapacity",
        "MaxSpotInstanceCountExceeded",
        "SpotMaxPriceTooLow",
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
    }
)


class Ec2Error(Exception):
    """An EC2 or IAM step failed; the message names the resource, the cause and the fix."""


class CapacityError(Ec2Error):
    """AWS could not provide the instance now (capacity or an account limit); carries AWS's own words."""

    def __init__(self, code: str, aws_message: str, what: str) -> None:
        super().__init__(f"{what}: {code}: {aws_message}")
        self.code = code
        self.aws_message = aws_message


def is_aws_error(error: BaseException, *codes: str) -> bool:
    """Whether `error` is an AWS error response with one of `codes` (any code when none are given)."""
    code = error_code(error)
    return code is not None and (not codes or code in codes)


def aws_message(error: BaseException) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Message") or "")
    return str(error)


def as_capacity_error(error: BaseException, what: str) -> CapacityError | None:
    """The `CapacityError` an AWS error stands for, or None when it is some other failure."""
    code = error_code(error)
    if code in CAPACITY_CODES:
        return CapacityError(code, aws_message(error), what)
    return None


def as_ec2_error(error: BaseException, what: str, fix: str = "") -> Ec2Error:
    """One operator-readable line for a failed AWS call: what km was doing, AWS's code and words, the fix."""
    capacity = as_capacity_error(error, what)
    if capacity is not None:
        return capacity
    code = error_code(error) or type(error).__name__
    suffix = f"; {fix}" if fix else ""
    return Ec2Error(f"{what}: {code}: {aws_message(error)}{suffix}")
