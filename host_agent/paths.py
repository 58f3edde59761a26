"""Where the daemon's files live inside a sandbox: one place for both halves and every entry point.

Standard library only, so the fast control commands (and the operator side) can import it without
pulling in pydantic or libtmux.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

CONFIG_PATH: Final = Path("/etc/km/host-agent.json")
SANDBOX_ENV_PATH: Final = Path("/etc/km/sandbox.env")
CONTROL_SOCKET: Final = Path("/run/km-host-agent/control.sock")
TMUX_SOCKET: Final = Path("/run/km-agent/tmux.sock")
STATE_DIR: Final = Path("/var/lib/km-host-agent")
# Where telemetry goes when the operator has a collector (KM_OTLP_ENDPOINT, KM_OTLP_HEADERS): root only,
# since the headers usually carry the collector's API key and the agent must not read them.
TELEMETRY_ENV_PATH: Final = Path("/etc/km/telemetry.env")
# The host agent's loopback OTLP/HTTP receiver for the agents' own telemetry (the OTLP/HTTP default port).
OTLP_RECEIVER_PORT: Final = 4318
