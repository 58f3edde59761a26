"""Throttling is retried, not surfaced: a proxy on loopback in front of moto answers the first requests
with 503 ThrottlingException (as AWS does under load), and km's commands still succeed."""

from __future__ import annotations

import http.client
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest

from controller.aws import clients
from controller.aws.config import OperatorConfig
from controller.state.dynamodb import DynamoDBStateStore, ensure_tables
from tests.aws.conftest import REGION, Moto
from tests.unit.controller.state.conftest import new_record

THROTTLED = b'{"__type":"com.amazonaws.dynamodb.v20120810#ThrottlingException","message":"Rate exceeded"}'


class ThrottlingProxy:
    """Forwards to moto, but answers every `every`-th request (and the first `first`) with a 503 throttle."""

    def __init__(self, upstream: str, first: int, every: int = 0) -> None:
        self.first, self.every = first, every
        self.seen = self.throttled = 0
        self.lock = threading.Lock()
        target = urlsplit(upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    proxy.seen += 1
                    throttle = proxy.seen <= proxy.first or (proxy.every and proxy.seen % proxy.every == 0)
                    proxy.throttled += bool(throttle)
                if throttle:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/x-amz-json-1.0")
                    self.send_header("x-amzn-ErrorType", "ThrottlingException")
                    self.send_header("Content-Length", str(len(THROTTLED)))
                    self.end_headers()
                    self.wfile.write(THROTTLED)
                    return
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {key: value for key, value in self.headers.items() if key.lower() != "host"}
                connection.request(self.command, self.path, body=body, headers=headers)
                answer = connection.getresponse()
                payload = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                connection.close()

            do_POST = do_GET = do_PUT = do_DELETE = do_HEAD = _forward  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> Iterator[ThrottlingProxy]:
    running = ThrottlingProxy(moto.endpoint, first=3, every=4)
    monkeypatch.setenv("AWS_ENDPOINT_URL", running.endpoint)
    clients._session.cache_clear()
    yield running
    running.close()
    clients._session.cache_clear()


def test_throttled_calls_are_retried_until_they_succeed(proxy: ThrottlingProxy) -> None:
    ensure_tables(OperatorConfig(), REGION)
    store = DynamoDBStateStore("km-sandboxes", REGION)

    made = [store.insert(new_record(f"alias-{index}")) for index in range(5)]

    assert [record.number for record in store.list()] == [record.number for record in made] == [1, 2, 3, 4, 5]
    assert proxy.throttled >= 3 and proxy.seen > proxy.throttled
    assert os.environ["AWS_ENDPOINT_URL"] == proxy.endpoint  # every call went through the proxy
