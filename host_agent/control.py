"""The daemon's control socket: one JSON request line in, one JSON response line out.

`km-host-agent run|cancel` are thin clients of it, so a run starts in a process that already has its
libraries loaded and its policy in memory (a fresh interpreter importing them costs more than the whole
dispatch budget). The socket is root's only: the sandbox user cannot start or cancel runs through it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from host_agent.paths import CONTROL_SOCKET

MAX_REQUEST_BYTES: Final = 32 * 1024 * 1024

log = logging.getLogger("km-host-agent.control")
Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(Exception):
    """The daemon could not be reached or refused the request; the message is for the operator."""


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    handler: Handler


class _Connection(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        line = self.rfile.readline(MAX_REQUEST_BYTES)
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
            response = self.server.handler(request)
        except Exception as error:  # the client gets the reason; the daemon goes on
            log.warning("control request refused", extra={"fields": {"error": str(error)}})
            response = {"ok": False, "error": str(error)}
        self.wfile.write(json.dumps(response).encode() + b"\n")


POLL_SECONDS = 0.05


class ControlServer:
    def __init__(self, handler: Handler, socket_path: Path = CONTROL_SOCKET) -> None:
        self.socket_path = socket_path
        socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        socket_path.unlink(missing_ok=True)
        previous = os.umask(0o177)
        try:
            self._server = _Server(str(socket_path), _Connection)
        finally:
            os.umask(previous)
        self._server.handler = handler
        # shutdown() waits for the loop's next poll: the default 0.5 s was a quarter of a sandbox's stop.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": POLL_SECONDS}, name="control", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.socket_path.unlink(missing_ok=True)


def call(request: dict[str, Any], socket_path: Path = CONTROL_SOCKET, timeout: float = 30.0) -> dict[str, Any]:
    """Send one request; raises ControlError with the daemon's reason when it refuses."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(timeout)
            connection.connect(str(socket_path))
            connection.sendall(json.dumps(request).encode() + b"\n")
            with connection.makefile("rb") as stream:
                line = stream.readline(MAX_REQUEST_BYTES)
    except (FileNotFoundError, ConnectionRefusedError) as error:
        raise ControlError(
            f"km-host-agent is not running ({socket_path}: {error.strerror}); see `systemctl status km-host-agent`"
        ) from error
    except OSError as error:
        raise ControlError(f"talking to km-host-agent at {socket_path}: {error}") from error
    if not line:
        raise ControlError("km-host-agent closed the connection without answering (see `journalctl -u km-host-agent`)")
    response: dict[str, Any] = json.loads(line)
    if not response.get("ok"):
        raise ControlError(str(response.get("error", "refused")))
    return response
