"""The daemon's main loop: load the policy, start the components, tell systemd it is ready, pet the watchdog.

Components (the gatekeeper, the TLS capture, agent runs and their control socket, the outbox) start
before READY=1, so `systemctl start` returning means the sandbox can take runs. Telemetry starts just
after, on its own thread (its imports alone take a third of a second); what the gate and the capture
report meanwhile waits in a buffer. The loop takes signals
synchronously (`sigtimedwait`), so there are no handlers racing it, and between signals it reconciles
runs whose wrapper died unrecorded. The components' threads inherit the blocked signal mask.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from host_agent.config import HostAgentConfig, SandboxIdentity, load_config, load_identity
from host_agent.control import ControlServer
from host_agent.paths import (
    CONFIG_PATH,
    CONTROL_SOCKET,
    OTLP_RECEIVER_PORT,
    SANDBOX_ENV_PATH,
    STATE_DIR,
    TELEMETRY_ENV_PATH,
    TMUX_SOCKET,
)
from host_agent.runs.layout import TERMINAL, all_runs
from host_agent.runs.sessions import RunSessions
from host_agent.sdnotify import notify, watchdog_interval_seconds
from host_agent.telemetry.buffered import BufferedEvents
from host_agent.version import __version__

if TYPE_CHECKING:
    from host_agent.capture.component import TlsCaptureComponent
    from host_agent.gatekeeper.component import Gatekeeper
    from host_agent.outbox import Outbox
    from host_agent.readonly_bus import ReadOnlyBus
    from host_agent.telemetry.component import Observability

log = logging.getLogger("km-host-agent")
RECONCILE_INTERVAL_SECONDS = 2.0


class _JournalFormatter(logging.Formatter):
    """One JSON object per line: the journal keeps lines, operators grep and parse them."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {"level": record.levelname.lower(), "message": record.getMessage(), "logger": record.name}
        fields.update(getattr(record, "fields", {}))
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return json.dumps(fields, sort_keys=True, default=str)


@dataclass(frozen=True)
class DaemonPaths:
    """Where the daemon finds and keeps things; the defaults are the sandbox's, tests point them elsewhere."""

    config: Path = CONFIG_PATH
    identity: Path = SANDBOX_ENV_PATH
    control_socket: Path = CONTROL_SOCKET
    tmux_socket: Path = TMUX_SOCKET
    state_dir: Path = STATE_DIR
    sandbox_user: str = "sandbox"
    # The cgroup the egress gate is attached to; None: no gate (tests of other parts, on a host).
    gate_cgroup: Path | None = None
    telemetry_env: Path = TELEMETRY_ENV_PATH
    otlp_port: int = OTLP_RECEIVER_PORT
    metric_export_interval_seconds: float = 60.0


def start_operator_slice() -> None:
    """Start (or keep) the slice `km shell --root` runs in; slices stay once started, so its cgroup, and
    the id the gate exempts, do not change with each shell."""
    from host_agent.containment import OPERATOR_SLICE

    result = subprocess.run(["systemctl", "start", OPERATOR_SLICE], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        log.warning("could not start the operator slice", extra={"fields": {"error": result.stderr.strip()}})


class Daemon:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, paths: DaemonPaths) -> None:
        self.paths = paths
        self.config: HostAgentConfig | None = None
        self.identity: SandboxIdentity | None = None
        self.runs: Any = None
        self.outbox: Outbox | None = None
        self.outbox_error: str | None = None
        self.gatekeeper: Gatekeeper | None = None
        self.control: ControlServer | None = None
        self.events = BufferedEvents()
        self.observability: Observability | None = None
        self.observability_error: str | None = None
        self._observability_thread: threading.Thread | None = None
        self.capture: TlsCaptureComponent | None = None
        self.capture_error: str | None = None
        self.readonly_bus: ReadOnlyBus | None = None

    def run(self) -> int:
        try:
            self.config = load_config(self.paths.config)
            self.identity = load_identity(self.paths.identity)
        except (OSError, ValueError) as error:  # ValueError: ValidationError, undecodable bytes
            log.error("cannot load config", extra={"fields": {"config": str(self.paths.config), "error": str(error)}})
            return 1
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)  # before any thread starts: they inherit it
        try:
            self._start_gate(self.config, self.identity)
        except Exception as error:  # no READY without the gate: the sandbox must not run agents unguarded
            log.error("egress gate failed to start", extra={"fields": {"error": f"{type(error).__name__}: {error}"}})
            return 1
        self._start_capture(self.config)
        self._start_components(self.config, self.identity)
        notify("READY=1", f"STATUS=enforcing profile {self.config.profile}")
        log.info("ready", extra={"fields": {"version": __version__, "profile": self.config.profile}})
        # After READY: its imports hold the GIL for a third of a second, which would slow the start.
        self._observability_thread = threading.Thread(
            target=self._start_observability, args=(self.config, self.identity), name="telemetry-start", daemon=True
        )
        self._observability_thread.start()
        interval = min(watchdog_interval_seconds() or 5.0, RECONCILE_INTERVAL_SECONDS)
        while True:
            notify("WATCHDOG=1")
            received = signal.sigtimedwait(self.SIGNALS, interval)
            if received is None:
                self._reconcile()
                continue
            if received.si_signo == signal.SIGHUP:
                self._reload()
                continue
            break
        notify("STOPPING=1")
        took = self._stop_components()
        log.info("stopped", extra={"fields": {"profile": self.config.profile, "stop_seconds": took}})
        return 0

    def _start_gate(self, config: HostAgentConfig, identity: SandboxIdentity) -> None:
        if self.paths.gate_cgroup is None:
            return
        from host_agent.gatekeeper.component import Gatekeeper, cgroup2_root, own_cgroup

        automatic = str(self.paths.gate_cgroup) == "auto"
        root = cgroup2_root() if automatic else self.paths.gate_cgroup
        if automatic:  # under the machine's own systemd: what the agent's units need (host_agent/containment.py)
            from host_agent.containment import prepare_read_only_targets
            from host_agent.readonly_bus import ReadOnlyBus

            prepare_read_only_targets()  # before the bus: no agent unit starts without the bus
            start_operator_slice()

            self.readonly_bus = ReadOnlyBus()
            self.readonly_bus.start()
        state = self.paths.state_dir
        self.gatekeeper = Gatekeeper(
            config,
            identity,
            root,
            learn_report=state / "learn-report.json",
            policy_record=state / "gate-policy.json",
            events=self.events,
            daemon_cgroup=own_cgroup(root) if automatic else None,
        )
        self.gatekeeper.start()

    def _start_observability(self, config: HostAgentConfig, identity: SandboxIdentity) -> None:
        """Telemetry, on its own thread; a failure is reported in health and logs, never stops the daemon."""
        try:
            from host_agent.telemetry.component import Observability, load_destination

            target = None
            if identity.artifacts_uri:
                from host_agent.outbox import target_for

                target = target_for(identity.artifacts_uri, region=config.region)
            observability = Observability(
                config,
                identity,
                self.paths.state_dir,
                destination=load_destination(self.paths.telemetry_env),
                upload_target=target,
                receiver_port=self.paths.otlp_port,
                metric_export_interval_seconds=self.paths.metric_export_interval_seconds,
            )
            self.events.attach(observability.start())
            self.observability = observability
        except Exception as error:
            self.observability_error = f"{type(error).__name__}: {error}"
            log.error("telemetry not started", extra={"fields": {"error": self.observability_error}})

    def _start_capture(self, config: HostAgentConfig) -> None:
        """TLS capture when the profile enables it; without it the sandbox still runs, and health says why."""
        if not config.observability.tls_capture.enabled or self.paths.gate_cgroup is None:
            return
        from host_agent.capture.component import CaptureError, TlsCaptureComponent
        from host_agent.gatekeeper.component import cgroup2_root

        root = cgroup2_root() if str(self.paths.gate_cgroup) == "auto" else self.paths.gate_cgroup
        capture = TlsCaptureComponent(config.observability.tls_capture, root, self.events)
        try:
            capture.start()
        except CaptureError as error:
            self.capture_error = str(error)
            log.error("TLS capture not started", extra={"fields": {"error": self.capture_error}})
            return
        self.capture = capture

    def _start_components(self, config: HostAgentConfig, identity: SandboxIdentity) -> None:
        from host_agent.runs.service import AgentRuns

        self.runs = AgentRuns(config, identity, RunSessions(self.paths.tmux_socket), user_name=self.paths.sandbox_user)
        self._reconcile()
        if identity.artifacts_uri:
            from host_agent.outbox import Outbox, target_for

            try:
                self.outbox = Outbox(
                    self.runs.root,
                    identity.sandbox_id,
                    target_for(identity.artifacts_uri, region=config.region),
                    self.paths.state_dir / "outbox",
                )
                self.outbox.start()
            except Exception as error:  # runs still work and keep their results in the sandbox; say so loudly
                self.outbox, self.outbox_error = None, f"{type(error).__name__}: {error}"
                log.error("outbox not started; results stay in the sandbox", extra={"fields": {"error": self.outbox_error}})
        self.control = ControlServer(self._handle, self.paths.control_socket)
        self.control.start()

    def _stop_components(self) -> dict[str, float]:
        """Stop each component; returns how long each took (seconds), which the stop log reports."""
        took: dict[str, float] = {}
        if self._observability_thread is not None:
            self._observability_thread.join(timeout=10)
        components = (
            ("control", self.control),
            ("capture", self.capture),
            ("gate", self.gatekeeper),
            ("readonly_bus", self.readonly_bus),
            ("outbox", self.outbox),
            ("telemetry", self.observability),  # last: it exports what the others reported while stopping
        )
        for name, component in components:
            if component is not None:
                started = time.monotonic()
                component.stop()
                took[name] = round(time.monotonic() - started, 3)
        return took

    def _reconcile(self) -> None:
        """Periodic work between signals; a failure is logged and never stops the loop or its watchdog."""
        if self.gatekeeper is not None:
            try:
                self.gatekeeper.tick()
            except Exception:
                log.exception("gate housekeeping failed")
        if self.capture is not None:
            try:
                self.capture.tick()
            except Exception:
                log.exception("TLS capture housekeeping failed")
        if self.runs is None:
            return
        try:
            self.runs.reconcile()
        except Exception:
            log.exception("reconciling runs failed")
        if self.observability is not None:
            try:
                self.observability.report_finished_runs(self.runs.root)
            except Exception:
                log.exception("reporting finished runs failed")

    def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """The control operations; read-only queries need no daemon and are answered from files by the CLI."""
        operation = request.get("op")
        if operation == "run":
            run = self.runs.start(
                prompt=str(request.get("prompt", "")),
                agent=request.get("agent"),
                agent_cmd=request.get("agent_cmd"),
                no_bedrock=request.get("no_bedrock"),
            )
            return {"ok": True, "run_id": run.run_id, "run_dir": str(run.path), "session": f"km-agent-{run.run_id}"}
        if operation == "cancel":
            run = self.runs.cancel(request.get("run_id"))
            return {"ok": True, "run_id": run.run_id, "run_dir": str(run.path)}
        if operation == "health":
            return {"ok": True, **self.health()}
        if operation == "flush-telemetry":
            return {"ok": True, **self.flush_telemetry()}
        raise ValueError(f"unknown operation {operation!r}: run, cancel, health or flush-telemetry")

    def flush_telemetry(self) -> dict[str, Any]:
        """Export and ship everything recorded so far, finished runs included (what `km otel` asks first)."""
        if self._observability_thread is not None:
            self._observability_thread.join(timeout=10)
        if self.observability is None:
            raise RuntimeError(f"telemetry is not running: {self.observability_error or 'still starting'}")
        if self.runs is not None:
            self.observability.report_finished_runs(self.runs.root)
        return self.observability.flush()

    def health(self) -> dict[str, Any]:
        assert self.config is not None
        active = [run.run_id for run in all_runs(self.runs.root) if run.status() not in TERMINAL] if self.runs else []
        return {
            "version": __version__,
            "profile": self.config.profile,
            "active_runs": active,
            "outbox": self.outbox.stats() if self.outbox is not None else {"error": self.outbox_error},
            "gate": self.gatekeeper.status() if self.gatekeeper is not None else None,
            "readonly_bus": self.readonly_bus.status() if self.readonly_bus is not None else None,
            "capture": self._capture_status(),
            "telemetry": (
                self.observability.status()
                if self.observability is not None
                else {"error": self.observability_error or "starting", "buffered_dropped": self.events.dropped}
            ),
        }

    def _capture_status(self) -> dict[str, Any]:
        if self.capture is not None:
            return self.capture.status()
        if self.capture_error is not None:
            return {"enabled": True, "error": self.capture_error}
        return {"enabled": False}

    def _reload(self) -> None:
        notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        previous = self.config
        try:
            self.config = load_config(self.paths.config)
        except (OSError, ValueError) as error:  # ValueError: ValidationError, undecodable bytes
            # Keep enforcing the policy we have: a bad file must never loosen anything.
            log.error("reload refused; keeping the current policy", extra={"fields": {"error": str(error)}})
        else:
            if self.runs is not None:
                self.runs.config = self.config
            if self.gatekeeper is not None:
                self.gatekeeper.reload(self.config)
            if previous is None or previous.observability.tls_capture != self.config.observability.tls_capture:
                if self.capture is not None:  # probes and payload size are fixed at load: start again
                    self.capture.stop()
                self.capture = self.capture_error = None
                self._start_capture(self.config)
            log.info("reloaded", extra={"fields": {"profile": self.config.profile}})
        notify("READY=1")


def run_daemon(paths: DaemonPaths) -> int:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_JournalFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    return Daemon(paths).run()
