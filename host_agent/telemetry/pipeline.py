"""The host agent's own traces, metrics and logs: SDK providers wired to the spool or to an operator's collector.

The daemon gets one `Telemetry` with a tracer, a meter and a logger, and calls `shutdown()` last. Export runs on
the SDK's background threads, batched; an export that fails or raises is logged and counted here, and
nothing in this module raises into the daemon after construction (telemetry must never stop enforcement).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from opentelemetry._logs import Logger
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import Meter
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Tracer

from host_agent.telemetry.otlp_json import SIGNALS, Signal
from host_agent.telemetry.spool import Spool, SpoolLogExporter, SpoolMetricExporter, SpoolSpanExporter

log = logging.getLogger("km-host-agent.telemetry")

INSTRUMENTATION_SCOPE = "km-host-agent"
LOG_QUEUE_RECORDS = 32_768
LOG_BATCH_RECORDS = 1_024  # about 0.7 MB of OTLP/JSON: under the spool's 1 MiB per file, so no batch is split
_Result = TypeVar("_Result")


class TelemetryError(ValueError):
    """Telemetry configured so it cannot export anywhere."""


@dataclass(frozen=True)
class ExportCounts:
    """Batches handed to one signal's exporter, and how many of them failed."""

    exports: int
    failures: int


class Telemetry:
    """Tracer, meter and logger for the daemon, exporting to `endpoint` when given, else to `spool`.

    `endpoint` is the collector's base URL (`https://collector:4318`); `/v1/traces`, `/v1/metrics` and
    `/v1/logs` are appended, as for OTEL_EXPORTER_OTLP_ENDPOINT. Requests are http/protobuf, gzip-compressed,
    with `headers` (e.g. an API key) on each.
    """

    def __init__(
        self,
        resource: Resource,
        *,
        spool: Spool | None = None,
        endpoint: str | None = None,
        headers: Mapping[str, str] | None = None,
        metric_export_interval_seconds: float = 60.0,
        export_timeout_seconds: float = 10.0,
    ) -> None:
        self._lock = threading.Lock()
        self._counts = {signal: [0, 0] for signal in SIGNALS}
        self._failing = dict.fromkeys(SIGNALS, False)
        self._shut_down = False
        span_exporter: SpanExporter
        metric_exporter: MetricExporter
        log_exporter: LogRecordExporter
        self.destination: str  # where exports go, for log lines
        if endpoint is not None:
            base = endpoint.rstrip("/")
            options: dict[str, Any] = {
                "headers": dict(headers or {}),
                "timeout": export_timeout_seconds,
                "compression": Compression.Gzip,
            }
            span_exporter = OTLPSpanExporter(endpoint=f"{base}/v1/traces", **options)
            metric_exporter = OTLPMetricExporter(endpoint=f"{base}/v1/metrics", **options)
            log_exporter = OTLPLogExporter(endpoint=f"{base}/v1/logs", **options)
            self.destination = base
        elif spool is not None:
            span_exporter = SpoolSpanExporter(spool)
            metric_exporter = SpoolMetricExporter(spool)
            log_exporter = SpoolLogExporter(spool)
            self.destination = str(spool.root)
        else:
            raise TelemetryError("telemetry needs a destination: an OTLP endpoint, or a spool directory")

        # The daemon owns shutdown (it must flush before exiting), so no atexit hooks.
        self._tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self._tracer_provider.add_span_processor(BatchSpanProcessor(_GuardedSpanExporter(span_exporter, self)))
        reader = PeriodicExportingMetricReader(
            _GuardedMetricExporter(metric_exporter, self),
            export_interval_millis=metric_export_interval_seconds * 1000,
            export_timeout_millis=export_timeout_seconds * 1000,
        )
        self._meter_provider = MeterProvider(resource=resource, metric_readers=[reader], shutdown_on_exit=False)
        self._logger_provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
        # A burst of TLS events (a download is thousands of SSL_read calls) must not overflow the SDK's
        # default 2048-record queue, which drops silently but for a log line.
        self._logger_provider.add_log_record_processor(
            BatchLogRecordProcessor(
                _GuardedLogExporter(log_exporter, self),
                max_queue_size=LOG_QUEUE_RECORDS,
                max_export_batch_size=LOG_BATCH_RECORDS,
                schedule_delay_millis=1000,
            )
        )

        self.tracer: Tracer = self._tracer_provider.get_tracer(INSTRUMENTATION_SCOPE)
        self.meter: Meter = self._meter_provider.get_meter(INSTRUMENTATION_SCOPE)
        # Emit with keywords: logger.emit(event_name=..., body=..., attributes=..., severity_number=...).
        self.logger: Logger = self._logger_provider.get_logger(INSTRUMENTATION_SCOPE)

    def force_flush(self, timeout_seconds: float = 10.0) -> bool:
        """Export everything recorded so far (metrics are collected now); False if any signal did not finish."""
        millis = int(timeout_seconds * 1000)
        flushed = [
            _quietly("flush traces", lambda: self._tracer_provider.force_flush(millis), False),
            _quietly("flush metrics", lambda: self._meter_provider.force_flush(millis), False),
            _quietly("flush logs", lambda: self._logger_provider.force_flush(millis), False),
        ]
        return all(flushed)

    def shutdown(self, timeout_seconds: float = 10.0) -> None:
        """Flush and stop the export threads; safe to call twice. Later records are dropped by the SDK."""
        with self._lock:
            if self._shut_down:
                return
            self._shut_down = True
        _quietly("shut down traces", self._tracer_provider.shutdown, None)
        _quietly("shut down metrics", lambda: self._meter_provider.shutdown(timeout_millis=timeout_seconds * 1000), None)
        _quietly("shut down logs", self._logger_provider.shutdown, None)

    def stats(self) -> dict[Signal, ExportCounts]:
        with self._lock:
            return {signal: ExportCounts(*self._counts[signal]) for signal in SIGNALS}

    def _record(self, signal: Signal, succeeded: bool) -> None:
        """Count an export; log when a signal starts failing and when it recovers, not on every batch."""
        with self._lock:
            counts = self._counts[signal]
            counts[0] += 1
            counts[1] += 0 if succeeded else 1
            was_failing, self._failing[signal] = self._failing[signal], not succeeded
            failures = counts[1]
        if not succeeded and not was_failing:
            log.warning(
                "telemetry export of %s to %s failing (%d failed batches so far)",
                signal,
                self.destination,
                failures,
                extra={"fields": {"signal": signal, "failures": failures}},
            )
        elif succeeded and was_failing:
            log.info("telemetry export of %s to %s works again", signal, self.destination)


def _quietly(action: str, call: Callable[[], _Result], fallback: _Result) -> _Result:
    try:
        return call()
    except Exception as error:
        log.error("telemetry could not %s: %s", action, error, exc_info=True)
        return fallback


class _GuardedSpanExporter(SpanExporter):
    """Counts each export's outcome and turns an exception into a failed export."""

    def __init__(self, inner: SpanExporter, telemetry: Telemetry) -> None:
        self._inner, self._telemetry = inner, telemetry

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = _quietly("export traces", lambda: self._inner.export(spans), SpanExportResult.FAILURE)
        self._telemetry._record("traces", result is SpanExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        _quietly("shut down the trace exporter", self._inner.shutdown, None)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return _quietly("flush the trace exporter", lambda: self._inner.force_flush(timeout_millis), False)


class _GuardedMetricExporter(MetricExporter):
    """Counts each export's outcome and turns an exception into a failed export."""

    def __init__(self, inner: MetricExporter, telemetry: Telemetry) -> None:
        # The reader asks the exporter it holds for temporality and aggregation: pass the inner one's on.
        super().__init__(inner._preferred_temporality, inner._preferred_aggregation)
        self._inner, self._telemetry = inner, telemetry

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        result = _quietly(
            "export metrics", lambda: self._inner.export(metrics_data, timeout_millis, **kwargs), MetricExportResult.FAILURE
        )
        self._telemetry._record("metrics", result is MetricExportResult.SUCCESS)
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return _quietly("flush the metric exporter", lambda: self._inner.force_flush(timeout_millis), False)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        _quietly("shut down the metric exporter", lambda: self._inner.shutdown(timeout_millis, **kwargs), None)


class _GuardedLogExporter(LogRecordExporter):
    """Counts each export's outcome and turns an exception into a failed export."""

    def __init__(self, inner: LogRecordExporter, telemetry: Telemetry) -> None:
        self._inner, self._telemetry = inner, telemetry

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        result = _quietly("export logs", lambda: self._inner.export(batch), LogRecordExportResult.FAILURE)
        self._telemetry._record("logs", result is LogRecordExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        _quietly("shut down the log exporter", self._inner.shutdown, None)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return _quietly("flush the log exporter", lambda: self._inner.force_flush(timeout_millis), False)
