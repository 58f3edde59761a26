"""The spool on a real directory: whole files only, split when large, bounded with counted drops."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from host_agent.telemetry import SIGNALS, Spool, SpoolError, request_from_json


def spans_request(count: int, *, payload: int = 100, resources: int = 1) -> ExportTraceServiceRequest:
    """`count` spans per resource, each with a `payload`-byte attribute."""
    return ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=[KeyValue(key="r", value=AnyValue(int_value=r))]),
                scope_spans=[
                    ScopeSpans(
                        spans=[
                            Span(
                                name=f"span-{r}-{i}",
                                trace_id=bytes([r + 1]) * 16,
                                span_id=i.to_bytes(8, "big"),
                                attributes=[KeyValue(key="blob", value=AnyValue(string_value="x" * payload))],
                            )
                            for i in range(count)
                        ]
                    )
                ],
            )
            for r in range(resources)
        ]
    )


def span_names(spool: Spool) -> list[str]:
    names = []
    for path in spool.files("traces"):
        request = request_from_json("traces", path.read_text())
        assert isinstance(request, ExportTraceServiceRequest)
        names += [span.name for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans]
    return names


def test_file_layout_is_signal_directory_and_sortable_utc_name(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    [path] = spool.write_request("traces", spans_request(1))
    assert path.parent == tmp_path / "traces"
    assert path.name.endswith("-000001.json") and path.name[8] == "T" and "Z-" in path.name
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp", "logs", "metrics", "traces"]
    assert list((tmp_path / ".tmp").iterdir()) == []
    assert spool.stats().files_written == 1


def test_concurrent_writers_and_a_watching_reader_only_ever_see_whole_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_total_bytes=1024 * 1024 * 1024)
    writers, per_writer = 8, 30
    done = threading.Event()
    seen_by_reader: set[Path] = set()
    reader_errors: list[BaseException] = []

    def write(n: int) -> None:
        for _ in range(per_writer):
            spool.write_request(SIGNALS[n % 3], spans_request(20, payload=2000) if n % 3 == 0 else ExportTraceServiceRequest())

    def watch() -> None:
        # Parse every file the moment it is listed, as an uploader would.
        while not done.is_set():
            for signal in SIGNALS:
                for path in (tmp_path / signal).iterdir():
                    if path not in seen_by_reader:
                        try:
                            request_from_json(signal, path.read_bytes())
                        except BaseException as error:  # a partial file: the assertion below reports it
                            reader_errors.append(error)
                        seen_by_reader.add(path)

    reader = threading.Thread(target=watch)
    reader.start()
    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    reader.join()

    assert reader_errors == []
    files = [path for signal in SIGNALS for path in spool.files(signal)]
    assert len(files) == writers * per_writer == spool.stats().files_written
    assert len({path.name for path in files}) == len(files)
    for path in files:
        request_from_json(path.parent.name, path.read_bytes())  # type: ignore[arg-type]
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_over_the_bound_the_oldest_files_go_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path, max_file_bytes=4096, max_total_bytes=16 * 1024)
    caplog.set_level(logging.WARNING, logger="km-host-agent.telemetry")
    written = [spool.write_request("traces", spans_request(1, payload=2000))[0] for _ in range(20)]
    kept = spool.files("traces")
    size = kept[0].stat().st_size
    assert kept == written[-len(kept) :]  # the newest survive
    assert sum(path.stat().st_size for path in kept) <= 16 * 1024
    stats = spool.stats()
    assert stats.files_dropped == 20 - len(kept) > 0
    assert stats.bytes_dropped == stats.files_dropped * size
    # Logged at once, then at most once a minute (with the counts since), not on every write.
    [report] = [record.getMessage() for record in caplog.records if "over its" in record.getMessage()]
    assert "dropped the 1 oldest files" in report


def test_files_the_uploader_removed_make_room_and_are_not_counted_as_drops(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_file_bytes=4096, max_total_bytes=16 * 1024)
    for _ in range(20):
        for path in spool.write_request("traces", spans_request(1, payload=2000)):
            path.unlink()  # uploaded
    assert spool.stats().files_dropped == 0


def test_the_bound_counts_files_already_there_at_start(tmp_path: Path) -> None:
    first = Spool(tmp_path, max_file_bytes=4096, max_total_bytes=16 * 1024)
    for _ in range(7):
        first.write_request("traces", spans_request(1, payload=2000))
    again = Spool(tmp_path, max_file_bytes=4096, max_total_bytes=16 * 1024)
    again.write_request("logs", ExportTraceServiceRequest())
    assert again.stats().files_dropped == 0
    again.write_request("traces", spans_request(1, payload=2000))
    assert again.stats().files_dropped == 1


def test_a_request_larger_than_a_file_is_split_without_losing_a_span(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_file_bytes=8 * 1024)
    request = spans_request(30, payload=500, resources=3)
    paths = spool.write_request("traces", request)
    assert len(paths) > 3
    assert all(path.stat().st_size <= 8 * 1024 for path in paths)
    assert sorted(span_names(spool)) == sorted(f"span-{r}-{i}" for r in range(3) for i in range(30))
    # Each part still names its resource.
    for path in paths:
        part = request_from_json("traces", path.read_text())
        assert isinstance(part, ExportTraceServiceRequest)
        assert all(rs.resource.attributes[0].key == "r" for rs in part.resource_spans)


def test_a_single_record_larger_than_a_file_is_dropped_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path, max_file_bytes=4096)
    caplog.set_level(logging.WARNING, logger="km-host-agent.telemetry")
    request = spans_request(1, payload=100)
    request.resource_spans[0].scope_spans[0].spans.append(
        Span(name="huge", attributes=[KeyValue(key="b", value=AnyValue(string_value="x" * 10_000))])
    )
    spool.write_request("traces", request)
    assert span_names(spool) == ["span-0-0"]
    assert spool.stats().records_dropped_oversize == 1
    assert "dropped a traces record" in caplog.text


def test_a_write_cut_short_by_a_crash_is_cleared_at_start(tmp_path: Path) -> None:
    Spool(tmp_path)
    (tmp_path / ".tmp" / "traces-half.json").write_text('{"resourceSp')
    spool = Spool(tmp_path)
    assert list((tmp_path / ".tmp").iterdir()) == []
    assert spool.files("traces") == []


def test_sizes_that_cannot_work_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="max_file_bytes"):
        Spool(tmp_path, max_file_bytes=10)
    with pytest.raises(SpoolError, match="max_total_bytes"):
        Spool(tmp_path, max_file_bytes=4096, max_total_bytes=1024 * 2)
