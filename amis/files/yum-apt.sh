#!/bin/bash
# km: yum/dnf for a Debian image. Profiles written for Amazon Linux call `yum install -y …`; this runs
# the same request through apt, translating the package names that differ. Unknown subcommands fail
# loudly instead of pretending to work.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

declare -A DEBIAN_NAME=(
  [gcc-c++]=g++ [openssl-devel]=libssl-dev [libffi-devel]=libffi-dev [zlib-devel]=zlib1g-dev
  [python3-devel]=python3-dev [bzip2-devel]=libbz2-dev [readline-devel]=libreadline-dev
  [sqlite-devel]=libsqlite3-dev [xz-devel]=liblzma-dev [ncurses-devel]=libncurses-dev
  [libcurl-devel]=libcurl4-openssl-dev [glibc-langpack-en]=locales [which]=debianutils
  [procps-ng]=procps [iputils]=iputils-ping [bind-utils]=dnsutils [nc]=netcat-openbsd
  [java-17-amazon-corretto]=openjdk-17-jdk-headless [golang]=golang-go
)
SKIP=" amazon-efs-utils amazon-ssm-agent ec2-instance-connect cloud-init "

command=""
packages=()
for argument in "$@"; do
  case "$argument" in
    -y|--assumeyes|-q|--quiet|--nogpgcheck|--allowerasing|--setopt=*|--skip-broken|--best) ;;
    -*) echo "yum (km apt front end): option $argument is not supported" >&2; exit 2 ;;
    *) if [ -z "$command" ]; then command=$argument; else packages+=("$argument"); fi ;;
  esac
done

apt_lists_fresh() { [ -n "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -60 2>/dev/null | head -1)" ]; }

# Debian names for the requested packages (skipping those an image does not need), in debian_packages.
translate() {
  debian_packages=()
  for package in "${packages[@]}"; do
    [[ "$SKIP" == *" $package "* ]] && { echo "yum (km): skipping $package (not needed on this image)" >&2; continue; }
    debian_packages+=("${DEBIAN_NAME[$package]:-$package}")
  done
}

case "$command" in
  install|reinstall)
    translate
    [ "${#debian_packages[@]}" -gt 0 ] || exit 0
    apt_lists_fresh || apt-get update -q
    exec apt-get install -y -q --no-install-recommends "${debian_packages[@]}"
    ;;
  update|upgrade)
    translate
    apt-get update -q
    [ "${#packages[@]}" -eq 0 ] && exec apt-get upgrade -y -q
    [ "${#debian_packages[@]}" -gt 0 ] || exit 0
    exec apt-get install -y -q --only-upgrade "${debian_packages[@]}"
    ;;
  remove|erase)
    translate
    [ "${#debian_packages[@]}" -gt 0 ] || exit 0
    exec apt-get remove -y -q "${debian_packages[@]}"
    ;;
  makecache) exec apt-get update -q ;;
  clean) exec apt-get clean ;;
  *) echo "yum (km apt front end): '$command' is not supported; use install, update, remove, makecache or clean" >&2; exit 2 ;;
esac
