"""`km-host-agent`: the sandbox daemon's entry point: `daemon`, `check-config`, `--version`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from host_agent.config import CONFIG_PATH, load_config
from host_agent.version import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="km-host-agent", description="km sandbox daemon")
    parser.add_argument("--version", action="version", version=f"km-host-agent {__version__}")
    commands = parser.add_subparsers(dest="command")
    check = commands.add_parser("check-config", help="validate host-agent.json and exit")
    check.add_argument("--config", type=Path, default=CONFIG_PATH)
    daemon = commands.add_parser("daemon", help="run the daemon (under systemd, Type=notify)")
    daemon.add_argument("--config", type=Path, default=CONFIG_PATH)
    args = parser.parse_args(argv)
    if args.command == "daemon":
        from host_agent.daemon import run_daemon

        return run_daemon(args.config)
    if args.command == "check-config":
        try:
            config = load_config(args.config)
        except (OSError, ValidationError) as exc:
            print(f"km-host-agent: {args.config}: {exc}", file=sys.stderr)
            return 1
        print(f"{args.config}: valid (profile {config.profile}, enforcement {config.egress.enforcement})")
        return 0
    print(f"km-host-agent {__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
