"""The daemon's lifecycle, run for real: `km-host-agent daemon` under a fake systemd notify socket.

The test binds the datagram socket systemd would, starts the daemon with NOTIFY_SOCKET and a 0.2 s
watchdog, and checks what it says (READY, WATCHDOG, RELOADING, STOPPING) and what it logs as it is
signalled. Every receive has a timeout and the process is always killed, so a hang fails, never blocks.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.compiler import compile_profile
from controller.profile import BUILTIN_PROFILES_DIR, ProfileResolver, load_profile
from host_agent.sdnotify import notify, watchdog_interval_seconds
from tests.conftest import REPO_ROOT

START_TIMEOUT = 20.0  # a cold interpreter importing pydantic on a busy machine
TIMEOUT = 10.0


def compiled_config(profile: str) -> str:
    loaded, _ = load_profile(BUILTIN_PROFILES_DIR / f"{profile}.yaml", ProfileResolver())
    return compile_profile(loaded).host_agent.to_json()


class NotifySocket:
    """What systemd listens on: one datagram per sd_notify call, each a set of KEY=value lines."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(address)
        self.received: list[list[str]] = []

    def receive(self, timeout: float) -> list[str] | None:
        self.socket.settimeout(max(timeout, 0.001))
        try:
            datagram = self.socket.recv(4096)
        except TimeoutError:
            return None
        message = datagram.decode().split("\n")
        self.received.append(message)
        return message

    def wait_for(self, state: str, timeout: float = TIMEOUT) -> list[list[str]]:
        """Messages up to and including the first that holds `state` (e.g. READY=1); fails on timeout."""
        seen: list[list[str]] = []
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.receive(remaining)
            if message is None:
                break
            seen.append(message)
            if state in message:
                return seen
        raise AssertionError(f"no {state} within {timeout} s; received {seen}")

    def drain(self, seconds: float) -> list[list[str]]:
        """Everything that arrives in the next `seconds`."""
        seen = []
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.receive(remaining)
            if message is not None:
                seen.append(message)
        return seen

    def close(self) -> None:
        self.socket.close()


def _sandbox_paths(directory: Path) -> list[str]:
    """The identity file and runtime paths the daemon would find in a sandbox, made for this test."""
    identity = directory / "sandbox.env"
    identity.write_text("KM_SANDBOX_ID=sb-0000test\n")
    runtime = Path(tempfile.mkdtemp(prefix="km-daemon-"))  # socket paths must stay under 108 bytes
    return [
        "--identity", str(identity), "--control-socket", str(runtime / "control.sock"),
        "--tmux-socket", str(runtime / "tmux.sock"), "--state-dir", str(directory / "state"),
        "--otlp-port", "0", "--telemetry-env", str(directory / "telemetry.env"),
    ]  # fmt: skip


class Agent:
    """`python -m host_agent.cli daemon --config FILE`, its stdout read line by line on a thread."""

    def __init__(self, config: Path, notify_address: str, watchdog_usec: str | None = "200000") -> None:
        env = {key: value for key, value in os.environ.items() if key not in ("WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_PID")}
        env["NOTIFY_SOCKET"] = notify_address
        env["PYTHONPATH"] = str(REPO_ROOT)
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = watchdog_usec
        self.process = subprocess.Popen(
            [sys.executable, "-m", "host_agent.cli", "daemon", "--config", str(config), *_sandbox_paths(config.parent)],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()  # None: stdout closed
        self.logged: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def wait_for_log(self, message: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The first JSON log line with this message; every line must be JSON. Fails at once if stdout closed."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                self.lines.put(None)
                raise AssertionError(f"stdout closed without a {message!r} log line; logged {self.logged}")
            entry = json.loads(line)
            self.logged.append(entry)
            if entry["message"] == message:
                return entry
        raise AssertionError(f"no {message!r} log line within {timeout} s; logged {self.logged}")

    def exit_code(self, timeout: float = TIMEOUT) -> int:
        return self.process.wait(timeout=timeout)

    def stderr(self) -> str:
        assert self.process.stderr is not None
        return self.process.stderr.read() if self.process.poll() is not None else ""

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=TIMEOUT)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    address = tmp_path / "notify"
    if len(str(address)) >= 100:  # sun_path holds 108 bytes; a deep basetemp would not fit
        address = Path(tempfile.mkdtemp(prefix="km-notify-")) / "notify"
    bound = NotifySocket(str(address))
    yield bound
    bound.close()


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    file = tmp_path / "host-agent.json"
    file.write_text(compiled_config("goose"), encoding="utf-8")
    return file


@pytest.fixture
def start_agent(notify_socket: NotifySocket) -> Iterator[Callable[..., Agent]]:
    started: list[Agent] = []

    def start(config: Path, **options: Any) -> Agent:
        agent = Agent(config, notify_socket.address, **options)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.kill()


def states(messages: list[list[str]]) -> list[str]:
    return [line for message in messages for line in message]


# ---- start -------------------------------------------------------------------------------------


def test_ready_once_the_policy_is_loaded(
    config_file: Path, notify_socket: NotifySocket, start_agent: Callable[..., Agent]
) -> None:
    agent = start_agent(config_file)
    [*before, ready] = notify_socket.wait_for("READY=1", START_TIMEOUT)
    assert before == []  # READY is the first thing systemd hears
    assert ready == ["READY=1", "STATUS=enforcing profile goose"]
    logged = agent.wait_for_log("ready")
    assert logged["level"] == "info" and logged["profile"] == "goose" and logged["version"]


def test_the_watchdog_is_petted_at_half_its_interval(
    config_file: Path, notify_socket: NotifySocket, start_agent: Callable[..., Agent]
) -> None:
    start_agent(config_file)
    notify_socket.wait_for("READY=1", START_TIMEOUT)
    arrived = notify_socket.drain(2.0)
    watchdogs = [message for message in arrived if message == ["WATCHDOG=1"]]
    # Every 0.1 s would be ~20; a loaded machine may manage far fewer, but 3 shows it repeats.
    assert len(watchdogs) >= 3, arrived
    assert len(watchdogs) <= 40, "petting far more often than half of WATCHDOG_USEC"
    assert watchdogs == arrived  # nothing else is said while idle


def test_without_a_watchdog_it_is_not_petted_often(
    config_file: Path, notify_socket: NotifySocket, start_agent: Callable[..., Agent]
) -> None:
    """No WATCHDOG_USEC: the loop wakes every 5 s, so within 1 s at most the first WATCHDOG=1 arrives."""
    start_agent(config_file, watchdog_usec=None)
    notify_socket.wait_for("READY=1", START_TIMEOUT)
    assert len(notify_socket.drain(1.0)) <= 1


@pytest.mark.parametrize(
    "content",
    [None, "", "{not json", '{"profile": "goose"}', "[]"],
    ids=["missing", "empty", "not json", "incomplete", "not an object"],
)
def test_a_config_it_cannot_load_at_start_is_exit_1_and_never_ready(
    tmp_path: Path, notify_socket: NotifySocket, start_agent: Callable[..., Agent], content: str | None
) -> None:
    config = tmp_path / "host-agent.json"
    if content is not None:
        config.write_text(content, encoding="utf-8")
    agent = start_agent(config)
    assert agent.exit_code(START_TIMEOUT) == 1
    error = agent.wait_for_log("cannot load config")
    assert error["level"] == "error"
    assert error["config"] == str(config)
    assert error["error"]
    assert agent.stderr() == ""  # an operator error, not a traceback
    assert notify_socket.drain(0.2) == []


def test_a_config_that_is_not_utf8_at_start_is_a_logged_error(
    tmp_path: Path, notify_socket: NotifySocket, start_agent: Callable[..., Agent]
) -> None:
    config = tmp_path / "host-agent.json"
    config.write_bytes(b'{"profile": "\xff"}')
    agent = start_agent(config)
    assert agent.exit_code(START_TIMEOUT) == 1
    assert agent.wait_for_log("cannot load config")["level"] == "error"
    assert "Traceback" not in agent.stderr()


# ---- reload ------------------------------------------------------------------------------------


def test_sighup_with_a_changed_config_reloads_it(
    config_file: Path, notify_socket: NotifySocket, start_agent: Callable[..., Agent]
) -> None:
    agent = start_agent(config_file)
    notify_socket.wait_for("READY=1", START_TIMEOUT)
    agent.wait_for_log("ready")
    config_file.write_text(compiled_config("claude"), encoding="utf-8")
    agent.signal(signal.SIGHUP)

    reloading = notify_socket.wait_for("RELOADING=1")[-1]
    assert reloading[0] == "RELOADING=1"
    [monotonic] = [line for line in reloading if line.startswith("MONOTONIC_USEC=")]
    assert 0 < int(monotonic.removeprefix("MONOTONIC_USEC=")) <= time.monotonic_ns() // 1000
    assert notify_socket.wait_for("READY=1")[-1] == ["READY=1"]
    assert agent.wait_for_log("reloaded") == {
        "level": "info",
        "message": "reloaded",
        "profile": "claude",
        "logger": "km-host-agent",
    }

    # Still running and still petting the watchdog; it stops with the new policy's name.
    assert states(notify_socket.drain(0.5)).count("WATCHDOG=1") >= 1
    agent.signal(signal.SIGTERM)
    assert agent.exit_code() == 0
    assert agent.wait_for_log("stopped")["profile"] == "claude"


def test_sighup_can_reload_again_and_again(
    config_file: Path, notify_socket: NotifySocket, start_agent: Callable[..., Agent]
) -> None:
    agent = start_agent(config_file)
    notify_socket.wait_for("READY=1", START_TIMEOUT)
    for profile in ("claude", "goose", "codex"):
        config_file.write_text(compiled_config(profile), encoding="utf-8")
        agent.signal(signal.SIGHUP)
        notify_socket.wait_for("RELOADING=1")
        notify_socket.wait_for("READY=1")
        assert agent.wait_for_log("reloaded")["profile"] == profile
    assert agent.process.poll() is None


@pytest.mark.parametrize(
    "break_config",
    [
        lambda file: file.write_text("{not json", encoding="utf-8"),
        lambda file: file.write_text(json.dumps({**json.loads(file.read_text()), "egress": {}}), encoding="utf-8"),
        lambda file: file.unlink(),
    ],
    ids=["not json", "invalid policy", "deleted"],
)
def test_sighup_with_an_invalid_config_keeps_the_current_policy(
    config_file: Path,
    notify_socket: NotifySocket,
    start_agent: Callable[..., Agent],
    break_config: Callable[[Path], None],
) -> None:
    agent = start_agent(config_file)
    notify_socket.wait_for("READY=1", START_TIMEOUT)
    agent.wait_for_log("ready")
    break_config(config_file)
    agent.signal(signal.SIGHUP)

    notify_socket.wait_for("RELOADING=1")
    assert notify_socket.wait_for("READY=1")[-1] == ["READY=1"]
    refused = agent.wait_for_log("reload refused; keeping the current policy")
    assert refused["level"] == "error" and refused["error"]
    assert states(notify_socket.drain(1.0)).count("WATCHDOG=1") >= 3
    assert agent.process.poll() is None
    assert "reloaded" not in [entry["message"] for entry in agent.logged]

    agent.signal(signal.SIGTERM)
    assert agent.exit_code() == 0
    assert agent.wait_for_log("stopped")["profile"] == "goose"  # the policy it kept


def test_sighup_with_a_config_that_is_not_utf8_keeps_the_current_policy(
    config_file: Path, notify_socket: NotifySocket, start_agent: Callable[..., Agent]
) -> None:
    agent = start_agent(config_file)
    notify_socket.wait_for("READY=1", START_TIMEOUT)
    config_file.write_bytes(b"\xff\xfe not text")
    agent.signal(signal.SIGHUP)
    agent.wait_for_log("reload refused; keeping the current policy")
    notify_socket.wait_for("READY=1")
    assert agent.process.poll() is None


# ---- stop --------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_it_cleanly(
    config_file: Path, notify_socket: NotifySocket, start_agent: Callable[..., Agent], signum: signal.Signals
) -> None:
    agent = start_agent(config_file)
    notify_socket.wait_for("READY=1", START_TIMEOUT)
    agent.signal(signum)
    assert notify_socket.wait_for("STOPPING=1")[-1] == ["STOPPING=1"]
    assert agent.exit_code() == 0
    stopped = agent.wait_for_log("stopped")
    took = stopped.pop("stop_seconds")
    assert stopped == {"level": "info", "message": "stopped", "profile": "goose", "logger": "km-host-agent"}
    assert set(took) <= {"control", "capture", "gate", "outbox", "telemetry"} and all(seconds >= 0 for seconds in took.values())
    assert agent.stderr() == ""


def test_a_signal_sent_right_after_ready_is_not_lost(
    config_file: Path, notify_socket: NotifySocket, start_agent: Callable[..., Agent]
) -> None:
    """Signals are blocked before READY=1 is sent, so one arriving before the loop waits stays pending."""
    agent = start_agent(config_file, watchdog_usec="60000000")  # the loop would otherwise sleep 30 s
    notify_socket.wait_for("READY=1", START_TIMEOUT)
    agent.signal(signal.SIGTERM)
    notify_socket.wait_for("STOPPING=1")
    assert agent.exit_code() == 0


# ---- sdnotify ----------------------------------------------------------------------------------


def test_notify_without_a_socket_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify("READY=1") is False


def test_notify_sends_one_datagram_of_lines(monkeypatch: pytest.MonkeyPatch, notify_socket: NotifySocket) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    assert notify("READY=1", "STATUS=enforcing profile goose") is True
    assert notify_socket.receive(TIMEOUT) == ["READY=1", "STATUS=enforcing profile goose"]
    assert notify("WATCHDOG=1") is True
    assert notify_socket.receive(TIMEOUT) == ["WATCHDOG=1"]


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"km-test-notify-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(TIMEOUT)
        monkeypatch.setenv("NOTIFY_SOCKET", f"@{name}")
        assert notify("READY=1") is True
        assert listener.recv(4096) == b"READY=1"


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("200000", None, 0.1),
        ("30000000", None, 15.0),
        ("200000", "own", 0.1),
        ("200000", "other", None),
        (None, None, None),
        ("", None, None),
    ],
    ids=["armed", "30 s", "for this pid", "for another pid", "unset", "empty"],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", {"own": str(os.getpid()), "other": "1"}.get(pid or ""))):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    assert watchdog_interval_seconds() == expected
