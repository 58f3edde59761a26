"""Who is creating a sandbox, and whether it may still be at it: convergence waits for a live creator and
finishes or replaces a dead one's sandbox. ec2 records are shared by operators on other hosts."""

from __future__ import annotations

import socket
import subprocess
import sys
from datetime import timedelta

from controller.substrates.records import CREATE_GIVES_UP, creator, creator_alive
from tests.unit.controller.state.conftest import CREATED, new_record


def test_this_process_is_alive_until_the_create_would_have_given_up() -> None:
    record = new_record(status="starting", resources=creator())
    assert creator_alive(record, now=CREATED + timedelta(minutes=5))
    assert not creator_alive(record, now=CREATED + CREATE_GIVES_UP + timedelta(seconds=1))  # its pid is someone else's by then


def test_a_dead_creator_on_this_host_is_not() -> None:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    record = new_record(status="starting", resources={"creator_host": socket.gethostname(), "creator_pid": ended.stdout.strip()})
    assert not creator_alive(record, now=CREATED)


def test_a_creator_on_another_host_is_judged_by_age_alone() -> None:
    record = new_record(status="starting", resources={"creator_host": "another-operators-laptop", "creator_pid": "1"})
    assert creator_alive(record, now=CREATED + timedelta(minutes=59))
    assert not creator_alive(record, now=CREATED + timedelta(hours=2))


def test_a_record_without_a_creator_is_not_being_created() -> None:
    assert not creator_alive(new_record(status="starting"), now=CREATED)
