"""Constrained value types used by the schema, each with an error message that says how to fix it.

These check one value in isolation (is this a region, a path, a DNS suffix?). Rules that relate two
fields live in `rules.py`.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from typing import Annotated

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

from controller.profile.durations import DurationError, parse_duration
from host_agent.dnsnames import normalise_dns_name

AMI_SLUGS = ("amazon-linux-2023", "ubuntu-24.04", "ubuntu-22.04", "debian-12")

_REGION = re.compile(
    r"[a-z]{2}(-gov|-iso[a-z]?)?-(north|south|east|west|central|northeast|northwest|southeast|southwest)-\d{1,2}"
)
_AMI_ID = re.compile(r"ami-[0-9a-f]{8,17}")
_INSTANCE_TYPE = re.compile(r"[a-z][a-z0-9-]*\.[a-z0-9]+")
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_SHELL_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_GITHUB_OWNER = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})"
_GITHUB_REPO = re.compile(rf"(?:{_GITHUB_OWNER}/(?:\*|[A-Za-z0-9._-]{{1,100}}))|\*")
_SSM_PATH = re.compile(r"/[A-Za-z0-9_./-]+")
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PREFIX = re.compile(r"[a-z][a-z0-9]{0,11}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_./-]{0,61}[A-Za-z0-9])?")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


def _fail(message: str) -> PydanticCustomError:
    return PydanticCustomError("km_value", message)


def _check_duration(text: str) -> str:
    try:
        seconds = parse_duration(text)
    except DurationError as exc:
        raise _fail(str(exc)) from None
    if seconds == 0:
        raise _fail('"0" is only allowed for lifecycle.ttl (no automatic teardown); give a positive duration')
    return text


def _check_ttl(text: str) -> str:
    try:
        parse_duration(text)
    except DurationError as exc:
        raise _fail(f'{exc}, or "0" for no automatic teardown') from None
    return text


def _check_region(text: str) -> str:
    if not _REGION.fullmatch(text):
        raise _fail(f"{text!r} is not an AWS region name; write one like us-east-1 or eu-west-2")
    return text


def _check_absolute_path(text: str) -> str:
    if not text.startswith("/"):
        raise _fail(f"{text!r} must be an absolute path (start with /)")
    if any(ord(char) < 32 or char == "\x7f" for char in text):
        raise _fail("a path cannot contain control characters (newlines, tabs, NUL, ...)")
    stripped = text.rstrip("/") or "/"
    normal = "/" + posixpath.normpath(stripped).lstrip("/")
    if stripped != normal:
        raise _fail(f"{text!r} is not a normalised path; write {normal!r}")
    return text


def _check_ami(text: str) -> str:
    """An EC2 slug or id, or a local image recipe (amis/*.yaml: the local substrate bakes any of them; EC2
    refuses a name it cannot map when it creates the sandbox)."""
    from controller.images.recipe import recipe_names  # the recipe module imports this package

    if text in AMI_SLUGS or _AMI_ID.fullmatch(text) or text in recipe_names():
        return text
    slugs = ", ".join(dict.fromkeys([*AMI_SLUGS, *recipe_names()]))
    raise _fail(f"{text!r} is not an image: use one of {slugs} or an id like ami-0123456789abcdef0")


def _check_instance_type(text: str) -> str:
    if not _INSTANCE_TYPE.fullmatch(text):
        raise _fail(f"{text!r} is not an EC2 instance type; write one like t3.medium")
    return text


def _check_dns_name(text: str, what: str) -> str:
    try:
        name = normalise_dns_name(text)
    except UnicodeError:
        raise _fail(f"{text!r} is not a valid {what}; write it like .github.com or api.github.com") from None
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise _fail(f"{text!r} is not a valid {what}; write it like .github.com or api.github.com")
    return text


def _check_dns_suffix(text: str) -> str:
    if text == "*":
        return text
    if "*" in text:
        raise _fail(
            f"{text!r}: wildcards are implicit in a suffix; write {text.replace('*', '').lstrip('.')!r} or '*' for every name"
        )
    _check_dns_name(text.lstrip("."), "DNS suffix")
    return text


def _check_host(text: str) -> str:
    if "*" in text:
        raise _fail(f"{text!r}: allowedHosts are exact names; put wildcard domains in allowedDNSSuffixes")
    if "://" in text or "/" in text or ":" in text:
        raise _fail(f"{text!r}: write only the host name, without scheme, port or path")
    return _check_dns_name(text, "host name")


def _check_cidr(text: str) -> str:
    try:
        ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise _fail(f"{text!r} is not a CIDR block; write one like 10.20.0.0/16 or 2001:db8::/32") from None
        raise _fail(f"{text!r} has host bits set; write {str(network)!r}") from None
    return text


def _check_github_repo(text: str) -> str:
    if not _GITHUB_REPO.fullmatch(text):
        raise _fail(f"{text!r} is not a repository pattern; write owner/repo, owner/* or *")
    return text


def _check_ref_glob(text: str) -> str:
    problem = ref_glob_problem(text)
    if problem:
        raise _fail(f"{text!r} is not a valid ref glob: {problem}")
    return text


def ref_glob_problem(text: str) -> str | None:
    """Why `text` cannot match any git ref name, or None. Git's check-ref-format rules, with `*?[]` allowed."""
    if not text:
        return "it is empty"
    if text.startswith("/") or text.endswith("/") or "//" in text:
        return "slashes must separate non-empty components"
    if ".." in text or "@{" in text or text == "@":
        return "'..' and '@{' are not allowed in ref names"
    if any(ord(char) < 32 or char in " ~^:\\\x7f" for char in text):
        return "spaces, control characters and ~ ^ : \\ are not allowed in ref names"
    if text.endswith(".") or text.endswith(".lock") or any(part.startswith(".") for part in text.split("/")):
        return "components cannot start with '.' or end with '.' or '.lock'"
    depth = 0
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if depth not in (0, 1):
            return "brackets are unbalanced"
    if depth:
        return "brackets are unbalanced"
    return None


def _check_shell_identifier(text: str) -> str:
    if not _SHELL_IDENTIFIER.fullmatch(text):
        raise _fail(f"{text!r} is not a valid environment variable name (letters, digits, _; not starting with a digit)")
    return text


def _check_ssm_path(text: str) -> str:
    if not _SSM_PATH.fullmatch(text):
        raise _fail(f"{text!r} is not an SSM parameter path; write one like /my-team/api-key")
    return text


def _check_name(text: str) -> str:
    if not _NAME.fullmatch(text):
        raise _fail(f"{text!r}: names are lower-case letters, digits and '-', up to 63 characters")
    return text


def _check_prefix(text: str) -> str:
    if not _PREFIX.fullmatch(text):
        raise _fail(f"{text!r}: a prefix is a lower-case letter then up to 11 lower-case letters or digits")
    return text


def _check_label_key(text: str) -> str:
    if not _LABEL_KEY.fullmatch(text):
        raise _fail(f"{text!r} is not a label key (letters, digits, '-', '_', '.', '/'; up to 63 characters)")
    return text


def _check_email(text: str) -> str:
    if not _EMAIL.fullmatch(text):
        raise _fail(f"{text!r} is not an email address")
    return text


Duration = Annotated[str, AfterValidator(_check_duration)]
TTL = Annotated[str, AfterValidator(_check_ttl)]
Region = Annotated[str, AfterValidator(_check_region)]
AbsolutePath = Annotated[str, AfterValidator(_check_absolute_path)]
AmiRef = Annotated[str, AfterValidator(_check_ami)]
InstanceType = Annotated[str, AfterValidator(_check_instance_type)]
DNSSuffix = Annotated[str, AfterValidator(_check_dns_suffix)]
HostName = Annotated[str, AfterValidator(_check_host)]
CIDR = Annotated[str, AfterValidator(_check_cidr)]
GitHubRepoPattern = Annotated[str, AfterValidator(_check_github_repo)]
RefGlob = Annotated[str, AfterValidator(_check_ref_glob)]
ShellIdentifier = Annotated[str, AfterValidator(_check_shell_identifier)]
SSMPath = Annotated[str, AfterValidator(_check_ssm_path)]
ProfileName = Annotated[str, AfterValidator(_check_name)]
SandboxPrefix = Annotated[str, AfterValidator(_check_prefix)]
LabelKey = Annotated[str, AfterValidator(_check_label_key)]
EmailAddress = Annotated[str, AfterValidator(_check_email)]
