"""The daemon's main loop: load the policy, tell systemd it is ready, pet the watchdog, reload on SIGHUP.

Components (gatekeeper, capture, supervisor, outbox) plug in here in later steps; this loop owns the
process lifecycle they share, so each component only has to start, reload and stop.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path

from host_agent.config import HostAgentConfig, load_config
from host_agent.sdnotify import notify, watchdog_interval_seconds
from host_agent.version import __version__

log = logging.getLogger("km-host-agent")


class _JournalFormatter(logging.Formatter):
    """One JSON object per line: the journal keeps lines, operators grep and parse them."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {"level": record.levelname.lower(), "message": record.getMessage()}
        fields.update(getattr(record, "fields", {}))
        return json.dumps(fields, sort_keys=True)


class Daemon:
    """Signals are taken synchronously (`sigtimedwait`), so there are no handlers racing the loop."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config: HostAgentConfig | None = None

    def run(self) -> int:
        try:
            self.config = load_config(self.config_path)
        except (OSError, ValueError) as error:  # ValueError: ValidationError, undecodable bytes
            log.error("cannot load config", extra={"fields": {"config": str(self.config_path), "error": str(error)}})
            return 1
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        notify("READY=1", f"STATUS=enforcing profile {self.config.profile}")
        log.info("ready", extra={"fields": {"version": __version__, "profile": self.config.profile}})
        interval = watchdog_interval_seconds() or 5.0
        while True:
            notify("WATCHDOG=1")
            received = signal.sigtimedwait(self.SIGNALS, interval)
            if received is None:
                continue
            if received.si_signo == signal.SIGHUP:
                self._reload()
                continue
            break
        notify("STOPPING=1")
        log.info("stopped", extra={"fields": {"profile": self.config.profile}})
        return 0

    def _reload(self) -> None:
        notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            self.config = load_config(self.config_path)
        except (OSError, ValueError) as error:  # ValueError: ValidationError, undecodable bytes
            # Keep enforcing the policy we have: a bad file must never loosen anything.
            log.error("reload refused; keeping the current policy", extra={"fields": {"error": str(error)}})
        else:
            log.info("reloaded", extra={"fields": {"profile": self.config.profile}})
        notify("READY=1")


def run_daemon(config_path: Path) -> int:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_JournalFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    return Daemon(config_path).run()
