"""DNS names in the one form every allowlist comparison uses, on both sides of the contract.

IDNA 2008 with UTS 46 mapping (the `idna` package), not Python's built-in IDNA 2003 codec: 2003 maps
`ß` to `ss`, so `straße.de` would become `strasse.de`, a different domain from the `xn--strae-oqa.de`
that clients actually resolve.
"""

from __future__ import annotations

import idna


def normalise_dns_name(text: str) -> str:
    """Lower-case A-label form without leading or trailing dots; raises `UnicodeError` when invalid."""
    name = text.strip().strip(".")
    if not name:
        return ""
    return idna.encode(name, uts46=True).decode("ascii")
