"""The egress gatekeeper: the name allowlist, the sandbox's resolver and the BPF programs (issue 5)."""
