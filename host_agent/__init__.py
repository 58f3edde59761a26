"""km's sandbox side: the `km-host-agent` daemon. Imports nothing from `controller`."""

from host_agent.version import __version__

__all__ = ["__version__"]
