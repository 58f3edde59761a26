"""`receiver`: a real OTLP receiver on 127.0.0.1 (any free port) with the test sandbox's attributes and a list sink."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from host_agent.telemetry import OtlpReceiver
from tests.unit.host_agent.telemetry.helpers import KM_ATTRIBUTES, ListSink


@pytest.fixture
def sink() -> ListSink:
    return ListSink()


@pytest.fixture
def receiver(sink: ListSink) -> Iterator[OtlpReceiver]:
    running = OtlpReceiver(KM_ATTRIBUTES, sink, port=0, max_body_bytes=64 * 1024)
    running.start()
    yield running
    running.stop()
