"""The demo's embedded broker (amqtt in a child process) with paho-mqtt 2.x clients."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("amqtt", reason="the demo extra is not installed: pip install -e '.[demo]'")
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from demo.broker import EmbeddedBroker

pytestmark = pytest.mark.integration


class Recorder:
    """A paho client that records (topic, payload, retain) and knows when its subscription is granted."""

    def __init__(self, port: int, client_id: str, topic_filter: str | None) -> None:
        self.messages: list[tuple[str, str, bool]] = []
        self.subscribed = threading.Event()
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        if topic_filter:
            self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic_filter, qos=1)
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload.decode(), bool(msg.retain)))

    def wait_for(self, count: int, timeout: float = 10.0) -> list[tuple[str, str, bool]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.05)
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture()
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


def test_qos1_in_order_and_retained_only_to_matching_subscribers(broker: EmbeddedBroker) -> None:
    pub = Recorder(broker.port, "pub", None)
    pub.client.publish("demo/a", "A", qos=1, retain=True).wait_for_publish(5)
    pub.client.publish("other/b", "B", qos=1, retain=True).wait_for_publish(5)
    # A subscriber on another filter must not be sent demo/a when a later client connects (amqtt 0.12.1
    # replays every client's filters at CONNECT; demo.broker corrects that).
    other = Recorder(broker.port, "other", "other/#")
    assert other.subscribed.wait(5)
    sub = Recorder(broker.port, "sub", "demo/#")
    assert sub.subscribed.wait(5)
    for i in range(30):
        pub.client.publish("demo/q1", str(i), qos=1).wait_for_publish(5)
    got = sub.wait_for(31)
    assert got[0] == ("demo/a", "A", True)
    assert [p for t, p, _ in got if t == "demo/q1"] == [str(i) for i in range(30)]
    assert [m for m in got if m[0] == "demo/a"] == [("demo/a", "A", True)]  # once, not replayed
    assert all(t.startswith("demo/") for t, _, _ in got)
    assert other.wait_for(1) == [("other/b", "B", True)]
    for c in (pub, sub, other):
        c.close()


def test_last_will_is_published_and_retained(broker: EmbeddedBroker) -> None:
    watcher = Recorder(broker.port, "watcher", "dev/available")
    assert watcher.subscribed.wait(5)
    dying = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dying")
    dying.will_set("dev/available", "offline", qos=1, retain=True)
    dying.connect("127.0.0.1", broker.port, keepalive=5)
    dying.loop_start()
    dying.publish("dev/available", "online", qos=1, retain=True).wait_for_publish(5)
    dying.loop_stop()
    dying.socket().close()  # gone without DISCONNECT, as a killed agent is
    got = watcher.wait_for(2)
    assert [p for _, p, _ in got] == ["online", "offline"]
    late = Recorder(broker.port, "late", "dev/available")
    assert late.wait_for(1) == [("dev/available", "offline", True)]
    watcher.close()
    late.close()


def test_stops_cleanly_with_clients_connected() -> None:
    b = EmbeddedBroker().start()
    client = Recorder(b.port, "stay", "x/#")
    assert client.subscribed.wait(5)
    t0 = time.monotonic()
    assert b.stop(timeout=10) == 0  # SIGTERM handled: exit status 0, not killed
    assert time.monotonic() - t0 < 10
    client.close()
