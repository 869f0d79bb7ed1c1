"""systemd's notify protocol in a few lines of our own (no python-systemd on the box).

A datagram to the unix socket named in $NOTIFY_SOCKET; a leading '@' means an abstract socket
name. Without $NOTIFY_SOCKET (not under systemd) every call is a no-op that returns False.
"""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)


def socket_address(name: str) -> str:
    # '@name' is Linux's abstract namespace, spelled with a leading NUL byte on the wire.
    return "\0" + name[1:] if name.startswith("@") else name


class Notifier:
    """Sends READY=1, WATCHDOG=1, STOPPING=1, RELOADING=1 and STATUS= lines to systemd."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.watchdog_s = watchdog_interval()

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> bool:
        if not self.address:
            return False
        message = "\n".join(lines).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(socket_address(self.address))
                sock.sendall(message)
        except OSError as exc:
            # systemd gone or the socket misnamed: the service itself must go on.
            logger.warning("sd_notify to %s failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        return self.send("RELOADING=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1") if self.watchdog_s else False

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when no watchdog is asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None  # the watchdog is meant for another process (e.g. our parent)
    try:
        value = int(usec)
    except ValueError:
        logger.warning("ignoring WATCHDOG_USEC=%r: not a number", usec)
        return None
    return value / 2e6 if value > 0 else None
