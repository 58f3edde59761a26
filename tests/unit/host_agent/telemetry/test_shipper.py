"""The spool is shipped oldest first under `telemetry/<sandbox>/<signal>/`, and kept while the store is down."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from host_agent.outbox.targets import DirectoryTarget
from host_agent.telemetry.shipper import TelemetryShipper
from host_agent.telemetry.spool import Spool


class RecordingTarget:
    """Stores into a directory and remembers the order of keys; can be made to fail."""

    def __init__(self, root: Path) -> None:
        self.inner = DirectoryTarget(root)
        self.keys: list[str] = []
        self.down = False

    def put(self, key: str, source: Path) -> None:
        if self.down:
            raise OSError("store unreachable")
        self.inner.put(key, source)
        self.keys.append(key)


def test_files_are_shipped_in_write_order_then_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    written = [spool.write_request(signal, ExportLogsServiceRequest())[0] for signal in ("logs", "traces", "logs")]  # type: ignore[arg-type]
    target = RecordingTarget(tmp_path / "artifacts")
    shipper = TelemetryShipper(spool, target, "sb-1")

    assert shipper.ship_now() is True

    assert target.keys == [f"telemetry/sb-1/{path.parent.name}/{path.name}" for path in written]
    assert shipper.pending() == 0 and shipper.shipped == 3
    assert (tmp_path / "artifacts" / target.keys[0]).read_text() == "{}"


def test_a_failed_upload_keeps_the_file_and_the_next_pass_ships_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.write_request("metrics", ExportLogsServiceRequest())  # type: ignore[arg-type]
    target = RecordingTarget(tmp_path / "artifacts")
    shipper = TelemetryShipper(spool, target, "sb-1")
    target.down = True

    assert shipper.ship_now() is False
    assert shipper.pending() == 1 and shipper.last_error == "OSError: store unreachable"

    target.down = False
    assert shipper.ship_now() is True
    assert shipper.pending() == 0 and shipper.last_error is None and len(target.keys) == 1


def test_stop_ships_what_is_left(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    target = RecordingTarget(tmp_path / "artifacts")
    shipper = TelemetryShipper(spool, target, "sb-1", interval_seconds=3600)
    shipper.start()
    spool.write_request("logs", ExportLogsServiceRequest())  # type: ignore[arg-type]

    shipper.stop()

    assert len(target.keys) == 1 and shipper.pending() == 0
