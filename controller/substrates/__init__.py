"""Substrates: where sandboxes run. `local` (systemd-nspawn on this host) and, later, `ec2`."""
