"""A loopback HTTP proxy in front of moto, so tests can see, throttle or interrupt the AWS traffic of km's
own processes (boto3 clients reach it through AWS_ENDPOINT_URL) without patching anything inside km."""

from __future__ import annotations

import enum
import http.client
import os
import re
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

THROTTLED = b'{"__type":"com.amazonaws.dynamodb.v20120810#ThrottlingException","message":"Rate exceeded"}'
READ_PREFIXES = ("Describe", "Get", "List", "Query", "Scan", "BatchGet", "Head")
# SigV4's credential scope names the signing service: Credential=<key>/<date>/<region>/<service>/aws4_request.
CREDENTIAL_SERVICE = re.compile(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/aws4_request")


@dataclass(frozen=True)
class Request:
    """One request as it reached the proxy."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def service(self) -> str:
        found = CREDENTIAL_SERVICE.search(self.headers.get("authorization", ""))
        return found.group(1) if found else "?"

    @property
    def operation(self) -> str:
        """The query-protocol Action, the JSON-protocol target, or (REST) method and path without its query."""
        target = self.headers.get("x-amz-target")
        if target:
            return target.rsplit(".", 1)[-1]
        if self.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            actions = parse_qs(self.body.decode("utf-8", "replace")).get("Action")
            if actions:
                return actions[0]
        return f"{self.method} {urlsplit(self.path).path}"

    @property
    def name(self) -> str:
        return f"{self.service}:{self.operation}"

    @property
    def mutating(self) -> bool:
        """Everything but reads: Describe*/Get*/List*/Query/Scan actions and REST GET/HEAD."""
        if self.method in ("GET", "HEAD"):
            return False
        return not self.operation.startswith(READ_PREFIXES)


class Verdict(enum.Enum):
    FORWARD = "forward"
    THROTTLE = "throttle"  # answer 503 ThrottlingException instead of forwarding
    KILL = "kill"  # SIGKILL the proxy's `victim` pid, and drop the request unforwarded


Hook = Callable[[Request], Verdict]


@dataclass
class Seen:
    """What went through: every request in arrival order, and how many were throttled or killed."""

    requests: list[Request] = field(default_factory=list)
    throttled: int = 0
    killed: list[Request] = field(default_factory=list)


class LoopbackProxy:
    """Forwards every request to `upstream`, unless `hook` (asked once per request, under a lock, so in a
    single order) says to throttle it or to kill `victim` first."""

    def __init__(self, upstream: str, hook: Hook | None = None) -> None:
        self.hook = hook
        self.victim: int | None = None
        self.log = Seen()
        self.lock = threading.Lock()
        target = urlsplit(upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._read_body()
                headers = {key.lower(): value for key, value in self.headers.items()}
                request = Request(self.command, self.path, headers, body)
                with proxy.lock:
                    proxy.log.requests.append(request)
                    verdict = proxy.hook(request) if proxy.hook else Verdict.FORWARD
                    if verdict is Verdict.THROTTLE:
                        proxy.log.throttled += 1
                    elif verdict is Verdict.KILL:
                        proxy.log.killed.append(request)
                        assert proxy.victim is not None, "a KILL verdict needs proxy.victim"
                        os.kill(proxy.victim, signal.SIGKILL)
                if verdict is Verdict.KILL:
                    self.close_connection = True  # the caller is dead; the request never reaches moto
                    return
                if verdict is Verdict.THROTTLE:
                    self._answer(
                        503,
                        [("Content-Type", "application/x-amz-json-1.0"), ("x-amzn-ErrorType", "ThrottlingException")],
                        THROTTLED,
                    )
                    return
                connection = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=60)
                try:
                    skip = ("host", "transfer-encoding", "content-length", "connection")
                    sent = {key: value for key, value in self.headers.items() if key.lower() not in skip}
                    sent["Content-Length"] = str(len(body))
                    connection.request(self.command, self.path, body=body, headers=sent)
                    answer = connection.getresponse()
                    payload = answer.read()
                finally:
                    connection.close()
                kept = ("content-length", "transfer-encoding", "connection", "server", "date")
                self._answer(answer.status, [(k, v) for k, v in answer.getheaders() if k.lower() not in kept], payload)

            def _answer(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_POST = do_GET = do_PUT = do_DELETE = do_HEAD = do_PATCH = _forward  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def seen(self) -> int:
        return len(self.log.requests)

    @property
    def throttled(self) -> int:
        return self.log.throttled

    def mutating(self) -> list[str]:
        """The names of the mutating requests so far, in arrival order."""
        with self.lock:
            return [request.name for request in self.log.requests if request.mutating]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ThrottlingProxy(LoopbackProxy):
    """Answers the first `first` requests, and every `every`-th one, with a 503 throttle."""

    def __init__(self, upstream: str, first: int, every: int = 0) -> None:
        def throttle(_: Request) -> Verdict:
            count = self.seen  # this request is already counted
            return Verdict.THROTTLE if count <= first or (every and count % every == 0) else Verdict.FORWARD

        super().__init__(upstream, throttle)
