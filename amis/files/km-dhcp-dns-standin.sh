#!/bin/sh
# What systemd-networkd does with DHCP's DNS servers on an EC2 instance, done for a local sandbox: the
# sandbox's upstream (KM_DNS_UPSTREAM, written by the local substrate) becomes the DNS server systemd-resolved
# knows for the uplink. Nothing to do once first boot has masked resolved, or without an upstream.
set -eu
systemctl is-active --quiet systemd-resolved.service || exit 0
[ -r /etc/km/sandbox.env ] && . /etc/km/sandbox.env
[ -n "${KM_DNS_UPSTREAM:-}" ] || exit 0
link=$(ip -o route show default | awk '{print $5; exit}')
resolvectl dns "$link" "$KM_DNS_UPSTREAM"
