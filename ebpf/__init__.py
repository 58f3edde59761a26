"""BPF programs (`*.bpf.c`) and the small loaders that compile and attach them with BCC.

BCC is imported lazily by each loader: it is heavy (LLVM runs in-process) and only the sandbox
daemon, running as root, needs it.
"""
