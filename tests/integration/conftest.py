"""Real services for integration tests: a mosquitto broker, the agent as a subprocess, an MQTT recorder.

Everything waits on conditions with generous timeouts; nothing relies on a fixed sleep being long enough.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Mosquitto:
    """A mosquitto on a free 127.0.0.1 port with on-disk persistence, so it can be stopped and started
    again without losing queued messages of persistent sessions."""

    def __init__(self, workdir: Path, listener_lines: list[str] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        lines = [
            f"listener {self.port} 127.0.0.1",
            *(listener_lines or ["allow_anonymous true"]),
            "persistence true",
            f"persistence_location {workdir}/",
            "max_queued_messages 10000",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to 'mosquitto', who cannot write the test's folder
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def accepts(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
            return True
        return False

    def start(self) -> None:
        assert self.proc is None, "already running"
        log = open(self.log, "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log)
        log.close()
        wait_until(lambda: self.accepts() or self.proc.poll() is not None, 15, "mosquitto to accept connections")
        if self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited at start:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)  # SIGTERM saves the persistence file
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture()
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    workdir = tmp_path / "broker"
    workdir.mkdir()
    broker = Mosquitto(workdir)
    broker.start()
    yield broker
    broker.stop()


class Recorder:
    """A paho subscriber that keeps every message in arrival order.

    ``persistent=True`` uses a fixed client id and a persistent session, so the broker queues QoS 1
    messages for it while it is away (including across a broker restart)."""

    def __init__(self, port: int, topics: list[str], persistent: bool = False, name: str = "recorder",
                 ca_file: Path | None = None, auth: tuple[str, str] | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.commands_sent = 0  # numbers the request ids of command()
        self.subscribed = threading.Event()
        self.topics = topics
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}", clean_session=not persistent
        )
        self.client.reconnect_delay_set(1, 1)
        if ca_file is not None:
            self.client.tls_set(ca_certs=str(ca_file))
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        wait_until(self.subscribed.is_set, 15, "the recorder's subscription")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def on(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic]

    def json_on(self, topic: str) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self.on(topic)]

    def wait_json(self, topic: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0,
                  what: str = "") -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            return next((m for m in self.json_on(topic) if predicate(m)), None)

        return wait_until(find, timeout, what or f"a matching message on {topic}")

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos).wait_for_publish(10)

    def command(self, base: str, name: str, body: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Send ``<base>/cmd/<name>`` with a fresh request id and wait for the agent's answer to it."""
        self.commands_sent += 1
        rid = f"{name}-{self.commands_sent}"
        self.publish(f"{base}/cmd/{name}", json.dumps({"id": rid, **body}))
        return self.wait_json(f"{base}/cmd/{name}/result", lambda r: r.get("request_id") == rid, timeout,
                              f"the answer to cmd/{name} {body}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture()
def recorders() -> Iterator[Callable[..., Recorder]]:
    """Start Recorders (same arguments); every one is closed at the end of the test. A Recorder left open
    keeps reconnecting under the same client id, and would take over the session of a later test's Recorder
    whose broker got the same port."""
    made: list[Recorder] = []

    def start(*args: Any, **kwargs: Any) -> Recorder:
        made.append(Recorder(*args, **kwargs))
        return made[-1]

    yield start
    for rec in made:
        rec.close()


class AgentProcess:
    """``python -m agent.service --config FILE`` as a child process, its log in a file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **(env or {})}
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            if env is None or key not in env:
                full_env.pop(key, None)
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.service", "--config", str(config)],
                cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT,
            )

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop_quietly(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)


def write_config(path: Path, **sections: Any) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def base_config(tmp_path: Path, bundle: Path, port: int, source: str, device: str = "cam1",
                **overrides: Any) -> dict[str, Any]:
    """A config for tests: quick stats and reconnects, state under tmp_path."""
    cfg: dict[str, Any] = {
        "device_id": device,
        "bundle": str(bundle),
        "capture": {"source": source, "settle_s": 0, "poll_interval_s": 0.1, "reopen_backoff_s": 0.2,
                    "reopen_backoff_max_s": 1.0},
        "mqtt": {"host": "127.0.0.1", "port": port, "stats_interval_s": 1, "reconnect_min_s": 1,
                 "reconnect_max_s": 2, "keepalive_s": 10},
        "storage": {"dir": str(tmp_path / "state")},
        "service": {"ready_timeout_s": 30, "log_level": "info"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


@pytest.fixture()
def agents(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start agents from config dicts; every one still running at the end is killed."""
    started: list[AgentProcess] = []

    def start(cfg: dict[str, Any], env: dict[str, str] | None = None, name: str = "agent") -> AgentProcess:
        n = len(started)
        config = write_config(tmp_path / f"{name}{n}.yaml", **cfg)
        agent = AgentProcess(config, tmp_path / f"{name}{n}.log", env)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop_quietly()


def write_images(folder: Path, images: list[Any], prefix: str = "img", start: int = 0) -> list[str]:
    """PNG files written whole under a hidden name, then renamed (as a camera writer should)."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(images, start):
        name = f"{prefix}_{i:04d}.png"
        ok, data = cv2.imencode(".png", img)
        assert ok
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data.tobytes())
        os.replace(tmp, folder / name)
        names.append(name)
    return names
