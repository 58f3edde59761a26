#!/bin/bash
# km: installs km-host-agent from the bundle this script came in, on an image that lacks it (first boot
# of a stock AMI). Idempotent. Needs root. Python >= 3.11, libbpf and tmux come from the distribution
# (dnf or apt-get); the daemon's Python dependencies from PyPI, or from $KM_PIP_INDEX_URL.
#   KM_HOST_AGENT_VENV    where the virtualenv goes    (default /opt/km/venv)
#   KM_HOST_AGENT_BIN     the command it installs      (default /usr/local/bin/km-host-agent)
#   KM_HOST_AGENT_PYTHON  the interpreter to use       (default: the newest python3 >= 3.11, installed if none)
set -Eeuo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${KM_HOST_AGENT_VENV:-/opt/km/venv}
bin=${KM_HOST_AGENT_BIN:-/usr/local/bin/km-host-agent}
say() { printf 'km-host-agent install: %s\n' "$*"; }

install_packages() {
  if command -v dnf >/dev/null 2>&1; then
    dnf install -y -q "$@"
  elif command -v apt-get >/dev/null 2>&1; then
    [ -n "${km_apt_updated:-}" ] || { apt-get update -q; km_apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
  else
    say "neither dnf nor apt-get is here to install $*: use an image with km-host-agent baked in" >&2
    return 1
  fi
}

newest_python() {
  local candidate
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

python=${KM_HOST_AGENT_PYTHON:-}
if [ -z "$python" ]; then
  if ! python=$(newest_python); then
    say "installing Python 3.11"
    if command -v dnf >/dev/null 2>&1; then install_packages python3.11 python3.11-pip; else install_packages python3 python3-venv; fi
    python=$(newest_python) || { say "no Python >= 3.11 with venv support after installing one" >&2; exit 1; }
  fi
fi
if ! ldconfig -p | grep -q 'libbpf\.so\.1 '; then
  say "installing libbpf"
  if command -v dnf >/dev/null 2>&1; then install_packages libbpf; else install_packages libbpf1; fi
fi
command -v tmux >/dev/null 2>&1 || install_packages tmux

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip_args=(--disable-pip-version-check --quiet)
if [ -n "${KM_PIP_INDEX_URL:-}" ]; then pip_args+=(--index-url "$KM_PIP_INDEX_URL"); fi
say "installing the daemon's dependencies into $venv"
"$venv/bin/python" -m pip install "${pip_args[@]}" -r "$here/requirements.txt"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for package in host_agent ebpf; do
  rm -rf "$site/$package.km-new"
  cp -r "$here/$package" "$site/$package.km-new"
  rm -rf "${site:?}/$package"
  mv "$site/$package.km-new" "$site/$package"
done

install -d -m 0755 "$(dirname "$bin")"
cat > "$bin.km-new" <<EOF
#!$venv/bin/python
import sys
from host_agent.cli import main
sys.exit(main())
EOF
chmod 0755 "$bin.km-new"
mv -f "$bin.km-new" "$bin"

# The daemon's units (userdata only enables and starts km-host-agent.service).
changed=0
for unit in "$here"/host_agent/systemd/*.service "$here"/host_agent/systemd/*.mount "$here"/host_agent/systemd/*.slice; do
  target=/etc/systemd/system/$(basename "$unit")
  if ! cmp -s "$unit" "$target"; then install -m 0644 "$unit" "$target"; changed=1; fi
done
if [ "$changed" = 1 ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
say "$("$bin" --version)"
