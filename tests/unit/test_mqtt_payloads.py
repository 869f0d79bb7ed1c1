"""Topics and payloads are pure functions: tested without a broker."""

from __future__ import annotations

import json
import re

import pytest

from agent.metrics import render
from agent.mqtt import (
    Command,
    CommandError,
    Topics,
    availability_message,
    command_result_message,
    discovery_message,
    event_message,
    gradcam_message,
    parse_command,
    state_message,
    stats_message,
    utc_iso,
    verdict_message,
    verdict_payload,
)

T = Topics("yugami", "line1-cam1")


def sample_verdict() -> dict:
    return verdict_payload(
        frame_id="20250101T000000ab12-000001", ts=utc_iso(0), device="line1-cam1", source="/dev/video0",
        score=0.1234567891, threshold=0.1, verdict="anomaly", confidence=0.73456, model_name="m",
        model_sha256="ab" * 32, latency_ms=12.34567,
    )


def test_topics() -> None:
    assert T.available == "yugami/line1-cam1/available"
    assert T.verdict == "yugami/line1-cam1/verdict" and T.state == "yugami/line1-cam1/state"
    assert T.cmd("trigger") == "yugami/line1-cam1/cmd/trigger"
    assert T.cmd_result("trigger") == "yugami/line1-cam1/cmd/trigger/result"
    assert T.cmd_filter == "yugami/line1-cam1/cmd/+" and T.ha_status == "homeassistant/status"
    assert Topics("p", "a.b").node_id == "yugami_a_b"
    assert T.ha_config == "homeassistant/device/yugami_line1-cam1/config"


def test_verdict_payload_has_exactly_the_documented_fields() -> None:
    p = sample_verdict()
    assert list(p) == ["v", "id", "ts", "device", "source", "score", "threshold", "verdict", "confidence", "model",
                       "latency_ms", "evidence"]
    assert p["evidence"] is False
    assert p["v"] == 1 and p["ts"] == "1970-01-01T00:00:00.000Z"
    assert p["model"] == {"name": "m", "sha256": "ab" * 32}
    assert p["score"] == 0.123457 and p["confidence"] == 0.7346 and p["latency_ms"] == 12.346
    msg = verdict_message(T, p)
    assert msg.topic == T.verdict and msg.qos == 1 and not msg.retain and json.loads(msg.payload) == p
    state = state_message(T, p)
    assert state.retain and state.topic == T.state


def test_verdict_says_whether_evidence_was_saved() -> None:
    p = verdict_payload(frame_id="f", ts=utc_iso(0), device="d", source="s", score=0.5, threshold=0.1,
                        verdict="anomaly", confidence=0.9, model_name="m", model_sha256="ab" * 32, latency_ms=1.0,
                        evidence=True)
    assert p["evidence"] is True and list(p)[-1] == "evidence"


def test_heat_maps_go_to_the_plain_topic_and_the_frame_s_own() -> None:
    assert T.gradcam == "yugami/line1-cam1/gradcam"
    assert T.gradcam_for("img_0042-3f9c2a1b7e") == "yugami/line1-cam1/gradcam/img_0042-3f9c2a1b7e"
    assert T.gradcam_for("a+b#c/d") == "yugami/line1-cam1/gradcam/a_b_c_d"  # no wildcard in a topic level
    assert gradcam_message(T, b"jpg").topic == T.gradcam
    msg = gradcam_message(T, b"jpg", "f1")
    assert msg.topic == T.gradcam_for("f1") and msg.payload == b"jpg" and msg.qos == 0 and not msg.retain


def test_utc_iso_format() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", utc_iso())
    assert utc_iso(1.5) == "1970-01-01T00:00:01.500Z"


def test_availability_is_retained() -> None:
    on, off = availability_message(T, True), availability_message(T, False)
    assert (on.payload, off.payload) == (b"online", b"offline") and on.retain and off.retain and on.qos == 1


def test_commands_parse_or_fail_with_a_reason() -> None:
    assert parse_command(T, T.cmd("trigger"), b"", 100) == Command("trigger", {})
    cmd = parse_command(T, T.cmd("gradcam"), b'{"id": "r1", "frame_id": "x"}', 100)
    assert cmd.body["frame_id"] == "x" and cmd.request_id == "r1"
    cases = [
        (T.cmd("trigger"), b"{nope", "not valid JSON"),
        (T.cmd("trigger"), b"\xff\xfe", "not valid JSON"),
        (T.cmd("trigger"), b"[1]", "JSON object"),
        (T.cmd("trigger"), b'{"id": [1]}', "'id' must be"),
        (T.cmd("gradcam"), b'{"frame_id": 5}', "'frame_id' must be a string"),
        (T.cmd("format-disk"), b"{}", "unknown command 'format-disk'"),
        (T.cmd("trigger"), b"{" + b" " * 200 + b"}", "over the limit of 100"),
    ]
    for topic, payload, message in cases:
        with pytest.raises(CommandError, match=re.escape(message)) as info:
            parse_command(T, topic, payload, 100)
        assert info.value.name == topic.rsplit("/", 1)[1]


def test_command_result_and_event_messages() -> None:
    r = command_result_message(T, "reload", ok=False, request_id=7, error="bad bundle", model={"name": "m"})
    body = json.loads(r.payload)
    assert r.topic == T.cmd_result("reload") and not r.retain
    assert body == {"v": 1, "cmd": "reload", "request_id": 7, "ok": False, "error": "bad bundle",
                    "model": {"name": "m"}}
    e = json.loads(event_message(T, "bad_frame", "ts", id="x", error="e").payload)
    assert e["event"] == "bad_frame" and e["device"] == "line1-cam1" and e["id"] == "x"


def test_home_assistant_discovery() -> None:
    msg = discovery_message(T, "screws-v3")
    body = json.loads(msg.payload)
    assert msg.retain and msg.topic == T.ha_config
    assert body["availability_topic"] == T.available and body["device"]["model"] == "screws-v3"
    comps = body["components"]
    assert comps["anomaly"]["platform"] == "binary_sensor" and comps["anomaly"]["state_topic"] == T.state
    assert comps["trigger"]["command_topic"] == T.cmd("trigger")
    ids = [c["unique_id"] for c in comps.values()]
    assert len(ids) == len(set(ids)) and all(i.startswith("yugami_line1-cam1_") for i in ids)


def test_stats_message_and_metrics_text() -> None:
    stats = {"frames": 10, "fps": 2.5, "anomalies": 1, "errors": 2, "latency_ms": {"p50": 3.0, "p99": 9.5},
             "model": {"name": "m", "sha256": "s"}, "uptime_s": 12.0, "reconnects": 1, "mqtt_connected": True,
             "outbox": {"depth": 4, "dropped": 0}, "source": {"kind": "folder", "state": "up"}}
    msg = stats_message(T, stats)
    assert msg.retain and json.loads(msg.payload)["frames"] == 10
    text = render({**stats, "device": "cam1"})
    assert 'yugami_frames_total{device="cam1"} 10' in text
    assert 'yugami_latency_ms{device="cam1",quantile="0.99"} 9.5' in text
    assert 'yugami_outbox_depth{device="cam1"} 4' in text
    assert 'yugami_model_info{device="cam1",name="m",sha256="s"} 1' in text
    assert "# TYPE yugami_frames_total counter" in text and text.endswith("\n")
