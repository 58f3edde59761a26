"""One exported TLS event per connection, direction and message, not per SSL call."""

from __future__ import annotations

from host_agent.capture.coalesce import MAX_SPAN_SECONDS, QUIET_SECONDS, Coalescer, TlsReport

REQUEST = {"protocol": "http/1.1", "method": "GET", "path": "/file", "host": "api.example.test"}
RESPONSE = {"protocol": "http/1.1", "status": 200, "reason": "OK"}


def call(at: float, direction: str, size: int, http: dict[str, str | int] | None = None, pid: int = 7) -> TlsReport:
    return TlsReport(at, pid, "curl", direction, size, ("192.0.2.7", 443), http, None)


def test_a_download_is_one_event_per_message_with_its_calls_and_bytes() -> None:
    coalescer = Coalescer()
    done = coalescer.add(call(0.00, "write", 80, REQUEST), connection=1)
    done += coalescer.add(call(0.01, "read", 16384, RESPONSE), connection=1)  # the other direction: the request is done
    for index in range(1, 10):
        done += coalescer.add(call(0.01 + index * 0.01, "read", 16384), connection=1)

    done += coalescer.due(0.10 + QUIET_SECONDS)

    assert [(r.direction, r.calls, r.size, r.http) for r in done] == [
        ("write", 1, 80, REQUEST),
        ("read", 10, 163840, RESPONSE),
    ]
    assert done[1].time == 0.01  # the first call's time


def test_a_new_message_or_another_connection_is_not_merged() -> None:
    coalescer = Coalescer()
    done = coalescer.add(call(0.0, "write", 80, REQUEST), connection=1)
    done += coalescer.add(call(0.1, "write", 90, REQUEST), connection=1)  # a second request on the connection
    done += coalescer.add(call(0.1, "write", 50), connection=2)
    done += coalescer.add(call(0.1, "write", 50, pid=8), connection=1)  # the same address in another process

    assert [(r.size, r.calls) for r in done] == [(80, 1)]
    assert sorted((r.pid, r.size) for r in coalescer.drain()) == [(7, 50), (7, 90), (8, 50)]


def test_a_long_transfer_is_cut_every_span_so_the_timeline_keeps_up() -> None:
    coalescer = Coalescer()
    done: list[TlsReport] = []
    for index in range(30):
        done += coalescer.add(call(index * 0.1, "read", 1000), connection=1)

    assert [r.calls for r in done] == [int(MAX_SPAN_SECONDS / 0.1)] * 2
    assert coalescer.due(3.0)[0].calls == 10
