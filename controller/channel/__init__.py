"""How the controller runs a command inside a sandbox: SSM Run Command on ec2 (nsenter into the machine's
systemd on local lives with the local substrate)."""
