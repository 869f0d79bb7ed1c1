"""(helper) The real agent as a subprocess against a real mosquitto, for the service benchmarks (flood, soak).

Reuses the integration tests' broker and agent helpers, so a benchmark runs the service exactly as the tests do.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "models" / "demo"


def rss_kb(pid: int, field: str = "VmRSS") -> int | None:
    """Resident set size of a process in kB, from /proc (None once it is gone); ``field="VmHWM"``: its peak."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class RssSampler(threading.Thread):
    """(seconds since start, RSS kB) once per ``period_s``."""

    def __init__(self, pid: int, period_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.period_s = period_s
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.started = time.monotonic()

    def run(self) -> None:
        while not self.stop.is_set():
            kb = rss_kb(self.pid)
            if kb is None:
                return
            self.samples.append((time.monotonic() - self.started, kb))
            self.stop.wait(self.period_s)


class VerdictCounter:
    """Counts messages per topic and keeps the arrival times of verdicts (no payloads kept)."""

    def __init__(self, port: int, topics: list[str]) -> None:
        self.counts: dict[str, int] = {}
        self.verdict_times: list[float] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{time.time_ns()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not self.subscribed.wait(15):
            raise RuntimeError("the benchmark's subscriber could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.counts[msg.topic] = self.counts.get(msg.topic, 0) + 1
            if msg.topic.endswith("/verdict"):
                self.verdict_times.append(time.monotonic())

    def count(self, suffix: str) -> int:
        with self.lock:
            return sum(n for t, n in self.counts.items() if t.endswith(suffix))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def machine() -> str:
    import os
    import platform

    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
