"""TLS plaintext capture inside the sandbox (the BPF side is ebpf/tls_capture)."""
