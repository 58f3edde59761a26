"""A loopback OTLP/HTTP receiver for agents that export their own telemetry (Claude Code's OTEL output).

Claude Code carries its own TLS stack, so uprobes on libssl cannot see it; its own OpenTelemetry export is
how its prompts, API requests and tool decisions reach the operator. The sandbox points
OTEL_EXPORTER_OTLP_ENDPOINT at this receiver; each request is decoded (http/protobuf or http/json,
optionally gzip), stamped with the sandbox's resource attributes, so the operator can tell sandboxes apart
whatever the agent claims, and handed to a sink (the spool's `write_request`). Replies follow the OTLP/HTTP
spec: an empty Export*ServiceResponse on success, a google.rpc.Status otherwise, in the request's encoding.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from google.protobuf import json_format
from google.rpc.status_pb2 import Status
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from host_agent.paths import OTLP_RECEIVER_PORT
from host_agent.telemetry.otlp_json import (
    RESPONSE_TYPES,
    SIGNALS,
    OtlpDecodeError,
    OtlpRequest,
    Signal,
    request_from_json,
    request_from_protobuf,
)

log = logging.getLogger("km-host-agent.telemetry.receiver")

DEFAULT_PORT = OTLP_RECEIVER_PORT  # the OTLP/HTTP default, so agents need only OTEL_EXPORTER_OTLP_ENDPOINT
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_PATHS: dict[str, Signal] = {f"/v1/{signal}": signal for signal in SIGNALS}
_RESOURCE_FIELDS: dict[Signal, str] = {"traces": "resource_spans", "metrics": "resource_metrics", "logs": "resource_logs"}
# google.rpc.Code values for the Status body of a failed request.
_INVALID_ARGUMENT, _NOT_FOUND, _UNAVAILABLE = 3, 5, 14

Sink = Callable[[Signal, OtlpRequest], object]


@dataclass(frozen=True)
class ReceiverStats:
    """Requests seen, refused (4xx), not stored (the sink failed: 503), and accepted per signal."""

    requests: int
    rejected: int
    sink_failures: int
    accepted: dict[Signal, int] = field(default_factory=dict)


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class OtlpReceiver:
    """OTLP/HTTP on `host:port` (port 0: any free port, see `port`), served from daemon threads."""

    def __init__(
        self,
        resource_attributes: Mapping[str, str],
        sink: Sink,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.resource_attributes = dict(resource_attributes)
        self.max_body_bytes = max_body_bytes
        self._sink = sink
        self._address = (host, port)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._requests = self._rejected = self._sink_failures = 0
        self._accepted = dict.fromkeys(SIGNALS, 0)

    @property
    def port(self) -> int:
        """The bound port; only known once started."""
        if self._server is None:
            raise RuntimeError("the OTLP receiver is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve; raises OSError if the address is taken, before any thread starts."""
        handler = type("OtlpHandler", (_Handler,), {"receiver": self})
        self._server = ThreadingHTTPServer(self._address, handler)
        self._server.daemon_threads = True
        # A short poll so stop() returns promptly (the default 0.5 s would hold up the daemon's stop).
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="otlp-receiver", daemon=True)
        self._thread.start()
        log.info("OTLP receiver listening on %s:%d", self._address[0], self.port)

    def stop(self) -> None:
        """Stop accepting; requests in flight finish on their own (daemon) threads."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def stats(self) -> ReceiverStats:
        with self._lock:
            return ReceiverStats(self._requests, self._rejected, self._sink_failures, dict(self._accepted))

    def _handle(self, handler: _Handler) -> None:
        with self._lock:
            self._requests += 1
        media = handler.headers.get("Content-Type", "").split(";")[0].strip().lower()
        try:
            signal, request = self._decode(handler, media)
            self._stamp(signal, request)
        except _Reject as reject:
            with self._lock:
                self._rejected += 1
            log.debug("OTLP request to %s refused (%d): %s", handler.path, reject.status, reject)
            _reply_status(handler, reject.status, str(reject), media)
            return
        try:
            self._sink(signal, request)
        except Exception as error:
            with self._lock:
                self._sink_failures += 1
            log.error("OTLP receiver could not store %s: %s", signal, error)
            _reply_status(handler, 503, f"could not store {signal}: {error}", media)
            return
        with self._lock:
            self._accepted[signal] += 1
        response = RESPONSE_TYPES[signal]()
        if media == JSON:
            _reply(handler, 200, JSON, json_format.MessageToJson(response, indent=None).encode())
        else:
            _reply(handler, 200, PROTOBUF, response.SerializeToString())

    def _decode(self, handler: _Handler, media: str) -> tuple[Signal, OtlpRequest]:
        signal = _PATHS.get(urlsplit(handler.path).path)
        if signal is None:
            raise _Reject(404, f"no OTLP endpoint at {handler.path}; use /v1/traces, /v1/metrics or /v1/logs")
        if media not in (PROTOBUF, JSON):
            raise _Reject(415, f"Content-Type {media or '(none)'} is not {PROTOBUF} or {JSON}")
        encoding = handler.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip"):
            raise _Reject(415, f"Content-Encoding {encoding} is not supported; send gzip or none")
        length_header = handler.headers.get("Content-Length")
        if length_header is None:
            raise _Reject(411, "Content-Length is required")
        try:
            length = int(length_header)
        except ValueError:
            raise _Reject(400, f"Content-Length {length_header!r} is not a number") from None
        if length < 0:
            raise _Reject(400, f"Content-Length {length} is negative")
        if length > self.max_body_bytes:
            raise _Reject(413, f"body of {length} bytes is over the {self.max_body_bytes}-byte limit")
        body = handler.rfile.read(length)
        if encoding == "gzip":
            body = self._gunzip(body)
        try:
            if media == JSON:
                return signal, request_from_json(signal, body)
            return signal, request_from_protobuf(signal, body)
        except OtlpDecodeError as error:
            raise _Reject(400, str(error)) from None

    def _gunzip(self, body: bytes) -> bytes:
        # Bounded, so a small gzip bomb cannot make the daemon allocate gigabytes.
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            plain = decompressor.decompress(body, self.max_body_bytes + 1)
        except zlib.error as error:
            raise _Reject(400, f"body is not valid gzip: {error}") from None
        if len(plain) > self.max_body_bytes or decompressor.unconsumed_tail:
            raise _Reject(413, f"decompressed body is over the {self.max_body_bytes}-byte limit")
        if not decompressor.eof:
            raise _Reject(400, "gzip body is truncated")
        return plain

    def _stamp(self, signal: Signal, request: OtlpRequest) -> None:
        """Set the sandbox's attributes on every resource, replacing any the sender set under those keys."""
        resources: Any = getattr(request, _RESOURCE_FIELDS[signal])
        for entry in resources:
            attributes = entry.resource.attributes
            kept = [attribute for attribute in attributes if attribute.key not in self.resource_attributes]
            del attributes[:]
            attributes.extend(kept)
            attributes.extend(
                KeyValue(key=key, value=AnyValue(string_value=value)) for key, value in self.resource_attributes.items()
            )


class _Handler(BaseHTTPRequestHandler):
    receiver: OtlpReceiver
    protocol_version = "HTTP/1.1"  # exporters keep their connection open between batches
    timeout = 30  # an idle or stalled client gives its thread back

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.receiver._handle(self)

    def do_GET(self) -> None:  # noqa: N802
        if urlsplit(self.path).path in _PATHS:
            _reply_status(self, 405, "OTLP export is POST only", "")
        else:
            _reply_status(self, 404, f"no OTLP endpoint at {self.path}", "")

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: requests are counted in stats(), refusals logged at debug."""


def _reply_status(handler: BaseHTTPRequestHandler, status: int, message: str, media: str) -> None:
    code = {404: _NOT_FOUND, 503: _UNAVAILABLE}.get(status, _INVALID_ARGUMENT)
    detail = Status(code=code, message=message)
    # The request's body may be unread: close rather than let it be parsed as the next request.
    handler.close_connection = True
    if media == JSON:
        _reply(handler, status, JSON, json_format.MessageToJson(detail, indent=None).encode(), close=True)
    else:
        _reply(handler, status, PROTOBUF, detail.SerializeToString(), close=True)


def _reply(handler: BaseHTTPRequestHandler, status: int, media: str, body: bytes, *, close: bool = False) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", media)
    handler.send_header("Content-Length", str(len(body)))
    if close:
        handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.write(body)
