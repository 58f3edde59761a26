"""The first-boot script: valid bash, exact bytes for files and environment, initCommands in order, sudo only when privileged.

The script's own helpers are run for real (extracted from the rendered text, pointed at a temporary
directory), so these tests check what bash does with the script, not what the script looks like.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from controller.compiler import compile_profile
from controller.compiler.userdata import PROFILE_ENV_PATH, profile_env_script
from controller.profile import BUILTIN_PROFILES_DIR, SandboxProfile, load_profile
from controller.profile.catalog import builtin_profiles
from tests.helpers import goose_variant

GOOSE_FILE = BUILTIN_PROFILES_DIR / "goose.yaml"
CREATABLE = [entry.name for entry in builtin_profiles() if not entry.abstract]
WRITE_FILE_FUNCTION = re.compile(r"^km_write_file\(\) \{.*?^\}$", re.MULTILINE | re.DOTALL)
OWNER = f"{os.getuid()}:{os.getgid()}"

TRICKY_VALUES = {
    "QUOTES": 'a\'b "c" $HOME \\\\ ;rm -rf /',
    "EMPTY": "",
    "SUBSTITUTIONS": "`id` $(id) ${HOME} $((1+1))",
    "NEWLINES": "line one\nline two\n",
    "DELIMITER": "x\nKM_EOF\ny",
    "SPACES": "  leading and trailing  ",
    "TABS": "tab\there",
    "DASH": "-n",
    "GLOB": "* ? [a-z] ~",
    "UNICODE": "ünïcødé ✓ 日本",
    "BANG": "!! !$ history",
    "PERCENT": "%s %d %%",
}


def write_file_function(userdata: str) -> str:
    match = WRITE_FILE_FUNCTION.search(userdata)
    assert match, "the prelude defines km_write_file"
    return match.group(0)


def write_command(userdata: str, path: str) -> str:
    """The `km_write_file <path> …` command for `path`, with its here-document if it has one."""
    quoted = re.escape(shlex.quote(path))
    pattern = re.compile(
        rf"^[ \t]*km_write_file {quoted} \S+ \S+(?: <<'(?P<delimiter>\w+)'\n(?:.*?\n)??(?P=delimiter)$| \S*)$",
        re.MULTILINE | re.DOTALL,
    )
    matches = list(pattern.finditer(userdata))
    assert len(matches) == 1, f"exactly one km_write_file for {path}"
    return matches[0].group(0).lstrip(" \t")


def run_write(userdata: str, path: str, target: Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run the script's own km_write_file command for `path`, redirected to `target` and owned by us."""
    command = write_command(userdata, path)
    first_line, _, rest = command.partition("\n")
    parts = first_line.split(" ")
    assert parts[:2] == ["km_write_file", shlex.quote(path)]
    parts[1] = shlex.quote(str(target))
    parts[3] = OWNER
    script = write_file_function(userdata) + "\n" + " ".join(parts) + ("\n" + rest if rest else "") + "\n"
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], input=stdin, capture_output=True, check=False, timeout=30)


def env_of(path: Path, keys: list[str], shell: str = "bash") -> dict[str, str]:
    """Source `path` in `shell` and read back each variable's exact value (NUL-separated)."""
    reads = "; ".join(f'printf "%s\\0" "${key}"' for key in keys)
    result = subprocess.run(
        [shell, "-c", f". {shlex.quote(str(path))}; {reads}"],
        capture_output=True,
        check=True,
        timeout=30,
        env={"PATH": os.environ["PATH"], "HOME": "/home/tester"},
    )
    values = result.stdout.decode("utf-8").split("\0")
    assert values[-1] == ""
    return dict(zip(keys, values[:-1]))


@pytest.mark.parametrize("name", CREATABLE)
def test_userdata_of_every_builtin_profile_is_valid_bash(tmp_path: Path, name: str) -> None:
    profile, _ = load_profile(name)
    script = tmp_path / "userdata.sh"
    script.write_text(compile_profile(profile).userdata, encoding="utf-8")
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert script.read_text(encoding="utf-8").startswith("#!/bin/bash\n")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("name", CREATABLE)
def test_userdata_of_every_builtin_profile_passes_shellcheck(tmp_path: Path, name: str) -> None:
    profile, _ = load_profile(name)
    script = tmp_path / "userdata.sh"
    script.write_text(compile_profile(profile).userdata, encoding="utf-8")
    result = subprocess.run(
        ["shellcheck", "--shell=bash", "--severity=warning", str(script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


def test_userdata_with_hostile_content_is_valid_bash(tmp_path: Path) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["execution"]["env"].update(TRICKY_VALUES)
        spec["execution"]["configFiles"] = {"/etc/km-test/eof.txt": "KM_EOF\n'\"$(id)\n", "/etc/km-test/raw": "no newline'\""}
        spec["execution"]["initCommands"] = ["echo 'it''s' \"$HOME\" | cat", "KM_EOF=1 true", "true # KM_EOF"]

    script = tmp_path / "userdata.sh"
    script.write_text(compile_profile(goose_variant(tmp_path, edit)).userdata, encoding="utf-8")
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_profile_env_script_keeps_values_exactly(tmp_path: Path, shell: str) -> None:
    """/etc/profile.d is read by bash and by POSIX sh login shells alike."""
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    env_file = tmp_path / "km-profile-env.sh"
    env_file.write_text(profile_env_script(TRICKY_VALUES), encoding="utf-8")
    assert env_of(env_file, list(TRICKY_VALUES), shell) == TRICKY_VALUES


def test_profile_env_survives_the_boot_script(tmp_path: Path) -> None:
    """The environment file as the boot script writes it (here-document or base64), then sourced."""
    values = {**TRICKY_VALUES, "CR": "carriage\rreturn"}

    def edit(spec: dict[str, Any]) -> None:
        spec["execution"]["env"] = values

    profile = goose_variant(tmp_path, edit)
    assert dict(profile.spec.execution.env) == values
    userdata = compile_profile(profile).userdata
    target = tmp_path / "km-profile-env.sh"
    result = run_write(userdata, PROFILE_ENV_PATH, target)
    assert result.returncode == 0, result.stderr
    bedrock = {"CLAUDE_CODE_USE_BEDROCK": "1", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    expected = {**bedrock, **values}
    assert env_of(target, list(expected)) == expected


def test_profile_env_overrides_bedrock_env_in_the_boot_script(tmp_path: Path) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["execution"]["env"] = {"AWS_REGION": "eu-west-1"}

    userdata = compile_profile(goose_variant(tmp_path, edit)).userdata
    target = tmp_path / "km-profile-env.sh"
    assert run_write(userdata, PROFILE_ENV_PATH, target).returncode == 0
    text = target.read_text(encoding="utf-8")
    assert text.count("AWS_REGION=") == 1
    assert env_of(target, ["AWS_REGION", "CLAUDE_CODE_USE_BEDROCK"]) == {
        "AWS_REGION": "eu-west-1",
        "CLAUDE_CODE_USE_BEDROCK": "1",
    }


def test_no_bedrock_env_without_use_bedrock(tmp_path: Path) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["execution"]["useBedrock"] = False

    userdata = compile_profile(goose_variant(tmp_path, edit)).userdata
    target = tmp_path / "km-profile-env.sh"
    assert run_write(userdata, PROFILE_ENV_PATH, target).returncode == 0
    assert "BEDROCK" not in target.read_text(encoding="utf-8")
    assert env_of(target, ["GOOSE_PROVIDER"]) == {"GOOSE_PROVIDER": "aws_bedrock"}


CONFIG_FILES = {
    "/etc/km-test/plain.txt": "hello\nworld\n",
    "/etc/km-test/no-newline.txt": "no trailing newline",
    "/etc/km-test/delimiter.txt": "before\nKM_EOF\nKM_EOF_\nafter\n",
    "/etc/km-test/delimiter-last.txt": "before\nKM_EOF",
    "/etc/km-test/specials.txt": "$HOME `id` $(whoami) \\ 'single' \"double\" ${X:-y}\n\tindented with a tab\n",
    "/etc/km-test/crlf.txt": "windows\r\nline endings\r\n",
    "/etc/km-test/unicode.txt": "ünïcødé ✓ 日本\n",
    "/etc/km-test/blank-lines.txt": "\n\n\n",
    "/etc/km-test/one-newline.txt": "\n",
    "/etc/km-test/trailing-space.txt": "trailing space \nKM_EOF \n",
    "/etc/km-test/backslash-newline.txt": "continued \\\nline\\",
}


@pytest.mark.parametrize("path", list(CONFIG_FILES))
def test_config_files_are_reproduced_byte_exactly(tmp_path: Path, path: str) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["execution"]["configFiles"] = CONFIG_FILES

    profile = goose_variant(tmp_path, edit)
    assert dict(profile.spec.execution.config_files) == CONFIG_FILES
    userdata = compile_profile(profile).userdata
    target = tmp_path / "out" / Path(path).name
    result = run_write(userdata, path, target)
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == CONFIG_FILES[path].encode("utf-8")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir() if p.name.endswith(".km-tmp")] == []


def test_carriage_returns_in_content_never_reach_the_script_raw(tmp_path: Path) -> None:
    """Content with CR goes base64: the script stays plain LF text whatever the files hold."""

    def edit(spec: dict[str, Any]) -> None:
        spec["execution"]["configFiles"] = CONFIG_FILES
        spec["execution"]["env"] = {"CR": "carriage\rreturn"}
        spec["execution"]["initCommands"] = ["printf 'a\rb'"]

    assert "\r" not in compile_profile(goose_variant(tmp_path, edit)).userdata


def test_goose_settings_file_is_reproduced_byte_exactly(tmp_path: Path) -> None:
    profile, _ = load_profile(GOOSE_FILE)
    userdata = compile_profile(profile).userdata
    target = tmp_path / "settings.json"
    assert run_write(userdata, "/home/sandbox/.claude/settings.json", target).returncode == 0
    assert target.read_bytes() == b'{"trustedDirectories":["/home/sandbox","/workspace"]}\n'


def test_host_agent_config_in_the_boot_script_is_the_compiled_one(tmp_path: Path) -> None:
    profile, _ = load_profile(GOOSE_FILE)
    compiled = compile_profile(profile)
    target = tmp_path / "host-agent.json"
    assert run_write(compiled.userdata, "/etc/km/host-agent.json", target).returncode == 0
    assert target.read_text(encoding="utf-8") == compiled.files()["host-agent.json"]


def test_empty_config_file_is_written_empty_whatever_stdin_holds(tmp_path: Path) -> None:
    """Empty content must stay an (empty) argument: with three arguments km_write_file copies stdin instead."""

    def edit(spec: dict[str, Any]) -> None:
        spec["execution"]["configFiles"] = {"/etc/km-test/empty": ""}

    userdata = compile_profile(goose_variant(tmp_path, edit)).userdata
    target = tmp_path / "empty"
    result = run_write(userdata, "/etc/km-test/empty", target, stdin=b"whatever the boot script's stdin holds\n")
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == b""


@pytest.mark.parametrize(
    ("path", "owner", "chowned"),
    [
        ("/etc/km-test/system.conf", "root:root", None),
        ("/home/sandbox/.gitconfig", "sandbox:sandbox", None),
        (
            "/home/sandbox/.config/tool/settings.toml",
            "sandbox:sandbox",
            "chown sandbox:sandbox /home/sandbox/.config/tool /home/sandbox/.config",
        ),
        ("/workspace/.env", "sandbox:sandbox", None),
        ("/workspace/a/b.txt", "sandbox:sandbox", "chown sandbox:sandbox /workspace/a"),
        ("/home/other/file", "root:root", None),
    ],
)
def test_config_file_ownership(tmp_path: Path, path: str, owner: str, chowned: str | None) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["execution"]["configFiles"] = {path: "content\n"}

    userdata = compile_profile(goose_variant(tmp_path, edit)).userdata
    assert write_command(userdata, path).startswith(f"km_write_file {path} 0644 {owner} ")
    section = userdata.split(f"km_log 'config file {path}'", 1)[1].split("\n\n", 1)[0]
    chown_lines = [line for line in section.splitlines() if line.startswith("chown ")]
    assert chown_lines == ([chowned] if chowned else [])


def init_commands_profile(tmp_path: Path, commands: list[str]) -> SandboxProfile:
    def edit(spec: dict[str, Any]) -> None:
        spec["execution"]["initCommands"] = commands

    profile = goose_variant(tmp_path, edit)
    assert list(profile.spec.execution.init_commands) == commands
    return profile


def test_init_commands_appear_in_order_in_the_init_script(tmp_path: Path) -> None:
    commands = ["dnf install -y git", "npm install -g @anthropic-ai/claude-code", "echo done > /tmp/marker", "dnf install -y git"]
    userdata = compile_profile(init_commands_profile(tmp_path, commands)).userdata
    init_script = write_command(userdata, "/opt/km/init.sh")
    assert init_script.startswith("km_write_file /opt/km/init.sh 0700 root:root <<")
    body_lines = init_script.splitlines()[1:-1]
    assert [line for line in body_lines if line in commands] == commands
    # The script runs once: guarded by the marker, then the marker is set.
    guard = userdata.index("if [ ! -e /var/lib/km/init.done ]; then")
    assert guard < userdata.index("bash /opt/km/init.sh") < userdata.index("touch /var/lib/km/init.done")


def test_init_commands_run_in_order_and_stop_at_the_first_failure(tmp_path: Path) -> None:
    commands = [
        "printf '%s\\n' first >> \"$KM_TEST_OUT\"",
        'printf \'%s\\n\' "it\'s second" >> "$KM_TEST_OUT"',
        'test -n "$KM_TEST_OUT" && printf \'%s\\n\' third >> "$KM_TEST_OUT"',
        "false",
        "printf '%s\\n' never >> \"$KM_TEST_OUT\"",
    ]
    userdata = compile_profile(init_commands_profile(tmp_path, commands)).userdata
    init_script = tmp_path / "init.sh"
    assert run_write(userdata, "/opt/km/init.sh", init_script).returncode == 0
    assert stat.S_IMODE(init_script.stat().st_mode) == 0o700
    out = tmp_path / "out.txt"
    result = subprocess.run(
        ["bash", str(init_script)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        env={"PATH": os.environ["PATH"], "KM_TEST_OUT": str(out)},
    )
    assert result.returncode != 0
    assert out.read_text(encoding="utf-8") == "first\nit's second\nthird\n"
    progress = [line for line in result.stdout.splitlines() if line.startswith("km-init: ")]
    assert progress == [f"km-init: {n}/5: {command}" for n, command in enumerate(commands[:4], start=1)]


def test_no_init_section_without_init_commands(tmp_path: Path) -> None:
    userdata = compile_profile(init_commands_profile(tmp_path, [])).userdata
    assert "/opt/km/init.sh" not in userdata and "init.done" not in userdata


@pytest.mark.parametrize("privileged", [False, True])
def test_sudo_only_when_privileged(tmp_path: Path, privileged: bool) -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["execution"]["privileged"] = privileged

    userdata = compile_profile(goose_variant(tmp_path, edit)).userdata
    if privileged:
        assert "rm -f /etc/sudoers.d/km-sandbox" not in userdata
        assert write_command(userdata, "/etc/sudoers.d/km-sandbox").startswith(
            "km_write_file /etc/sudoers.d/km-sandbox 0440 root:root"
        )
        target = tmp_path / "km-sandbox"
        assert run_write(userdata, "/etc/sudoers.d/km-sandbox", target).returncode == 0
        assert target.read_bytes() == b"sandbox ALL=(ALL) NOPASSWD:ALL\n"
        assert stat.S_IMODE(target.stat().st_mode) == 0o440
    else:
        assert "NOPASSWD" not in userdata
        assert "rm -f /etc/sudoers.d/km-sandbox" in userdata
        assert re.search(r"for group in wheel sudo adm; do gpasswd -d sandbox", userdata)


@pytest.mark.parametrize("name", CREATABLE)
def test_builtin_profiles_grant_sudo_exactly_when_privileged(name: str) -> None:
    profile, _ = load_profile(name)
    assert ("NOPASSWD" in compile_profile(profile).userdata) == profile.spec.execution.privileged


def test_boot_script_reports_ready_last_and_failures_with_the_line() -> None:
    userdata = compile_profile(load_profile(GOOSE_FILE)[0]).userdata
    assert userdata.splitlines()[2] == "set -Eeuo pipefail"
    assert 'trap \'km_failed "$LINENO" "$BASH_COMMAND"\' ERR' in userdata
    assert userdata.rstrip("\n").splitlines()[-2:] == [
        "echo ready > /var/lib/km/boot-status",
        'km_log "SANDBOX_READY sandbox_id=${KM_SANDBOX_ID:-unknown}"',
    ]
    assert userdata.index("systemctl start km-host-agent.service") < userdata.index("echo ready > /var/lib/km/boot-status")


def efs_mount_script(userdata: str, fstab: Path, mount_log: Path) -> str:
    """The script's km_mount_efs with /etc/fstab moved to `fstab` and mount(8) and mountpoint(1) stubbed."""
    match = re.search(r"^km_mount_efs\(\) \{.*?^\}$", userdata, re.MULTILINE | re.DOTALL)
    assert match, "the volume section defines km_mount_efs"
    stubs = [
        "km_log() { printf 'km-userdata: %s\\n' \"$*\"; }",
        "mountpoint() { return 1; }",
        f"mount() {{ printf '%s\\n' \"$*\" >> {shlex.quote(str(mount_log))}; }}",
    ]
    return "\n".join(stubs) + "\n" + match.group(0).replace("/etc/fstab", shlex.quote(str(fstab)))


@pytest.mark.skipif(shutil.which("mount.efs") is not None, reason="amazon-efs-utils is installed: the NFS fallback is not taken")
@pytest.mark.parametrize(
    ("sandbox_env", "region"),
    [
        ({"KM_EFS_ID": "fs-0123abcd", "KM_REGION": "us-east-1"}, "us-east-1"),
        ({"KM_EFS_ID": "fs-0123abcd", "KM_REGION": "eu-west-1"}, "eu-west-1"),
        ({"KM_EFS_ID": "fs-0123abcd"}, "us-east-1"),
    ],
)
def test_efs_mount_writes_one_fstab_line_and_mounts(tmp_path: Path, sandbox_env: dict[str, str], region: str) -> None:
    profile, _ = load_profile(GOOSE_FILE)
    fstab, mount_log, shared = tmp_path / "fstab", tmp_path / "mounts", tmp_path / "shared"
    fstab.write_text("UUID=1234 / xfs defaults 0 0\n", encoding="utf-8")
    script = efs_mount_script(compile_profile(profile).userdata, fstab, mount_log)
    for _ in range(2):  # safe to run twice
        result = subprocess.run(
            ["bash", "-Eeuo", "pipefail", "-c", f"{script}\nkm_mount_efs {shlex.quote(str(shared))} us-east-1"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
            env={"PATH": os.environ["PATH"], **sandbox_env},
        )
        assert result.returncode == 0, result.stderr
    assert fstab.read_text(encoding="utf-8").splitlines()[1:] == [
        f"fs-0123abcd.efs.{region}.amazonaws.com:/ {shared} nfs4 nfsvers=4.1,_netdev,nofail 0 0"
    ]
    assert mount_log.read_text(encoding="utf-8") == f"{shared}\n{shared}\n"
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777


def test_efs_mount_without_an_efs_id_says_what_is_missing(tmp_path: Path) -> None:
    profile, _ = load_profile(GOOSE_FILE)
    script = efs_mount_script(compile_profile(profile).userdata, tmp_path / "fstab", tmp_path / "mounts")
    result = subprocess.run(
        ["bash", "-Eeuo", "pipefail", "-c", f"{script}\nkm_mount_efs {shlex.quote(str(tmp_path / 'shared'))} us-east-1"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        env={"PATH": os.environ["PATH"]},
    )
    assert result.returncode != 0
    assert "KM_EFS_ID is not set in /etc/km/sandbox.env" in result.stderr
    assert not (tmp_path / "fstab").exists()


@pytest.mark.skipif(shutil.which("mount.efs") is not None, reason="amazon-efs-utils is installed: the NFS fallback is not taken")
def test_efs_mount_needs_only_the_efs_id_from_sandbox_env(tmp_path: Path) -> None:
    profile, _ = load_profile(GOOSE_FILE)
    assert "\nkm_mount_efs /shared us-east-1\n" in compile_profile(profile).userdata  # the profile's region
    fstab, shared = tmp_path / "fstab", tmp_path / "shared"
    fstab.write_text("UUID=1234 / xfs defaults 0 0\n", encoding="utf-8")
    script = efs_mount_script(compile_profile(profile).userdata, fstab, tmp_path / "mounts")
    result = subprocess.run(
        ["bash", "-Eeuo", "pipefail", "-c", f"{script}\nkm_mount_efs {shlex.quote(str(shared))} us-east-1"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        env={"PATH": os.environ["PATH"], "KM_EFS_ID": "fs-0123abcd"},
    )
    assert result.returncode == 0, result.stderr
    assert f"fs-0123abcd.efs.us-east-1.amazonaws.com:/ {shared} nfs4" in fstab.read_text(encoding="utf-8")
