"""sd_notify in our own few lines: real datagram sockets, path and abstract names."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from agent.notify import Notifier, watchdog_interval


def receive(sock: socket.socket) -> list[str]:
    sock.settimeout(5)
    return sock.recv(4096).decode().split("\n")


def test_ready_status_and_stopping_reach_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        n = Notifier(str(path))
        assert n.ready(status="3 frames")
        assert receive(sock) == ["READY=1", "STATUS=3 frames"]
        assert n.reloading() and receive(sock) == ["RELOADING=1"]
        assert n.stopping() and receive(sock) == ["STOPPING=1"]


def test_abstract_socket_name_with_at_sign() -> None:
    name = f"yugami-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert Notifier("@" + name).status("hello")
        assert receive(sock) == ["STATUS=hello"]


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled and n.ready() is False


def test_a_vanished_socket_is_not_fatal(tmp_path: Path) -> None:
    assert Notifier(str(tmp_path / "gone")).ready() is False


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    assert watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None  # meant for another process
    monkeypatch.delenv("WATCHDOG_PID")
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        assert Notifier(str(path)).watchdog()
        assert receive(sock) == ["WATCHDOG=1"]
