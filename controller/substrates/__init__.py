"""Substrates: where sandboxes run. `local` (systemd-nspawn on this host) and `ec2` (the operator's AWS account)."""
