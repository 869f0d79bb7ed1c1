"""The review page without a broker: fleet.review's store fed message by message, and fleet.serve's JSON
endpoints through Flask's test client."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any

import pytest

from fleet import mqtt as fleet_mqtt
from fleet.review import Ask, ReviewStore, route, subscriptions
from fleet.serve import STATIC, add_arguments, allowed_hosts, create_app, heatmap_url

PREFIX = "yugami"
JPEG = b"\xff\xd8\xff\xe0fake-jpeg"
T0 = 1_800_000_000.0  # a whole hour, so bins start at round numbers


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Sent:
    """The server's commands, kept instead of published."""

    def __init__(self, fail: str | None = None) -> None:
        self.asks: list[tuple[Ask, bool]] = []
        self.fail = fail

    def send(self, ask: Ask, wait: bool) -> None:
        if self.fail:
            raise fleet_mqtt.BrokerError(self.fail)
        self.asks.append((ask, wait))


def verdict(frame_id: str, anomaly: bool = True, ts: str = "2027-01-15T08:00:10.000Z", **extra: Any) -> bytes:
    body = {"v": 1, "id": frame_id, "ts": ts, "device": "cam1", "source": "x.png", "score": 0.02,
            "threshold": 0.01, "verdict": "anomaly" if anomaly else "ok", "confidence": 0.9,
            "model": {"name": "demo", "sha256": "ab" * 32}, "latency_ms": 3.0, **extra}
    return json.dumps(body).encode()


def msg(store: ReviewStore, topic: str, payload: bytes | dict[str, Any]) -> list[Ask]:
    data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    return route(store, PREFIX, f"{PREFIX}/{topic}", data)


@pytest.fixture()
def store() -> ReviewStore:
    return ReviewStore(max_anomalies=3, bin_s=60, bins=5, clock=Clock())


def test_the_page_listens_to_every_box_under_the_prefix() -> None:
    assert subscriptions("site/yugami") == [
        "site/yugami/+/verdict", "site/yugami/+/stats", "site/yugami/+/available", "site/yugami/+/event",
        "site/yugami/+/gradcam/+", "site/yugami/+/cmd/+/result"]


def test_an_anomaly_becomes_a_card_and_asks_the_box_for_its_heat_map_at_once(store: ReviewStore) -> None:
    assert msg(store, "cam1/verdict", verdict("f-ok", anomaly=False)) == []
    asks = msg(store, "cam1/verdict", verdict("f-1"))
    assert len(asks) == 1 and asks[0].device == "cam1" and asks[0].name == "gradcam"
    assert asks[0].body["frame_id"] == "f-1" and asks[0].body["id"].startswith("review-")
    cards = store.state(heatmap_url)["anomalies"]
    assert [c["frame_id"] for c in cards] == ["f-1"]
    assert cards[0]["heatmap"] is None and cards[0]["heatmap_status"] == "requested"
    assert cards[0]["score"] == 0.02 and cards[0]["threshold"] == 0.01

    msg(store, "cam1/gradcam/f-1", JPEG)
    card = store.state(heatmap_url)["anomalies"][0]
    assert card["heatmap"] == "/heatmap/cam1/f-1.jpg" and card["heatmap_status"] == "ready"
    assert store.heatmap("cam1", "f-1") == JPEG


def test_no_request_when_the_box_sends_heat_maps_itself_or_has_them_off(store: ReviewStore) -> None:
    msg(store, "cam1/stats", {"settings": {"gradcam_policy": {"value": "every_anomaly", "source": "set"}}})
    assert msg(store, "cam1/verdict", verdict("f-1")) == []
    msg(store, "cam2/stats", {"settings": {"gradcam_policy": "off"}})
    assert msg(store, "cam2/verdict", verdict("f-2")) == []
    states = {c["device"]: c["heatmap_status"] for c in store.state(heatmap_url)["anomalies"]}
    assert states["cam1"] == "waiting" and "off" in states["cam2"]


def test_a_heat_map_that_overtakes_its_verdict_is_kept_for_it(store: ReviewStore) -> None:
    msg(store, "cam1/gradcam/f-1", JPEG)
    assert msg(store, "cam1/verdict", verdict("f-1")) == []  # already here: nothing to ask
    assert store.state(heatmap_url)["anomalies"][0]["heatmap_status"] == "ready"


def test_a_frame_id_with_topic_wildcards_finds_its_heat_map(store: ReviewStore) -> None:
    msg(store, "cam1/verdict", verdict("a/b+c#d"))
    msg(store, "cam1/gradcam/a_b_c_d", JPEG)  # agent.mqtt.topic_level of the id
    card = store.state(heatmap_url)["anomalies"][0]
    assert card["heatmap"] == "/heatmap/cam1/a%2Fb%2Bc%23d.jpg" and store.heatmap("cam1", "a/b+c#d") == JPEG


def test_heat_maps_that_are_not_jpegs_are_ignored(store: ReviewStore) -> None:
    msg(store, "cam1/verdict", verdict("f-1"))
    msg(store, "cam1/gradcam/f-1", b"<html>")
    assert store.heatmap("cam1", "f-1") is None


def test_a_refused_heat_map_request_says_why_on_the_card(store: ReviewStore) -> None:
    rid = msg(store, "cam1/verdict", verdict("f-1"))[0].body["id"]
    msg(store, "cam1/cmd/gradcam/result", {"cmd": "gradcam", "request_id": rid, "ok": False,
                                           "error": "frame f-1 is no longer kept"})
    assert store.state(heatmap_url)["anomalies"][0]["heatmap_status"] == "unavailable: frame f-1 is no longer kept"


def test_cards_are_newest_first_bounded_and_duplicates_count_once(store: ReviewStore) -> None:
    for i in range(5):
        msg(store, "cam1/verdict", verdict(f"f-{i}"))
    assert msg(store, "cam1/verdict", verdict("f-4")) == []  # a QoS 1 duplicate
    assert [c["frame_id"] for c in store.state(heatmap_url)["anomalies"]] == ["f-4", "f-3", "f-2"]
    box = store.state(heatmap_url)["boxes"][0]
    assert sum(b["frames"] for b in box["rate"]["bins"]) == 5


def test_anomaly_rate_per_box_in_time_bins(store: ReviewStore) -> None:
    clock = store.clock
    assert isinstance(clock, Clock)
    clock.t = T0 + 4 * 60 + 5  # in the fifth bin of five; T0 starts a bin
    iso = [dt.datetime.fromtimestamp(T0 + m * 60 + 10, tz=dt.timezone.utc).isoformat().replace("+00:00", "Z")
           for m in range(5)]
    msg(store, "cam1/verdict", verdict("a", anomaly=True, ts=iso[1]))
    msg(store, "cam1/verdict", verdict("b", anomaly=False, ts=iso[1]))
    msg(store, "cam1/verdict", verdict("c", anomaly=False, ts=iso[3]))
    msg(store, "cam1/verdict", verdict("d", anomaly=True, ts="not a time"))  # counted now
    msg(store, "cam1/verdict", verdict("e", anomaly=True, ts="2001-01-01T00:00:00Z"))  # before the chart
    bins = store.state(heatmap_url)["boxes"][0]["rate"]["bins"]
    assert [(b["frames"], b["anomalies"]) for b in bins] == [(0, 0), (2, 1), (0, 0), (1, 0), (1, 1)]
    assert [b["rate"] for b in bins] == [None, 0.5, None, 0.0, 1.0]
    assert store.state(heatmap_url)["boxes"][0]["rate"]["bin_s"] == 60


def test_boxes_online_state_and_stats(store: ReviewStore) -> None:
    msg(store, "cam2/available", b"offline")
    msg(store, "cam1/available", b"online")
    msg(store, "cam1/stats", {"model": {"name": "demo", "version": "3"}, "threshold": {"value": 0.5,
                                                                                      "source": "set"},
                              "fps": 4.5, "frames": 10, "anomalies": 2})
    boxes = store.state(heatmap_url)["boxes"]
    assert [(b["device"], b["online"]) for b in boxes] == [("cam1", True), ("cam2", False)]
    assert boxes[0]["threshold"] == 0.5 and boxes[0]["model"] == {"name": "demo", "version": "3"}
    assert boxes[0]["fps"] == 4.5 and boxes[0]["anomalies"] == 2


def test_other_prefixes_junk_and_other_peoples_answers_change_nothing(store: ReviewStore) -> None:
    assert route(store, PREFIX, "other/cam1/verdict", verdict("x")) == []
    msg(store, "cam1/verdict", b"not json")
    msg(store, "cam1/verdict", b"[1, 2]")
    msg(store, "cam1/event", b"\xff\xfe")
    assert store.state(heatmap_url)["anomalies"] == []
    msg(store, "cam1/verdict", verdict("f-1"))
    msg(store, "cam1/cmd/feedback/result", {"request_id": "someone-else", "ok": True})
    assert store.state(heatmap_url)["anomalies"][0]["feedback"] == []


# --- the web app ------------------------------------------------------------------------------------


@pytest.fixture()
def client_and_sent(store: ReviewStore) -> tuple[Any, Sent]:
    sent = Sent()
    app = create_app(store, sent)
    app.testing = True
    return app.test_client(), sent


def test_the_page_and_its_files_are_served_with_a_strict_policy(client_and_sent: tuple[Any, Sent]) -> None:
    client, _ = client_and_sent
    page = client.get("/")
    assert page.status_code == 200 and b"/static/review.js" in page.data
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    for name in ("review.js", "review.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert {p.name for p in STATIC.iterdir()} >= {"index.html", "review.js", "review.css"}


def test_state_endpoint_and_heat_maps_from_memory(store: ReviewStore, client_and_sent: tuple[Any, Sent]) -> None:
    client, _ = client_and_sent
    msg(store, "cam1/verdict", verdict("f-1"))
    state = client.get("/api/state").get_json()
    assert state["anomalies"][0]["frame_id"] == "f-1" and state["connected"] is False
    assert client.get("/heatmap/cam1/f-1.jpg").status_code == 404  # not here yet
    msg(store, "cam1/gradcam/f-1", JPEG)
    url = client.get("/api/state").get_json()["anomalies"][0]["heatmap"]
    got = client.get(url)
    assert got.status_code == 200 and got.mimetype == "image/jpeg" and got.data == JPEG
    msg(store, "cam1/verdict", verdict("a/b.jpg+c"))
    msg(store, "cam1/gradcam/a_b.jpg_c", JPEG)
    url = client.get("/api/state").get_json()["anomalies"][0]["heatmap"]
    assert client.get(url).data == JPEG


def test_false_alarm_sends_feedback_good_and_the_answer_and_event_land_on_the_card(
        store: ReviewStore, client_and_sent: tuple[Any, Sent]) -> None:
    client, sent = client_and_sent
    msg(store, "cam1/verdict", verdict("f-1"))
    r = client.post("/api/feedback", json={"device": "cam1", "frame_id": "f-1", "label": "good", "note": "glare"})
    assert r.status_code == 202
    rid = r.get_json()["request_id"]
    ask, wait = sent.asks[-1]
    assert wait and ask == Ask("cam1", "feedback", {"id": rid, "frame_id": "f-1", "label": "good", "note": "glare"})
    card = client.get("/api/state").get_json()["anomalies"][0]
    assert card["feedback"][0]["state"] == "sent" and card["feedback"][0]["label"] == "good"

    msg(store, "cam1/cmd/feedback/result", {"v": 1, "cmd": "feedback", "request_id": rid, "ok": True,
                                            "frame_id": "f-1", "label": "good"})
    msg(store, "cam1/event", {"v": 1, "ts": "t", "device": "cam1", "event": "feedback_added", "frame_id": "f-1",
                              "label": "good"})
    msg(store, "cam1/event", {"v": 1, "ts": "t", "device": "cam1", "event": "bad_frame", "id": "zz"})
    card = client.get("/api/state").get_json()["anomalies"][0]
    assert card["feedback"][0]["state"] == "ok" and card["feedback"][0]["answer"]["label"] == "good"
    assert [e["event"] for e in card["events"]] == ["feedback_added"]


def test_a_refused_feedback_shows_the_boxs_reason(store: ReviewStore, client_and_sent: tuple[Any, Sent]) -> None:
    client, _ = client_and_sent
    msg(store, "cam1/verdict", verdict("f-1"))
    rid = client.post("/api/feedback", json={"device": "cam1", "frame_id": "f-1", "label": "defect"}
                      ).get_json()["request_id"]
    msg(store, "cam1/cmd/feedback/result", {"request_id": rid, "ok": False, "error": "unknown command"})
    entry = client.get("/api/state").get_json()["anomalies"][0]["feedback"][0]
    assert entry["state"] == "error" and entry["answer"]["error"] == "unknown command"


@pytest.mark.parametrize(("body", "status"), [
    ({"device": "cam1", "frame_id": "f-1", "label": "maybe"}, 400),
    ({"device": "cam1", "frame_id": "f-1"}, 400),
    ({"device": "cam1", "frame_id": "gone", "label": "good"}, 404),
    ({"device": "cam1", "frame_id": "f-1", "label": "good", "note": 5}, 400),
])
def test_bad_feedback_requests_are_refused_with_a_reason(
        store: ReviewStore, client_and_sent: tuple[Any, Sent], body: dict[str, Any], status: int) -> None:
    client, sent = client_and_sent
    msg(store, "cam1/verdict", verdict("f-1"))
    r = client.post("/api/feedback", json=body)
    assert r.status_code == status and r.get_json()["error"]
    assert sent.asks == []


def test_feedback_must_be_json_from_the_page_itself(store: ReviewStore, client_and_sent: tuple[Any, Sent]) -> None:
    client, sent = client_and_sent
    msg(store, "cam1/verdict", verdict("f-1"))
    form = client.post("/api/feedback", data={"device": "cam1", "frame_id": "f-1", "label": "good"})
    assert form.status_code == 400
    other = client.post("/api/feedback", json={"device": "cam1", "frame_id": "f-1", "label": "good"},
                        headers={"Origin": "http://evil.example"})
    assert other.status_code == 403
    same = client.post("/api/feedback", json={"device": "cam1", "frame_id": "f-1", "label": "good"},
                       headers={"Origin": "http://localhost"})
    assert same.status_code == 202 and len(sent.asks) == 1
    proxied = client.post("/api/feedback", json={"device": "cam1", "frame_id": "f-1", "label": "good"},
                          headers={"Origin": "https://review.site", "X-Forwarded-Host": "review.site"})
    assert proxied.status_code == 202 and len(sent.asks) == 2


def test_on_loopback_the_page_answers_only_to_loopback_names(store: ReviewStore) -> None:
    """DNS rebinding: a web site re-points its own name at 127.0.0.1; the browser then sends that name as Host
    (and as Origin, so the Origin check alone passes). Only the names the page is opened by get an answer."""
    assert allowed_hosts("127.0.0.1") == {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts("::1", ["Review.Site"]) == {"localhost", "127.0.0.1", "::1", "review.site"}
    assert allowed_hosts("0.0.0.0") is None and allowed_hosts("10.0.0.5", ["[fd00::5]"]) == {"fd00::5"}
    sent = Sent()
    client = create_app(store, sent, hosts=allowed_hosts("127.0.0.1")).test_client()
    msg(store, "cam1/verdict", verdict("f-1"))
    for host in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "LOCALHOST"):
        assert client.get("/api/state", headers={"Host": host}).status_code == 200, host
    rebound = {"Host": "evil.example:8080", "Origin": "http://evil.example:8080"}
    for path in ("/", "/api/state", "/heatmap/cam1/f-1.jpg"):
        refused = client.get(path, headers=rebound)
        assert refused.status_code == 403 and "--allow-host" in refused.get_json()["error"], path
    post = client.post("/api/feedback", json={"device": "cam1", "frame_id": "f-1", "label": "good"}, headers=rebound)
    assert post.status_code == 403 and sent.asks == []
    assert client.get("/", headers={"Host": "[x"}).status_code in (400, 403)


def test_feedback_while_the_broker_is_away_says_so_on_the_card(store: ReviewStore) -> None:
    app = create_app(store, Sent(fail="cannot publish: the broker is not connected"))
    client = app.test_client()
    msg(store, "cam1/verdict", verdict("f-1"))
    r = client.post("/api/feedback", json={"device": "cam1", "frame_id": "f-1", "label": "good"})
    assert r.status_code == 503 and "not connected" in r.get_json()["error"]
    entry = client.get("/api/state").get_json()["anomalies"][0]["feedback"][0]
    assert entry["state"] == "error" and "not sent" in entry["answer"]["error"]


def test_help_says_there_is_no_authentication() -> None:
    parser = argparse.ArgumentParser(prog="yugami-fleet serve")
    add_arguments(parser)
    text = parser.format_help()
    assert "NO AUTHENTICATION" in text and "reverse proxy" in text
    args = parser.parse_args([])
    assert args.host == "127.0.0.1" and args.port == 8080
