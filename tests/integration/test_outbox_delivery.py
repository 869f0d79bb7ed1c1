"""The outbox's delivery path on its own (outbox + deliverer + MqttLink, in process) against a real broker
stopped while many verdicts are in flight: the case where paho's resend and new rows could overtake each other."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.mqtt import LinkCallbacks, Message, MqttLink, Topics
from agent.outbox import Deliverer, Outbox
from tests.integration.conftest import Recorder, wait_until

pytestmark = pytest.mark.integration

ROWS = 3000


def test_broker_stopped_with_messages_in_flight_keeps_order(tmp_path: Path, mosquitto) -> None:
    cfg = parse_config(
        {"device_id": "cam1", "bundle": str(tmp_path), "capture": {"source": str(tmp_path)},
         "mqtt": {"host": "127.0.0.1", "port": mosquitto.port, "reconnect_min_s": 1, "reconnect_max_s": 1,
                  "max_inflight": 50, "homeassistant": {"enabled": False}}},
        check_files=False,
    )
    topics = Topics.from_config(cfg)
    rec = Recorder(mosquitto.port, [topics.verdict], persistent=True, name="delivery-recorder")
    outbox = Outbox(tmp_path / "outbox.sqlite3", max_messages=ROWS * 2)
    for i in range(ROWS):
        outbox.put(topics.verdict, json.dumps({"id": i}).encode(), qos=1)
    deliverer: Deliverer
    link = MqttLink(cfg, topics, LinkCallbacks(
        on_command=lambda c: None,
        on_published=lambda mid: deliverer.acked(mid),
        on_ready=lambda: deliverer.set_online(True),
        on_down=lambda: deliverer.set_online(False),
    ))
    deliverer = Deliverer(outbox, lambda row: link.hand_over(Message(row.topic, row.payload, row.qos)),
                          window=50)
    deliverer.start()
    link.start()
    try:
        wait_until(lambda: deliverer.delivered >= 300, 60, "the first 300 acknowledgements")
        mosquitto.stop()  # mid-stream: up to 50 messages are in flight now
        stopped_at = deliverer.delivered
        time.sleep(1.0)  # let the client notice; the broker must be away across a reconnect attempt
        mosquitto.start()
        wait_until(lambda: outbox.depth() == 0, 120, "the outbox to drain")
        wait_until(lambda: len({json.loads(p)["id"] for p in rec.on(topics.verdict)}) >= ROWS, 60,
                   "every row at the subscriber")
    finally:
        deliverer.stop()
        link.stop()
        outbox.close()
        rec.close()
    ids = [json.loads(p)["id"] for p in rec.on(topics.verdict)]
    first_seen = list(dict.fromkeys(ids))
    assert first_seen == list(range(ROWS))
    assert stopped_at < ROWS, "the broker should have gone away before everything was delivered"
    print(f"in-flight outage: {len(ids)} messages for {ROWS} rows, {len(ids) - ROWS} redelivered")
