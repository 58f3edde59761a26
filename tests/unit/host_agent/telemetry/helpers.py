"""Real loopback servers and clients for the telemetry tests, and OTLP requests shaped like Claude Code's."""

from __future__ import annotations

import gzip
import http.client
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from host_agent.telemetry import OtlpRequest, Signal

KM_ATTRIBUTES = {"km.sandbox.id": "sb-test-1", "km.profile": "goose", "cloud.region": "eu-west-1"}


def attributes_of(key_values: object) -> dict[str, object]:
    """Protobuf KeyValues as a plain dict of their scalar values."""
    plain: dict[str, object] = {}
    for key_value in key_values:  # type: ignore[attr-defined]
        value = key_value.value
        plain[key_value.key] = getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None
    return plain


def claude_code_logs_request() -> ExportLogsServiceRequest:
    """A user-prompt event as Claude Code exports it, with a sender that claims to be another sandbox."""
    record = LogRecord(
        time_unix_nano=1_700_000_000_000_000_000,
        event_name="claude_code.user_prompt",
        body=AnyValue(string_value="claude_code.user_prompt"),
        attributes=[
            KeyValue(key="event.name", value=AnyValue(string_value="user_prompt")),
            KeyValue(key="prompt_length", value=AnyValue(string_value="42")),
            KeyValue(key="prompt", value=AnyValue(string_value="fix the failing test")),
        ],
    )
    resource = Resource(
        attributes=[
            KeyValue(key="service.name", value=AnyValue(string_value="claude-code")),
            KeyValue(key="service.version", value=AnyValue(string_value="2.0.0")),
            KeyValue(key="km.sandbox.id", value=AnyValue(string_value="spoofed")),
        ]
    )
    scope = InstrumentationScope(name="com.anthropic.claude_code.events", version="2.0.0")
    return ExportLogsServiceRequest(
        resource_logs=[ResourceLogs(resource=resource, scope_logs=[ScopeLogs(scope=scope, log_records=[record])])]
    )


@dataclass
class ListSink:
    """The receiver's sink, keeping what it is handed."""

    received: list[tuple[Signal, OtlpRequest]] = field(default_factory=list)

    def __call__(self, signal: Signal, request: OtlpRequest) -> None:
        self.received.append((signal, request))


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes


def post(
    port: int, path: str, body: bytes, content_type: str, *, gzipped: bool = False, headers: dict[str, str] | None = None
) -> Reply:
    """One HTTP POST to 127.0.0.1, whatever the status."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        sent = {"Content-Type": content_type, **(headers or {})}
        if gzipped:
            body = gzip.compress(body)
            sent["Content-Encoding"] = "gzip"
        connection.request("POST", path, body=body, headers=sent)
        response = connection.getresponse()
        return Reply(response.status, response.getheader("Content-Type") or "", response.read())
    finally:
        connection.close()


@dataclass
class Captured:
    path: str
    headers: dict[str, str]
    body: bytes


class CollectorStub:
    """A minimal OTLP/HTTP collector: records each POST (gunzipped) and answers 200 with an empty body."""

    def __init__(self) -> None:
        self.requests: list[Captured] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                stub.requests.append(Captured(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> CollectorStub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
