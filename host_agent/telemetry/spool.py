"""The default telemetry destination: a bounded directory of batched OTLP/JSON files, one signal per file.

Files appear as `<spool>/<signal>/<UTC timestamp>-<seq>.json`, each the OTLP/JSON encoding of one
Export*ServiceRequest. A file is written under `<spool>/.tmp/` and renamed into its signal directory, so
whatever watches the signal directories (the outbox uploads them to
`<artifacts>/telemetry/<sandbox>/<signal>/`) only ever sees whole files. The uploader removes a file once
it is stored; should it fall behind, the spool keeps its total size bounded by dropping the oldest files,
counted and logged. Share one `Spool` per directory: temp names and sequence numbers are per instance.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from host_agent.telemetry.log_json import logs_json
from host_agent.telemetry.otlp_json import SIGNALS, OtlpRequest, Signal, request_to_json

log = logging.getLogger("km-host-agent.telemetry")

MiB = 1024 * 1024
DEFAULT_MAX_FILE_BYTES = 1 * MiB
DEFAULT_MAX_TOTAL_BYTES = 64 * MiB
DROP_REPORT_INTERVAL_SECONDS = 60.0
_TMP_DIR = ".tmp"

# Where each signal's records sit in its request: resources, then scopes, then the records themselves.
_LAYOUT: dict[Signal, tuple[str, str, str]] = {
    "traces": ("resource_spans", "scope_spans", "spans"),
    "metrics": ("resource_metrics", "scope_metrics", "metrics"),
    "logs": ("resource_logs", "scope_logs", "log_records"),
}


class SpoolError(ValueError):
    """A spool configured so it cannot work (sizes); the message names the setting."""


@dataclass(frozen=True)
class SpoolStats:
    """What the spool wrote and what it had to throw away; drops are never silent."""

    files_written: int
    bytes_written: int
    files_dropped: int
    bytes_dropped: int
    records_dropped_oversize: int


class Spool:
    """A bounded directory of OTLP/JSON files, safe to write from several threads."""

    def __init__(
        self,
        root: Path,
        *,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    ) -> None:
        if max_file_bytes < 1024:
            raise SpoolError(f"spool max_file_bytes must be at least 1024, got {max_file_bytes}")
        if max_total_bytes < max_file_bytes:
            raise SpoolError(f"spool max_total_bytes ({max_total_bytes}) must be at least max_file_bytes ({max_file_bytes})")
        self.root = root
        self.max_file_bytes = max_file_bytes
        self.max_total_bytes = max_total_bytes
        self._tmp = root / _TMP_DIR
        # Telemetry may hold prompts and tool details: readable by the daemon (root) only.
        for directory in (root, self._tmp, *(root / signal for signal in SIGNALS)):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in self._tmp.iterdir():  # a write cut short by a crash; never renamed, never seen
            leftover.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self._seq = 0
        self._total_bytes = sum(size for _, size in self._files_oldest_first())
        self._files_written = self._bytes_written = 0
        self._files_dropped = self._bytes_dropped = self._records_dropped_oversize = 0
        self._unreported_files = self._unreported_bytes = 0
        self._last_drop_report: float | None = None

    def write_request(self, signal: Signal, request: OtlpRequest) -> list[Path]:
        """Write one request as one file, or as several if its JSON exceeds `max_file_bytes`; returns the files.

        Raises OSError when the disk refuses the write; exporters turn that into a failed export.
        """
        return [self._write_file(signal, payload) for payload in self._payloads(signal, request)]

    def write_payload(self, signal: Signal, payload: bytes) -> Path:
        """Write OTLP/JSON already encoded (and within `max_file_bytes`) as one file."""
        if len(payload) > self.max_file_bytes:
            raise SpoolError(f"a {len(payload)}-byte payload is larger than a spool file may be ({self.max_file_bytes})")
        return self._write_file(signal, payload)

    def files(self, signal: Signal) -> list[Path]:
        """A signal's complete files, oldest first."""
        return sorted((self.root / signal).glob("*.json"))

    def stats(self) -> SpoolStats:
        with self._lock:
            return SpoolStats(
                self._files_written,
                self._bytes_written,
                self._files_dropped,
                self._bytes_dropped,
                self._records_dropped_oversize,
            )

    def _payloads(self, signal: Signal, request: OtlpRequest) -> list[bytes]:
        payload = request_to_json(request).encode()
        if len(payload) <= self.max_file_bytes:
            return [payload]
        halves = _halve(signal, request)
        if halves is None:  # a single record larger than a file may be
            with self._lock:
                self._records_dropped_oversize += 1
            log.warning(
                "telemetry spool dropped a %s record of %d bytes: larger than a spool file may be (%d bytes)",
                signal,
                len(payload),
                self.max_file_bytes,
                extra={"fields": {"signal": signal, "bytes": len(payload)}},
            )
            return []
        return [part for half in halves for part in self._payloads(signal, half)]

    def _write_file(self, signal: Signal, payload: bytes) -> Path:
        with self._lock:
            self._seq += 1
            # Taken under the lock so names sort in write order across signals and threads.
            name = f"{datetime.now(UTC):%Y%m%dT%H%M%S.%fZ}-{self._seq:06d}.json"
        temporary = self._tmp / f"{signal}-{name}"
        try:
            with open(temporary, "wb") as file:
                file.write(payload)
                file.flush()
                os.fsync(file.fileno())
            final = self.root / signal / name
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        with self._lock:
            self._files_written += 1
            self._bytes_written += len(payload)
            self._total_bytes += len(payload)
            if self._total_bytes > self.max_total_bytes:
                self._drop_oldest()
        return final

    def _drop_oldest(self) -> None:
        """Bring the spool under its bound; called with the lock held."""
        # Recount from the directory: the uploader removes files behind our back, so the running total is
        # only an upper bound, and nothing should be dropped that has already been stored.
        files = self._files_oldest_first()
        total = sum(size for _, size in files)
        dropped_files = dropped_bytes = 0
        for path, size in files:
            if total <= self.max_total_bytes:
                break
            try:
                path.unlink()
            except FileNotFoundError:  # uploaded and removed meanwhile: not a drop
                pass
            else:
                dropped_files += 1
                dropped_bytes += size
            total -= size
        self._total_bytes = total
        if not dropped_files:
            return
        self._files_dropped += dropped_files
        self._bytes_dropped += dropped_bytes
        self._unreported_files += dropped_files
        self._unreported_bytes += dropped_bytes
        # While the uploader is down every write drops a file: one line a minute says so, with the counts.
        now = time.monotonic()
        if self._last_drop_report is None or now - self._last_drop_report >= DROP_REPORT_INTERVAL_SECONDS:
            log.warning(
                "telemetry spool over its %d-byte bound: dropped the %d oldest files (%d bytes); %d dropped since start",
                self.max_total_bytes,
                self._unreported_files,
                self._unreported_bytes,
                self._files_dropped,
                extra={"fields": {"dropped_files": self._unreported_files, "dropped_bytes": self._unreported_bytes}},
            )
            self._last_drop_report = now
            self._unreported_files = self._unreported_bytes = 0

    def _files_oldest_first(self) -> list[tuple[Path, int]]:
        found: list[tuple[str, Path, int]] = []
        for signal in SIGNALS:
            with os.scandir(self.root / signal) as entries:
                for entry in entries:
                    if entry.name.endswith(".json"):
                        try:
                            found.append((entry.name, Path(entry.path), entry.stat().st_size))
                        except FileNotFoundError:
                            continue
        return [(path, size) for _, path, size in sorted(found)]


def _halve(signal: Signal, request: OtlpRequest) -> tuple[OtlpRequest, OtlpRequest] | None:
    """Split a request in two at the outermost level holding more than one entry; None if it is one record."""
    for depth in range(3):
        entries = _entries(signal, request, depth)
        if len(entries) == 0:
            return None
        if len(entries) > 1:
            middle = len(entries) // 2
            first, second = copy.deepcopy(request), copy.deepcopy(request)
            del _entries(signal, first, depth)[middle:]
            del _entries(signal, second, depth)[:middle]
            return first, second
    return None


def _entries(signal: Signal, request: OtlpRequest, depth: int) -> Any:
    """The repeated field at `depth` (0 resources, 1 scopes, 2 records), following the first entry above it."""
    fields = _LAYOUT[signal]
    container: Any = request
    for field in fields[:depth]:
        container = getattr(container, field)[0]
    return getattr(container, fields[depth])


class SpoolSpanExporter(SpanExporter):
    """Writes each batch of spans to the spool as one OTLP/JSON file."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans or _write(self._spool, "traces", encode_spans(spans)):
            return SpanExportResult.SUCCESS
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        """Nothing to release: every export is already on disk."""

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


class SpoolMetricExporter(MetricExporter):
    """Writes each collection of metrics to the spool as one OTLP/JSON file (cumulative temporality, the SDK's default)."""

    def __init__(self, spool: Spool) -> None:
        super().__init__()
        self._spool = spool

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        request = encode_metrics(metrics_data)
        if not request.resource_metrics or _write(self._spool, "metrics", request):
            return MetricExportResult.SUCCESS
        return MetricExportResult.FAILURE

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Nothing to release: every export is already on disk."""


class SpoolLogExporter(LogRecordExporter):
    """Writes each batch of log records to the spool as one OTLP/JSON file.

    It subclasses `LogRecordExporter`, which the SDK now names the base (its `LogExporter` is a deprecated alias).
    """

    def __init__(self, spool: Spool) -> None:
        self._spool = spool

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        if not batch:
            return LogRecordExportResult.SUCCESS
        # The direct encoder is ten times cheaper; a batch too big for one file takes the protobuf
        # path, which knows how to split it.
        payload = json.dumps(logs_json(batch), separators=(",", ":")).encode()
        if len(payload) <= self._spool.max_file_bytes:
            written = _write_payload(self._spool, "logs", payload)
        else:
            written = _write(self._spool, "logs", encode_logs(batch))
        return LogRecordExportResult.SUCCESS if written else LogRecordExportResult.FAILURE

    def shutdown(self) -> None:
        """Nothing to release: every export is already on disk."""

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def _write(spool: Spool, signal: Signal, request: OtlpRequest) -> bool:
    return _written(spool, signal, lambda: spool.write_request(signal, request))


def _write_payload(spool: Spool, signal: Signal, payload: bytes) -> bool:
    return _written(spool, signal, lambda: spool.write_payload(signal, payload))


def _written(spool: Spool, signal: Signal, write: Callable[[], object]) -> bool:
    """Run one spool write; a disk that refuses it is logged and reported as a failed export."""
    try:
        write()
    except OSError as error:
        log.error("telemetry spool could not write %s to %s: %s", signal, spool.root, error)
        return False
    return True
