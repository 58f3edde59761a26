"""The operator's AWS account: configuration, clients, and the shared resources `km init` makes."""
