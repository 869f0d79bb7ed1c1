"""The review page's memory: recent anomalies of every box, their heat maps, operator feedback, anomaly rates.

Everything here is pure and in memory (no network, no Flask): :func:`route` turns one MQTT message into
store updates, :class:`ReviewStore` keeps what the page shows, bounded, and :meth:`ReviewStore.state` is the
JSON the page polls. ``fleet.serve`` wires it to a broker and to HTTP.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.mqtt import parse_utc_iso, topic_level

logger = logging.getLogger(__name__)

LABELS = {"good": "false alarm", "defect": "real defect"}  # cmd/feedback label -> what the operator clicked
MAX_HEATMAP_BYTES = 4_000_000  # a bigger "JPEG" is not a heat map the agent sent; refuse to keep it
MAX_ORPHAN_HEATMAPS = 32  # heat maps whose verdict has not arrived yet (QoS 0 can overtake the outbox)
MAX_SEEN_IDS = 4096  # verdict ids remembered per box, so a QoS 1 duplicate is counted once
MAX_CARD_NOTES = 20  # events and answers kept per card
MAX_NOTE_BYTES = 500  # the operator's note, at most (the agent's cmd body has a size limit too)


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, tz=dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


@dataclass
class Card:
    """One anomaly as the page shows it."""

    device: str
    frame_id: str
    verdict: dict[str, Any]
    received: float
    heatmap: bytes | None = None
    heatmap_status: str = "waiting"  # waiting | requested | ready | unavailable: <why>
    feedback: list[dict[str, Any]] = field(default_factory=list)  # one per click: request id, label, answer
    events: list[dict[str, Any]] = field(default_factory=list)  # the box's events about this frame

    def as_json(self, heatmap_url: Callable[[str, str], str]) -> dict[str, Any]:
        v = self.verdict
        model = v.get("model") if isinstance(v.get("model"), dict) else {}
        return {
            "device": self.device,
            "frame_id": self.frame_id,
            "ts": v.get("ts") if isinstance(v.get("ts"), str) else iso(self.received),
            "score": _number(v.get("score")),
            "threshold": _number(v.get("threshold")),
            "confidence": _number(v.get("confidence")),
            "model": {"name": model.get("name"), "version": model.get("version"),
                      "sha256": model.get("sha256")},
            "evidence": v.get("evidence"),
            "heatmap": heatmap_url(self.device, self.frame_id) if self.heatmap else None,
            "heatmap_status": self.heatmap_status,
            "feedback": [dict(f) for f in self.feedback],
            "events": [dict(e) for e in self.events],
        }


@dataclass
class Box:
    """What the page knows of one camera box."""

    device: str
    online: bool | None = None
    last_seen: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    bins: dict[int, list[int]] = field(default_factory=dict)  # bin start (s) -> [frames, anomalies]
    seen: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def gradcam_policy(self) -> str | None:
        settings = self.stats.get("settings")
        if isinstance(settings, dict):
            policy = settings.get("gradcam_policy")
            if isinstance(policy, dict):  # {"value": ..., "source": ...} if the box reports where it came from
                policy = policy.get("value")
            if isinstance(policy, str):
                return policy
        return None

    def as_json(self, now: float, bin_s: int, bins: int) -> dict[str, Any]:
        s = self.stats
        model = s.get("model") if isinstance(s.get("model"), dict) else {}
        threshold = s.get("threshold")
        if isinstance(threshold, dict):
            threshold = threshold.get("value")
        last = int(now // bin_s) * bin_s
        series = []
        for start in range(last - (bins - 1) * bin_s, last + 1, bin_s):
            frames, anomalies = self.bins.get(start, (0, 0))
            series.append({"t": iso(start), "frames": frames, "anomalies": anomalies,
                           "rate": round(anomalies / frames, 4) if frames else None})
        return {
            "device": self.device,
            "online": self.online,
            "last_seen": iso(self.last_seen) if self.last_seen else None,
            "model": {"name": model.get("name"), "version": model.get("version")},
            "threshold": _number(threshold),
            "fps": _number(s.get("fps")),
            "frames": s.get("frames"),
            "anomalies": s.get("anomalies"),
            "rate": {"bin_s": bin_s, "bins": series},
        }


@dataclass(frozen=True)
class Ask:
    """A command the server should send a box because of a message (a heat map for a new anomaly)."""

    device: str
    name: str
    body: dict[str, Any]


class ReviewStore:
    """Bounded, thread-safe memory of the page: the MQTT thread writes, the HTTP threads read."""

    def __init__(self, max_anomalies: int = 200, bin_s: int = 60, bins: int = 60, max_boxes: int = 1000,
                 clock: Callable[[], float] = time.time) -> None:
        if max_anomalies < 1 or bin_s < 1 or bins < 1 or max_boxes < 1:
            raise ValueError("max_anomalies, bin_s, bins and max_boxes must be at least 1")
        self.max_anomalies = max_anomalies
        self.bin_s = bin_s
        self.bins = bins
        self.max_boxes = max_boxes
        self.clock = clock
        self.connected = False  # subscribed on the broker (set by the MQTT side)
        self.connects = 0  # successful (re)connections, subscriptions included
        self._cards: OrderedDict[tuple[str, str], Card] = OrderedDict()
        # A heat map's topic carries the frame id as one topic level (wildcards and '/' replaced).
        self._by_level: dict[tuple[str, str], str] = {}
        self._boxes: dict[str, Box] = {}
        self._orphans: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._requests: OrderedDict[str, tuple[str, str, str]] = OrderedDict()  # request id -> device, frame, cmd
        self._ids = itertools.count(1)
        self._run = f"{int(clock()):x}"
        self._lock = threading.Lock()

    # --- boxes ---

    def _box(self, device: str) -> Box | None:
        box = self._boxes.get(device)
        if box is None:
            if len(self._boxes) >= self.max_boxes:
                logger.warning("more than %d boxes on the broker; ignoring %s", self.max_boxes, device)
                return None
            box = self._boxes[device] = Box(device)
        return box

    def on_available(self, device: str, payload: bytes) -> None:
        with self._lock:
            box = self._box(device)
            if box is not None:
                box.online = payload.strip() == b"online"
                box.last_seen = self.clock()

    def on_stats(self, device: str, stats: dict[str, Any]) -> None:
        with self._lock:
            box = self._box(device)
            if box is not None:
                box.stats = stats
                box.last_seen = self.clock()

    # --- verdicts and heat maps ---

    def on_verdict(self, device: str, verdict: dict[str, Any]) -> list[Ask]:
        """Count the verdict in the box's rate; an anomaly becomes a card. Returns commands to send."""
        frame_id = verdict.get("id")
        if not isinstance(frame_id, str) or not frame_id:
            return []
        now = self.clock()
        with self._lock:
            box = self._box(device)
            if box is None or frame_id in box.seen:
                return []  # QoS 1 delivers at least once: a duplicate is not a second frame
            box.seen[frame_id] = None
            while len(box.seen) > MAX_SEEN_IDS:
                box.seen.popitem(last=False)
            box.last_seen = now
            anomaly = verdict.get("verdict") == "anomaly"
            self._count(box, parse_utc_iso(verdict.get("ts")), anomaly, now)
            if not anomaly:
                return []
            return self._add_card(box, frame_id, verdict, now)

    def _count(self, box: Box, t: float | None, anomaly: bool, now: float) -> None:
        # The box's own time puts a backlog delivered after an outage where it happened; a box clock ahead
        # of ours (or no time at all) counts as now.
        if t is None or t > now + self.bin_s:
            t = now
        start = int(t // self.bin_s) * self.bin_s
        oldest = (int(now // self.bin_s) - self.bins + 1) * self.bin_s
        if start < oldest:
            return
        cell = box.bins.setdefault(start, [0, 0])
        cell[0] += 1
        cell[1] += int(anomaly)
        for old in [b for b in box.bins if b < oldest]:
            del box.bins[old]

    def _add_card(self, box: Box, frame_id: str, verdict: dict[str, Any], now: float) -> list[Ask]:
        card = Card(box.device, frame_id, verdict, now)
        self._cards[(box.device, frame_id)] = card
        level = topic_level(frame_id)
        self._by_level[(box.device, level)] = frame_id
        while len(self._cards) > self.max_anomalies:
            (device, old), _ = self._cards.popitem(last=False)
            self._by_level.pop((device, topic_level(old)), None)
        jpeg = self._orphans.pop((box.device, level), None)
        if jpeg is not None:
            card.heatmap, card.heatmap_status = jpeg, "ready"
            return []
        policy = box.gradcam_policy()
        if policy == "every_anomaly":
            return []  # the box sends one by itself
        if policy == "off":
            card.heatmap_status = "unavailable: the box has gradcam.policy off"
            return []
        # Ask at once: the box keeps only its last gradcam.keep_frames frames.
        rid = self._new_request(box.device, frame_id, "gradcam")
        card.heatmap_status = "requested"
        return [Ask(box.device, "gradcam", {"id": rid, "frame_id": frame_id})]

    def on_heatmap(self, device: str, level: str, jpeg: bytes) -> None:
        """A heat map from ``<base>/gradcam/<level>``, ``level`` being the verdict id as a topic level."""
        if len(jpeg) > MAX_HEATMAP_BYTES or not jpeg.startswith(b"\xff\xd8"):
            logger.warning("ignoring a heat map for %s/%s that is not a JPEG under %d bytes",
                           device, level, MAX_HEATMAP_BYTES)
            return
        with self._lock:
            frame_id = self._by_level.get((device, level))
            card = self._cards.get((device, frame_id)) if frame_id is not None else None
            if card is not None:
                card.heatmap, card.heatmap_status = jpeg, "ready"
                return
            self._orphans[(device, level)] = jpeg
            while len(self._orphans) > MAX_ORPHAN_HEATMAPS:
                self._orphans.popitem(last=False)

    def heatmap(self, device: str, frame_id: str) -> bytes | None:
        with self._lock:
            card = self._cards.get((device, frame_id))
            return card.heatmap if card else None

    # --- commands, answers, events ---

    def _new_request(self, device: str, frame_id: str, cmd: str) -> str:
        rid = f"review-{self._run}-{next(self._ids)}"
        self._requests[rid] = (device, frame_id, cmd)
        while len(self._requests) > 4 * self.max_anomalies:
            self._requests.popitem(last=False)
        return rid

    def feedback(self, device: str, frame_id: str, label: str, note: str = "") -> Ask:
        """The cmd/feedback for an operator's click, noted on the card; KeyError if there is no such card,
        ValueError for a label other than good / defect."""
        if label not in LABELS:
            raise ValueError(f"label must be one of {', '.join(LABELS)}, not {label!r}")
        with self._lock:
            card = self._cards.get((device, frame_id))
            if card is None:
                raise KeyError(f"no anomaly {frame_id!r} of box {device!r} on this page (it may have scrolled out)")
            rid = self._new_request(device, frame_id, "feedback")
            card.feedback.append({"request_id": rid, "label": label, "sent": iso(self.clock()), "state": "sent"})
            del card.feedback[:-MAX_CARD_NOTES]
        body: dict[str, Any] = {"id": rid, "frame_id": frame_id, "label": label}
        if note:
            body["note"] = note[:MAX_NOTE_BYTES]
        return Ask(device, "feedback", body)

    def send_failed(self, ask: Ask, error: str) -> None:
        """A command that never left (broker away): the card says so instead of waiting forever."""
        self.on_result(ask.device, ask.name, {"request_id": ask.body.get("id"), "ok": False, "error": error})

    def on_result(self, device: str, cmd: str, result: dict[str, Any]) -> None:
        rid = result.get("request_id")
        with self._lock:
            known = self._requests.get(rid) if isinstance(rid, str) else None
            if known is None or known[0] != device:
                return  # someone else's command
            card = self._cards.get((device, known[1]))
            if card is None:
                return
            ok = result.get("ok") is True
            error = result.get("error") if isinstance(result.get("error"), str) else None
            if cmd == "gradcam":
                if not ok and card.heatmap is None:
                    card.heatmap_status = f"unavailable: {error or 'the box could not make one'}"
                return
            for entry in card.feedback:
                if entry["request_id"] == rid:
                    entry["state"] = "ok" if ok else "error"
                    entry["answer"] = {k: v for k, v in result.items() if k not in ("v", "cmd", "request_id")}

    def on_event(self, device: str, event: dict[str, Any]) -> None:
        frame_id = event.get("frame_id")
        if not isinstance(frame_id, str):
            return
        with self._lock:
            card = self._cards.get((device, frame_id))
            if card is not None:
                card.events.append({k: v for k, v in event.items() if k not in ("v", "device")})
                del card.events[:-MAX_CARD_NOTES]

    # --- what the page polls ---

    def state(self, heatmap_url: Callable[[str, str], str]) -> dict[str, Any]:
        now = self.clock()
        with self._lock:
            return {
                "now": iso(now),
                "connected": self.connected,
                "connects": self.connects,
                "boxes": [b.as_json(now, self.bin_s, self.bins) for _, b in sorted(self._boxes.items())],
                "anomalies": [c.as_json(heatmap_url) for c in reversed(self._cards.values())],
            }


def route(store: ReviewStore, prefix: str, topic: str, payload: bytes) -> list[Ask]:
    """Hand one message from the broker to the store; returns commands to send because of it."""
    if not topic.startswith(prefix + "/"):
        return []
    parts = topic[len(prefix) + 1:].split("/")
    device, rest = parts[0], parts[1:]
    if not device:
        return []
    if rest == ["available"]:
        store.on_available(device, payload)
        return []
    if len(rest) == 2 and rest[0] == "gradcam" and rest[1]:
        store.on_heatmap(device, rest[1], payload)
        return []
    body = _json_object(topic, payload)
    if body is None:
        return []
    if rest == ["verdict"]:
        return store.on_verdict(device, body)
    if rest == ["stats"]:
        store.on_stats(device, body)
    elif rest == ["event"]:
        store.on_event(device, body)
    elif len(rest) == 3 and rest[0] == "cmd" and rest[2] == "result":
        store.on_result(device, rest[1], body)
    return []


def _json_object(topic: str, payload: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        logger.debug("ignoring a message on %s that is not JSON", topic)
        return None
    return body if isinstance(body, dict) else None


def subscriptions(prefix: str) -> list[str]:
    """The topics the review page listens to."""
    return [f"{prefix}/+/{t}" for t in ("verdict", "stats", "available", "event", "gradcam/+", "cmd/+/result")]

