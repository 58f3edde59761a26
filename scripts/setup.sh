#!/usr/bin/env bash
# Idempotent set-up of everything km needs on a Debian/Ubuntu machine:
# apt packages (root only), the .venv with km installed editable plus test
# extras, and the compiled BPF objects (clang + libbpf, no BCC).
#
# Usage: bash scripts/setup.sh          (any cwd; PYTHON=... to pick the interpreter)
# Safe to re-run; a run with nothing to do takes about a second.
set -euo pipefail

# System packages km needs (Debian/Ubuntu names). Append new ones here.
APT_PACKAGES=(
    bpftool         # inspect loaded BPF programs and maps
    clang-14        # compiles the egress gate's BPF object (ebpf/objects.py)
    libbpf-dev      # bpf_helpers.h for that compile
    libbpf1         # libbpf.so.1: loads the compiled object (km-host-agent, tests)
    shellcheck      # the tests lint every compiled userdata.sh with it
    debootstrap     # bakes local images
    systemd-container  # systemd-nspawn: the local substrate's machines
    nftables        # NAT for local sandboxes' network namespaces
    iproute2        # network namespaces and veth pairs
    e2fsprogs       # local sandboxes' additional volumes are ext4 images
    tmux            # agent runs are supervised in tmux sessions
    openssl curl binutils  # TLS capture tests: certificates, clients, libssl's symbol table
    dbus-daemon dbus-bin systemd  # the read-only bus tests: a real bus, and sd-bus and libdbus clients
)

MIN_PYTHON="3.11"
VENV=".venv"
STAMP="$VENV/.km-setup-stamp"

log() { printf 'setup: %s\n' "$*" >&2; }
warn() { printf 'setup: WARNING: %s\n' "$*" >&2; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

# 1. Repo root, whatever the cwd.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd -P)"
[[ -f pyproject.toml ]] || die "no pyproject.toml in $ROOT; is scripts/setup.sh inside the km repo?"

IS_ROOT=0
if [[ "$(id -u)" -eq 0 ]]; then IS_ROOT=1; fi

# 2. Python >= 3.11.
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null 2>&1 ||
    die "Python interpreter '$PYTHON' not found. Install Python >= $MIN_PYTHON (e.g. 'apt-get install python3' on Debian 12+, or pyenv) or point PYTHON=/path/to/python3.11 at one."
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    py_version="$("$PYTHON" -V 2>&1 | head -n 1 || true)"
    die "km needs Python >= $MIN_PYTHON but '$PYTHON' is ${py_version:-unusable}. Install a newer Python (Debian 12 / Ubuntu 24.04 ship 3.11+, or use pyenv) and re-run with PYTHON=/path/to/python3.11 bash scripts/setup.sh"
fi

# 3. apt packages (install only what is missing; root only).
pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

if ! command -v dpkg-query >/dev/null 2>&1; then
    warn "dpkg-query not found (not Debian/Ubuntu?); skipping system packages: ${APT_PACKAGES[*]}"
else
    missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        pkg_installed "$pkg" || missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        log "apt packages present"
    elif ((IS_ROOT)); then
        log "installing apt packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -q --no-install-recommends "${missing[@]}"
    else
        log "not root: missing apt packages (${missing[*]}) not installed; root-only tests will be skipped"
    fi
fi

# 4. venv with km installed editable (+ test extras).
venv_ok() {
    [[ -x "$VENV/bin/python" && -x "$VENV/bin/pip" ]] &&
        "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}
if ! venv_ok; then
    if [[ -e "$VENV" ]]; then
        log "$VENV is broken or too old; recreating it with $PYTHON"
        rm -rf "$VENV"
    else
        log "creating $VENV with $PYTHON"
    fi
    "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv' failed; on Debian/Ubuntu install python3-venv (apt-get install python3-venv)"
fi

want_stamp="$({ cat pyproject.toml; "$VENV/bin/python" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"
have_stamp="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want_stamp" == "$have_stamp" && -x "$VENV/bin/km" && -x "$VENV/bin/doit" && -x "$VENV/bin/pytest" ]]; then
    log "python packages up to date"
else
    log "installing km (editable, with test extras) into $VENV"
    rm -f "$STAMP"
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 "$VENV/bin/pip" install -q -e '.[test]' ||
        die "pip install -e '.[test]' failed (see above)"
    printf '%s\n' "$want_stamp" >"$STAMP"
fi

# 5. The BPF objects (compiled once; the daemon and the tests load them with libbpf).
if objects_out="$("$VENV/bin/python" -m ebpf.objects 2>&1)"; then
    objects_status="built ($(echo "$objects_out" | tr '\n' ' '))"
else
    printf '%s\n' "$objects_out" >&2
    if ((IS_ROOT)); then
        die "could not compile the BPF objects (output above); clang-14 and libbpf-dev are needed"
    fi
    objects_status="not built (needs clang-14 and libbpf-dev; root installs them)"
fi

# 6. Summary.
log "ready in $ROOT:"
log "  python: $("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])') ($VENV)"
log "  tools:  $VENV/bin/km, $VENV/bin/doit, $VENV/bin/pytest"
log "  bpf:    $objects_status"
((IS_ROOT)) || log "  not root: root-only tests (BPF, nspawn, netns) will be skipped"
log "run the tests with: $VENV/bin/pytest"
