"""Sandbox ids: `<prefix>-<8 lowercase hex>`, the prefix taken from the profile's `metadata.prefix`."""

from __future__ import annotations

import re
import secrets

SANDBOX_ID_PATTERN = re.compile(r"^[a-z][a-z0-9]{0,11}-[a-f0-9]{8}$")


def new_sandbox_id(prefix: str) -> str:
    """A fresh random id; 32 bits of randomness, so the store's primary key still guards collisions."""
    sandbox_id = f"{prefix}-{secrets.token_hex(4)}"
    if not SANDBOX_ID_PATTERN.fullmatch(sandbox_id):
        raise ValueError(f"sandbox id prefix {prefix!r} is not a lower-case letter then up to 11 lower-case letters or digits")
    return sandbox_id
