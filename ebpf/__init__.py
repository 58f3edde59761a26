"""BPF programs (`*.bpf.c`), how they are compiled ahead of time (`objects.py`), the ctypes binding to
libbpf that loads them (`libbpf.py`), and one loader per program (`gate.py`, `tls_capture.py`).

Nothing here compiles at run time: sandboxes carry the compiled objects and libbpf.so.1 only.
"""
