"""The first-boot script, identical on EC2 (cloud-init userdata) and local (a first-boot unit).

It is rendered from the profile alone, so one compiled script serves every sandbox of a profile:
per-sandbox identity comes from `/etc/km/sandbox.env`, which the substrate writes before boot.
Every step is safe to run twice, volumes already mounted by the substrate (local bind mounts) are left
alone, and a failure is recorded in `/var/lib/km/boot-status` with the failing line and command
before the script stops, so `km status` can say why a sandbox never became ready.
"""

from __future__ import annotations

import base64
import shlex
from pathlib import PurePosixPath

from controller.compiler.volumes import Volume
from controller.profile import SandboxProfile
from host_agent.config import HostAgentConfig
from host_agent.paths import CONFIG_PATH, SANDBOX_ENV_PATH

PROFILE_ENV_PATH = "/etc/profile.d/km-profile-env.sh"
BOOT_STATUS_PATH = "/var/lib/km/boot-status"

_PRELUDE = f"""\
set -Eeuo pipefail
umask 022
mkdir -p /etc/km /var/lib/km /opt/km
exec > >(tee -a /var/log/km-userdata.log) 2>&1
km_log() {{ printf 'km-userdata: %s\\n' "$*"; }}
km_failed() {{
  printf 'failed line=%s command=%s\\n' "$1" "$2" > {BOOT_STATUS_PATH}
  km_log "FAILED at line $1: $2"
}}
trap 'km_failed "$LINENO" "$BASH_COMMAND"' ERR
echo running > {BOOT_STATUS_PATH}
if [ -r {SANDBOX_ENV_PATH} ]; then
  set -a; . {SANDBOX_ENV_PATH}; set +a
fi
"""
_WRITE_FILE_FUNCTION = """\
km_write_file() {  # path mode owner [base64]: exact bytes from the argument or stdin, replaced atomically
  install -d -m 0755 "$(dirname "$1")"
  if [ $# -ge 4 ]; then printf '%s' "$4" | base64 -d > "$1.km-tmp"; else cat > "$1.km-tmp"; fi
  chmod "$2" "$1.km-tmp"; chown "$3" "$1.km-tmp"; mv -f "$1.km-tmp" "$1"
}
"""
_PRELUDE += _WRITE_FILE_FUNCTION

_VOLUME_FUNCTIONS = """\
km_block_device() {  # /dev/sdX as the kernel names it: sdX, xvdX, or the NVMe namespace EBS maps to it
  local want=$1 letter=${1#/dev/sd} candidate name
  for candidate in "/dev/sd$letter" "/dev/xvd$letter"; do
    [ -b "$candidate" ] && { readlink -f "$candidate"; return 0; }
  done
  for candidate in /dev/nvme*n1; do
    [ -b "$candidate" ] || continue
    name=$(nvme id-ctrl --raw-binary "$candidate" 2>/dev/null | dd bs=1 skip=3072 count=32 2>/dev/null | tr -d ' \\0' || true)
    case "$name" in "$want"|"/dev/xvd$letter"|"sd$letter"|"xvd$letter") echo "$candidate"; return 0 ;; esac
  done
  return 1
}
km_give_fresh_volume() {  # mount-point: a new, empty volume belongs to the sandbox user
  local entry
  [ "$(stat -c %U "$1")" = root ] || return 0
  for entry in "$1"/* "$1"/.[!.]*; do
    [ -e "$entry" ] || continue
    [ "${entry##*/}" = lost+found ] || return 0
  done
  chown sandbox:sandbox "$1"
}
km_mount_volume() {  # device mount-point: format when blank, mount by UUID, keep it in fstab
  local device=$1 mount_point=$2 real uuid tries=0
  if mountpoint -q "$mount_point"; then
    km_log "$mount_point already mounted; leaving it"
    km_give_fresh_volume "$mount_point"
    return 0
  fi
  until real=$(km_block_device "$device"); do
    tries=$((tries + 1)); [ "$tries" -le 60 ] || { km_log "device $device never appeared"; return 1; }
    sleep 2
  done
  if ! blkid "$real" >/dev/null 2>&1; then km_log "formatting $real ($device) as ext4"; mkfs.ext4 -q "$real"; fi
  uuid=$(blkid -s UUID -o value "$real")
  mkdir -p "$mount_point"
  grep -q "UUID=$uuid " /etc/fstab || echo "UUID=$uuid $mount_point ext4 defaults,nofail 0 2" >> /etc/fstab
  mount "$mount_point"
  km_give_fresh_volume "$mount_point"
}
km_mount_efs() {  # mount-point region: the shared EFS file system named by KM_EFS_ID
  local mount_point=$1 region=${KM_REGION:-$2}
  if mountpoint -q "$mount_point"; then km_log "$mount_point already mounted; leaving it"; return 0; fi
  : "${KM_EFS_ID:?KM_EFS_ID is not set in /etc/km/sandbox.env: run km init to create the EFS file system}"
  mkdir -p "$mount_point"
  local entry="$KM_EFS_ID:/ $mount_point efs _netdev,nofail,tls 0 0"
  if ! command -v mount.efs >/dev/null 2>&1; then  # plain NFS when amazon-efs-utils is absent
    entry="$KM_EFS_ID.efs.$region.amazonaws.com:/ $mount_point nfs4 nfsvers=4.1,_netdev,nofail 0 0"
  fi
  grep -qF "$entry" /etc/fstab || echo "$entry" >> /etc/fstab
  mount "$mount_point"
  chmod 1777 "$mount_point"
}
"""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _write_file(path: str, mode: str, owner: str, content: str) -> str:
    """A readable here-document when the text allows one; base64 for exact bytes otherwise."""
    command = f"km_write_file {shlex.quote(path)} {mode} {owner}"
    lines = content.split("\n")
    if not content.endswith("\n") or "\r" in content:
        return f"{command} {shlex.quote(_b64(content))}"  # quoted: empty content stays an argument
    delimiter = "KM_EOF"
    while delimiter in lines:
        delimiter += "_"
    return f"{command} <<'{delimiter}'\n{content}{delimiter}"


def profile_env_script(env: dict[str, str]) -> str:
    lines = ["# km: the profile's environment for every login shell and agent run. Generated; do not edit."]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    return "\n".join(lines) + "\n"


def _users_section(profile: SandboxProfile) -> list[str]:
    execution = profile.spec.execution
    working_dir = shlex.quote(execution.working_dir)
    lines = [
        "km_log 'users: sandbox'",
        "getent group sandbox >/dev/null || groupadd sandbox",
        f"id -u sandbox >/dev/null 2>&1 || useradd -m -d /home/sandbox -s {shlex.quote(execution.shell)} -g sandbox sandbox",
        f"install -d -o sandbox -g sandbox -m 0755 {working_dir}",
    ]
    if execution.privileged:
        lines.append(_write_file("/etc/sudoers.d/km-sandbox", "0440", "root:root", "sandbox ALL=(ALL) NOPASSWD:ALL\n"))
    else:
        lines += [
            "rm -f /etc/sudoers.d/km-sandbox",
            'for group in wheel sudo adm; do gpasswd -d sandbox "$group" >/dev/null 2>&1 || true; done',
        ]
    return lines


def _environment_section(config: HostAgentConfig) -> list[str]:
    env = {**config.execution.bedrock_env, **config.execution.env}
    return ["km_log 'environment'", _write_file(PROFILE_ENV_PATH, "0644", "root:root", profile_env_script(env))]


def _volumes_section(volumes: list[Volume], region: str) -> list[str]:
    lines: list[str] = []
    for volume in volumes:
        if volume.kind == "ebs" and volume.device:
            lines.append(f"km_log {shlex.quote(f'volume: {volume.device} at {volume.mount_point}')}")
            lines.append(f"km_mount_volume {shlex.quote(volume.device)} {shlex.quote(volume.mount_point)}")
        elif volume.kind == "efs":
            lines.append(f"km_log {shlex.quote(f'efs at {volume.mount_point}')}")
            lines.append(f"km_mount_efs {shlex.quote(volume.mount_point)} {shlex.quote(region)}")
    return [_VOLUME_FUNCTIONS.rstrip("\n"), *lines] if lines else []


def _config_files_section(profile: SandboxProfile) -> list[str]:
    """Files under the sandbox user's home or the workingDir belong to it; anything else stays root's."""
    homes = (PurePosixPath("/home/sandbox"), PurePosixPath(profile.spec.execution.working_dir))
    lines: list[str] = []
    for path, content in profile.spec.execution.config_files.items():
        target = PurePosixPath(path)
        home = next((h for h in homes if h in target.parents), None)
        lines.append(f"km_log {shlex.quote(f'config file {path}')}")
        lines.append(_write_file(path, "0644", "sandbox:sandbox" if home else "root:root", content))
        if home is not None:
            created = [parent for parent in target.parents if home in parent.parents]
            if created:
                lines.append("chown sandbox:sandbox " + " ".join(shlex.quote(str(d)) for d in created))
    return lines


def _init_section(profile: SandboxProfile) -> list[str]:
    commands = profile.spec.execution.init_commands
    if not commands:
        return []
    script = ["#!/bin/bash", "# km: the profile's initCommands, in order. Generated; do not edit.", "set -euo pipefail"]
    for number, command in enumerate(commands, start=1):
        script.append(f"echo {shlex.quote(f'km-init: {number}/{len(commands)}: {command}')}")
        script.append(command)
    return [
        "if [ ! -e /var/lib/km/init.done ]; then",
        f"  km_log 'initCommands: {len(commands)}'",
        "  " + _write_file("/opt/km/init.sh", "0700", "root:root", "\n".join(script) + "\n"),
        "  (cd / && bash /opt/km/init.sh)",
        "  touch /var/lib/km/init.done",
        "fi",
    ]


# systemd-resolved (Amazon Linux 2023, Ubuntu) and nscd answer any local user over D-Bus, varlink, the stub
# on 127.0.0.53 and a shared cache, from outside the agent's units: a second resolver the policy does not
# govern, and a cache that first boot may have filled with names the agent must not resolve. So both go
# (masked: D-Bus and socket activation cannot bring them back), nsswitch stops asking resolved, and
# /etc/resolv.conf becomes a plain file naming the real upstream: the one the substrate named
# (KM_DNS_UPSTREAM) or else the one resolved learned (DHCP on EC2). The host agent forwards to it, the exempt
# services use it directly, and every gated query to port 53 lands in the host agent's resolver anyway.
# On an image without them every step finds nothing to do; a second run changes nothing.
RESOLVED_UPLINK = "/run/systemd/resolve/resolv.conf"
SECOND_RESOLVER_UNITS = (
    "systemd-resolved.service",
    "systemd-resolved-varlink.socket",  # systemd 257+ activates resolved's varlink API by socket
    "systemd-resolved-monitor.socket",
    "nscd.service",
    "unscd.service",
)
_ONE_RESOLVER_FUNCTIONS = f"""\
km_port53_nameserver() {{  # IP[:PORT], [IPv6]:PORT or IPv6: the address, if resolv.conf can name it (port 53)
  case $1 in
    \\[*\\]:53) local address=${{1#\\[}}; echo "${{address%\\]:53}}" ;;
    \\[*) return 1 ;;
    *:*:*) echo "$1" ;;
    *:53) echo "${{1%:53}}" ;;
    *:*) return 1 ;;
    *) echo "$1" ;;
  esac
}}
km_points_at_resolved() {{  # /etc/resolv.conf is resolved's (a link into /run/systemd/resolve, or its stub)
  case "$(readlink /etc/resolv.conf || true)" in */systemd/resolve/*) return 0 ;; esac
  grep -Eq '^[[:space:]]*nameserver[[:space:]]+127\\.0\\.0\\.5[34]([[:space:]]|$)' /etc/resolv.conf 2>/dev/null
}}
km_one_resolver() {{
  local unit nameservers="" learned="" search=""
  if km_points_at_resolved; then
    # Read before resolved stops: its uplink file lives in /run and names what DHCP gave it.
    if [ -n "${{KM_DNS_UPSTREAM:-}}" ]; then nameservers=$(km_port53_nameserver "$KM_DNS_UPSTREAM" || true); fi
    if [ -r {RESOLVED_UPLINK} ]; then
      learned=$(awk '$1 == "nameserver" && $2 !~ /^127\\.0\\.0\\.5[34]$/ {{print $2}}' {RESOLVED_UPLINK})
      search=$(awk '$1 == "search" {{$1 = ""; print substr($0, 2); exit}}' {RESOLVED_UPLINK})
    fi
    nameservers=${{nameservers:-$learned}}
    if [ -z "$nameservers" ]; then
      km_log 'dns: resolved knows no upstream server and KM_DNS_UPSTREAM names none on port 53'
      return 1
    fi
  fi
  for unit in {" ".join(SECOND_RESOLVER_UNITS)}; do
    case "$(systemctl show -p LoadState --value "$unit" 2>/dev/null || true)" in
      ""|not-found) continue ;;
      masked) ;;
      *) km_log "dns: masking $unit"; systemctl disable --quiet "$unit"; systemctl mask --quiet "$unit" ;;
    esac
    systemctl stop "$unit"
  done
  if grep -Eq '^hosts:.*[[:space:]]resolve([[:space:]]|$)' /etc/nsswitch.conf 2>/dev/null; then
    km_log 'dns: nsswitch without resolve'
    sed -E -i '/^hosts:/ s/[[:space:]]+resolve([[:space:]]*\\[[^]]*\\])?([[:space:]]|$)/\\2/g' /etc/nsswitch.conf
  fi
  if [ -n "$nameservers" ]; then
    km_log "dns: /etc/resolv.conf names $(echo "$nameservers" | tr '\\n' ' ')"
    {{
      echo '# km: the upstream resolver, as a plain file; systemd-resolved is masked. Written at first boot.'
      if [ -n "$search" ]; then echo "search $search"; fi
      echo "$nameservers" | sed 's/^/nameserver /'
    }} | km_write_file /etc/resolv.conf 0644 root:root
  fi
}}"""


def _one_resolver_section() -> list[str]:
    """Leave the host agent's resolver the only one in the sandbox (see _ONE_RESOLVER_FUNCTIONS). It runs
    before initCommands, so nothing first boot resolves can wait in a cache the agent could ask later."""
    return ["km_log 'dns: one resolver'", _ONE_RESOLVER_FUNCTIONS, "km_one_resolver"]


def _host_agent_section(config: HostAgentConfig) -> list[str]:
    return [
        "km_log 'host agent'",
        # An image without the daemon (a stock AMI) installs it from the bundle km create published.
        "if ! command -v km-host-agent >/dev/null 2>&1; then",
        '  : "${KM_HOST_AGENT_BUNDLE_URL:?km-host-agent is missing and km gave no bundle: use an image with it baked in}"',
        "  km_log 'host agent: installing it from its bundle'",
        "  install -d -m 0700 /opt/km/bundle",
        '  curl -fsS --retry 5 --retry-connrefused -o /opt/km/bundle.tar.gz "$KM_HOST_AGENT_BUNDLE_URL"',
        '  echo "$KM_HOST_AGENT_BUNDLE_SHA256  /opt/km/bundle.tar.gz" | sha256sum -c --quiet -',
        "  tar -xzf /opt/km/bundle.tar.gz -C /opt/km/bundle --no-same-owner",
        "  bash /opt/km/bundle/install-host-agent.sh",
        "fi",
        _write_file(str(CONFIG_PATH), "0644", "root:root", config.to_json()),
        # The daemon's units come with it (a baked image, or the bundle's installer): EC2 allows 16 KB
        # of user data, and the agent units' settings alone would take a quarter of it.
        "systemctl is-enabled --quiet km-host-agent.service || systemctl enable km-host-agent.service",
        "systemctl start km-host-agent.service",
    ]


def render_userdata(profile: SandboxProfile, volumes: list[Volume], config: HostAgentConfig) -> str:
    sections = [
        _users_section(profile),
        _one_resolver_section(),
        _environment_section(config),
        _volumes_section(volumes, profile.spec.runtime.region),
        _config_files_section(profile),
        _init_section(profile),
        _host_agent_section(config),
        ["echo ready > " + BOOT_STATUS_PATH, 'km_log "SANDBOX_READY sandbox_id=${KM_SANDBOX_ID:-unknown}"'],
    ]
    header = f"#!/bin/bash\n# km first-boot script for profile {profile.metadata.name}. Generated by km compile; do not edit.\n"
    body = "\n\n".join("\n".join(section) for section in sections if section)
    return header + _PRELUDE + "\n" + body + "\n"


def render_policy_update(profile: SandboxProfile, config: HostAgentConfig) -> str:
    """What a live policy change rewrites in a running sandbox, with the same owners and modes as first
    boot (it is built from the same sections), then the daemon's reload; for every substrate alike."""
    sections = [
        _environment_section(config),
        _config_files_section(profile),
        ["km_log 'host agent policy'", _write_file(str(CONFIG_PATH), "0644", "root:root", config.to_json())],
        ["systemctl reload km-host-agent.service"],
    ]
    header = f"#!/bin/bash\n# km live policy update for profile {profile.metadata.name}. Generated by km; do not edit.\n"
    prelude = "set -Eeuo pipefail\numask 022\nkm_log() { printf 'km-policy: %s\\n' \"$*\"; }\n" + _WRITE_FILE_FUNCTION
    body = "\n\n".join("\n".join(section) for section in sections)
    return header + prelude + "\n" + body + "\n"
