"""`amis/files/yum-apt.sh`, the yum/dnf front end over apt, run for real by bash against a fake apt-get.

The fake records each call; PATH puts it first and keeps /usr/bin after it, so everything else the
script uses (find, head) is the real thing. Whether `install` runs `apt-get update` first depends on
/var/lib/apt/lists being modified in the last hour: the tests that care either compute that from this
host the way the script does, or shadow `find` with a fake that answers fresh or stale.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SHIM = REPO_ROOT / "amis" / "files" / "yum-apt.sh"
APT_LISTS = Path("/var/lib/apt/lists")
GOOSE_PACKAGES = ["git", "nodejs", "npm", "python3", "jq", "tmux"]
INSTALL = ["install", "-y", "-q", "--no-install-recommends"]
UPDATE = ["update", "-q"]

FAKE_APT_GET = r"""#!/bin/bash
line=""
for argument in "$@"; do line+="$argument"$'\x1f'; done
printf '%s\x1e%s\n' "$line" "${DEBIAN_FRONTEND-unset}" >> "$FAKE_APT_LOG"
case " ${FAKE_APT_FAIL-} " in *" $1 "*) exit "${FAKE_APT_EXIT:-100}" ;; esac
exit 0
"""

# Answers the script's freshness question without looking at the host; records how it was asked.
FAKE_FIND = r"""#!/bin/bash
printf '%s\n' "$*" >> "$FAKE_FIND_LOG"
[ "${FAKE_LISTS_FRESH-}" = 1 ] && echo /var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages
exit 0
"""


@dataclass
class Result:
    returncode: int
    stderr: str
    calls: list[list[str]]  # apt-get argument lists, in order
    frontends: list[str]  # DEBIAN_FRONTEND each apt-get call saw
    find_calls: list[str]


class Shim:
    """Runs the script as `yum` or `dnf` (symlinks to it) with a fake apt-get first on PATH."""

    def __init__(self, tmp_path: Path) -> None:
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.log = tmp_path / "apt-get.log"
        self.find_log = tmp_path / "find.log"
        (self.bin / "apt-get").write_text(FAKE_APT_GET)
        (self.bin / "apt-get").chmod(0o755)
        for name in ("yum", "dnf"):
            (self.bin / name).symlink_to(SHIM)
        self.fake_find_bin = tmp_path / "fake-find"
        self.fake_find_bin.mkdir()
        (self.fake_find_bin / "find").write_text(FAKE_FIND)
        (self.fake_find_bin / "find").chmod(0o755)

    def run(self, command: str, *args: str, lists: str = "host", fail: str = "", exit_code: int = 100) -> Result:
        """`lists`: "host" (the real find on this host's apt lists), "fresh" or "stale" (a fake find)."""
        self.log.write_text("")
        self.find_log.write_text("")
        path = [str(self.bin)] + ([str(self.fake_find_bin)] if lists != "host" else []) + ["/usr/bin", "/bin"]
        env = {
            "PATH": ":".join(path),
            "LC_ALL": "C",
            "FAKE_APT_LOG": str(self.log),
            "FAKE_FIND_LOG": str(self.find_log),
            "FAKE_LISTS_FRESH": "1" if lists == "fresh" else "0",
            "FAKE_APT_FAIL": fail,
            "FAKE_APT_EXIT": str(exit_code),
        }
        completed = subprocess.run(
            ["bash", str(self.bin / command), *args], env=env, capture_output=True, text=True, timeout=30, check=False
        )
        calls, frontends = [], []
        for line in self.log.read_text().split("\n")[:-1]:
            arguments, frontend = line.split("\x1e")
            calls.append(arguments.split("\x1f")[:-1])
            frontends.append(frontend)
        return Result(completed.returncode, completed.stderr, calls, frontends, self.find_log.read_text().splitlines())


@pytest.fixture
def shim(tmp_path: Path) -> Shim:
    return Shim(tmp_path)


def host_lists_fresh() -> bool:
    """The script's own test, in Python: any *Packages* file in the apt lists modified in the last 60 minutes."""
    if not APT_LISTS.is_dir():
        return False
    cutoff = time.time() - 60 * 60
    return any("Packages" in entry.name and entry.stat().st_mtime > cutoff for entry in APT_LISTS.iterdir())


# ---- install -----------------------------------------------------------------------------------


def test_the_goose_init_command_updates_once_then_installs_without_recommends(shim: Shim) -> None:
    """Uses the host's real apt lists: which branch runs depends on this machine (the fake-find tests pin both)."""
    fresh = host_lists_fresh()
    result = shim.run("yum", "install", "-y", *GOOSE_PACKAGES)
    assert result.returncode == 0, result.stderr
    assert result.calls == ([] if fresh else [UPDATE]) + [INSTALL + GOOSE_PACKAGES]
    assert set(result.frontends) == {"noninteractive"}


def test_stale_lists_are_updated_first(shim: Shim) -> None:
    result = shim.run("yum", "install", "-y", *GOOSE_PACKAGES, lists="stale")
    assert result.returncode == 0, result.stderr
    assert result.calls == [UPDATE, INSTALL + GOOSE_PACKAGES]


def test_fresh_lists_are_not_updated_again(shim: Shim) -> None:
    result = shim.run("yum", "install", "-y", *GOOSE_PACKAGES, lists="fresh")
    assert result.returncode == 0, result.stderr
    assert result.calls == [INSTALL + GOOSE_PACKAGES]


def test_freshness_means_a_packages_list_changed_in_the_last_hour(shim: Shim) -> None:
    shim.run("yum", "install", "-y", "git", lists="stale")
    [asked] = shim.find_log.read_text().splitlines()
    assert asked.split() == ["/var/lib/apt/lists", "-maxdepth", "1", "-name", "*Packages*", "-mmin", "-60"]


@pytest.mark.parametrize(
    ("yum_name", "debian_name"),
    [
        ("gcc-c++", "g++"),
        ("openssl-devel", "libssl-dev"),
        ("python3-devel", "python3-dev"),
        ("zlib-devel", "zlib1g-dev"),
        ("libcurl-devel", "libcurl4-openssl-dev"),
        ("which", "debianutils"),
        ("procps-ng", "procps"),
        ("bind-utils", "dnsutils"),
        ("nc", "netcat-openbsd"),
        ("golang", "golang-go"),
        ("java-17-amazon-corretto", "openjdk-17-jdk-headless"),
        ("git", "git"),
        ("python3-pip", "python3-pip"),
    ],
)
def test_amazon_linux_names_become_debian_names(shim: Shim, yum_name: str, debian_name: str) -> None:
    result = shim.run("yum", "install", "-y", yum_name, lists="fresh")
    assert result.returncode == 0, result.stderr
    assert result.calls == [INSTALL + [debian_name]]


def test_names_are_translated_in_place_keeping_the_order(shim: Shim) -> None:
    result = shim.run("yum", "install", "-y", "make", "gcc-c++", "openssl-devel", "git", lists="fresh")
    assert result.calls == [INSTALL + ["make", "g++", "libssl-dev", "git"]]


def test_packages_not_needed_on_debian_are_skipped_with_a_message(shim: Shim) -> None:
    result = shim.run("yum", "install", "-y", "git", "amazon-efs-utils", "jq", lists="stale")
    assert result.returncode == 0, result.stderr
    assert result.calls == [UPDATE, INSTALL + ["git", "jq"]]
    assert "yum (km): skipping amazon-efs-utils (not needed on this image)" in result.stderr


@pytest.mark.parametrize("lists", ["fresh", "stale"])
def test_only_skipped_packages_install_nothing_and_succeed(shim: Shim, lists: str) -> None:
    result = shim.run("yum", "install", "-y", "amazon-efs-utils", "amazon-ssm-agent", "cloud-init", lists=lists)
    assert result.returncode == 0, result.stderr
    assert result.calls == []
    for package in ("amazon-efs-utils", "amazon-ssm-agent", "cloud-init"):
        assert f"skipping {package}" in result.stderr


@pytest.mark.parametrize("package", ["efs-utils", "amazon-efs", "amazon-efs-utils2", "cloud"])
def test_only_whole_names_are_skipped(shim: Shim, package: str) -> None:
    result = shim.run("yum", "install", "-y", package, lists="fresh")
    assert result.calls == [INSTALL + [package]]
    assert "skipping" not in result.stderr


def test_dnf_is_the_same_front_end(shim: Shim) -> None:
    as_yum = shim.run("yum", "install", "-y", "gcc-c++", "amazon-efs-utils", "git", lists="stale")
    as_dnf = shim.run("dnf", "install", "-y", "gcc-c++", "amazon-efs-utils", "git", lists="stale")
    assert as_dnf.returncode == as_yum.returncode == 0
    assert as_dnf.calls == as_yum.calls == [UPDATE, INSTALL + ["g++", "git"]]


def test_reinstall_installs(shim: Shim) -> None:
    assert shim.run("yum", "reinstall", "-y", "git", lists="fresh").calls == [INSTALL + ["git"]]


@pytest.mark.parametrize(
    "arguments",
    [
        ["-y", "install", "git"],
        ["install", "git", "-y"],
        ["--assumeyes", "install", "git"],
        ["install", "-q", "--quiet", "-y", "git"],
        ["install", "-y", "--nogpgcheck", "--allowerasing", "--skip-broken", "--best", "git"],
        ["install", "-y", "--setopt=install_weak_deps=False", "git"],
    ],
    ids=["option first", "option last", "assumeyes", "quiet", "harmless flags", "setopt"],
)
def test_accepted_options_are_dropped_wherever_they_are(shim: Shim, arguments: list[str]) -> None:
    result = shim.run("yum", *arguments, lists="fresh")
    assert result.returncode == 0, result.stderr
    assert result.calls == [INSTALL + ["git"]]


# ---- other subcommands -------------------------------------------------------------------------


@pytest.mark.parametrize("subcommand", ["update", "upgrade"])
def test_update_without_packages_upgrades_everything(shim: Shim, subcommand: str) -> None:
    result = shim.run("yum", subcommand, "-y", lists="fresh")
    assert result.returncode == 0, result.stderr
    assert result.calls == [UPDATE, ["upgrade", "-y", "-q"]]


def test_update_with_packages_upgrades_only_those(shim: Shim) -> None:
    result = shim.run("yum", "update", "-y", "git", "curl", lists="fresh")
    assert result.returncode == 0, result.stderr
    assert result.calls == [UPDATE, ["install", "-y", "-q", "--only-upgrade", "git", "curl"]]


@pytest.mark.parametrize("subcommand", ["remove", "erase"])
def test_remove(shim: Shim, subcommand: str) -> None:
    result = shim.run("yum", subcommand, "-y", "git", "tmux")
    assert result.returncode == 0, result.stderr
    assert result.calls == [["remove", "-y", "-q", "git", "tmux"]]


def test_makecache_updates_the_lists(shim: Shim) -> None:
    result = shim.run("yum", "makecache", lists="fresh")
    assert result.returncode == 0, result.stderr
    assert result.calls == [UPDATE]


def test_clean_all_cleans(shim: Shim) -> None:
    result = shim.run("yum", "clean", "all")
    assert result.returncode == 0, result.stderr
    assert result.calls == [["clean"]]


def test_remove_and_update_translate_names_like_install(shim: Shim) -> None:
    assert shim.run("yum", "remove", "-y", "gcc-c++").calls == [["remove", "-y", "-q", "g++"]]
    assert shim.run("yum", "update", "-y", "openssl-devel", "amazon-ssm-agent").calls == [
        UPDATE,
        ["install", "-y", "-q", "--only-upgrade", "libssl-dev"],
    ]


# ---- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments",
    [["groupinstall", "-y", "Development Tools"], ["list", "installed"], ["check-update"], ["info", "git"], []],
    ids=["groupinstall", "list", "check-update", "info", "no subcommand"],
)
def test_an_unsupported_subcommand_fails_loudly(shim: Shim, arguments: list[str]) -> None:
    result = shim.run("yum", *arguments, lists="fresh")
    assert result.returncode == 2
    assert result.calls == []
    subcommand = arguments[0] if arguments else ""
    assert f"'{subcommand}' is not supported; use install, update, remove, makecache or clean" in result.stderr


@pytest.mark.parametrize("option", ["--enablerepo=epel", "-e", "--disablerepo=*", "-x"])
def test_an_unsupported_option_fails_loudly_before_anything_runs(shim: Shim, option: str) -> None:
    result = shim.run("yum", "install", "-y", option, "git", lists="stale")
    assert result.returncode == 2
    assert result.calls == []
    assert f"yum (km apt front end): option {option} is not supported" in result.stderr


# ---- exit status -------------------------------------------------------------------------------


@pytest.mark.parametrize("lists", ["fresh", "stale"])
def test_a_failed_install_is_the_exit_status(shim: Shim, lists: str) -> None:
    result = shim.run("yum", "install", "-y", "git", lists=lists, fail="install")
    assert result.returncode == 100
    assert result.calls[-1] == INSTALL + ["git"]


def test_a_failed_update_stops_before_installing(shim: Shim) -> None:
    result = shim.run("yum", "install", "-y", "git", lists="stale", fail="update", exit_code=101)
    assert result.returncode == 101
    assert result.calls == [UPDATE]


@pytest.mark.parametrize(
    ("arguments", "fail"),
    [
        (["update", "-y"], "update"),
        (["update", "-y"], "upgrade"),
        (["update", "-y", "git"], "install"),
        (["remove", "-y", "git"], "remove"),
        (["makecache"], "update"),
        (["clean", "all"], "clean"),
    ],
)
def test_every_subcommand_passes_apt_gets_failure_on(shim: Shim, arguments: list[str], fail: str) -> None:
    result = shim.run("dnf", *arguments, fail=fail, exit_code=100)
    assert result.returncode == 100
    assert result.calls[-1][0] == fail


def test_the_script_is_bash_with_strict_mode() -> None:
    """The recipe installs it executable as /usr/local/bin/yum; without `set -e` a failed update would install anyway."""
    lines = SHIM.read_text().splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "set -euo pipefail" in lines
