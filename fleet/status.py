"""``yugami-fleet status``: a table of every box seen on the broker.

Every box keeps three retained messages on the broker: ``<prefix>/<device>/available`` (online / offline, the
offline one is its last will), ``<prefix>/<device>/stats`` (health, every mqtt.stats_interval_s) and
``<prefix>/<device>/state`` (its last verdict). Subscribing to them returns the retained copies at once, so
a couple of seconds show the whole fleet, boxes that went away included (offline, and their last-seen age).

The table is built by :func:`build_rows`, a pure function of what was received, so it is tested without a
broker.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import paho.mqtt.client as paho

from agent.mqtt import parse_utc_iso
from fleet.mqtt import BrokerError, add_broker_arguments, close, connect, describe, device_of, subscribe
from fleet.table import columns

logger = logging.getLogger(__name__)

TOPICS = ("available", "stats", "state")
MISSING = "-"


@dataclass
class Seen:
    """The retained messages of one box, as received (None: not received)."""

    available: str | None = None
    stats: dict[str, Any] | None = None
    state: dict[str, Any] | None = None


@dataclass(frozen=True)
class Row:
    """One box in the table; None where the box does not report the value (yet)."""

    device: str
    online: bool | None
    model: str | None
    version: str | None
    sha256: str | None
    signer: str | None
    threshold: float | None
    threshold_source: str | None
    fps: float | None
    frames: int | None
    anomalies: int | None
    anomaly_rate: float | None
    backlog: int | None
    last_seen_s: float | None
    groups: list[str] = field(default_factory=list)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _count(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _signer(model: dict[str, Any]) -> str | None:
    """``name/key id`` from the stats' model.signer ({key_id, name, signed_at}); a plain string as is."""
    signer = model.get("signer")
    if isinstance(signer, str):
        return signer or None
    signer = _dict(signer)
    parts = [str(signer[k]) for k in ("name", "key_id") if signer.get(k)]
    return "/".join(parts) or None


def _threshold(stats: dict[str, Any], state: dict[str, Any]) -> tuple[float | None, str | None]:
    """The threshold the box judges with: stats' {value, source} (per-box settings); before that existed, the
    one its last verdict was judged against."""
    reported = stats.get("threshold")
    if isinstance(reported, dict) and _number(reported.get("value")) is not None:
        return _number(reported["value"]), str(reported.get("source") or "") or None
    if _number(reported) is not None:
        return _number(reported), None
    if _number(state.get("threshold")) is not None:
        return _number(state["threshold"]), "last verdict"
    return None, None


def build_row(device: str, seen: Seen, now: float) -> Row:
    stats, state = _dict(seen.stats), _dict(seen.state)
    model = _dict(stats.get("model")) or _dict(state.get("model"))
    frames, anomalies = _count(stats.get("frames")), _count(stats.get("anomalies"))
    rate = anomalies / frames if frames and anomalies is not None else None
    threshold, source = _threshold(stats, state)
    stamps = [t for t in (parse_utc_iso(stats.get("ts")), parse_utc_iso(state.get("ts"))) if t is not None]
    groups = stats.get("groups") or _dict(stats.get("fleet")).get("groups") or []
    return Row(
        device=device,
        online=None if seen.available is None else seen.available == "online",
        model=model.get("name") or None,
        version=(str(model["version"]) if model.get("version") is not None else None),
        sha256=model.get("sha256") or None,
        signer=_signer(model),
        threshold=threshold,
        threshold_source=source,
        fps=_number(stats.get("fps")),
        frames=frames,
        anomalies=anomalies,
        anomaly_rate=rate,
        backlog=_count(_dict(stats.get("outbox")).get("depth")),
        last_seen_s=max(0.0, now - max(stamps)) if stamps else None,
        groups=[str(g) for g in groups] if isinstance(groups, list) else [],
    )


def build_rows(seen: dict[str, Seen], now: float) -> list[Row]:
    """The table's rows, one per box, sorted by device id; ``now`` is the POSIX time ages are taken from."""
    return [build_row(device, seen[device], now) for device in sorted(seen)]


def _age(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def _cells(row: Row) -> list[str]:
    online = {True: "yes", False: "NO", None: "?"}[row.online]
    model = row.model or MISSING
    if row.version:
        model += f" {row.version}"
    threshold = MISSING if row.threshold is None else f"{row.threshold:.4g}"
    if row.threshold is not None and row.threshold_source:
        threshold += f" ({row.threshold_source})"
    rate = MISSING
    if row.anomaly_rate is not None:
        rate = f"{100 * row.anomaly_rate:.1f}% ({row.anomalies}/{row.frames})"
    return [row.device, online, model, row.signer or MISSING, threshold,
            MISSING if row.fps is None else f"{row.fps:.1f}", rate,
            MISSING if row.backlog is None else str(row.backlog), _age(row.last_seen_s)]


HEADER = ["DEVICE", "ONLINE", "MODEL", "SIGNER", "THRESHOLD", "FPS", "ANOMALIES", "BACKLOG", "LAST SEEN"]


def format_table(rows: list[Row]) -> str:
    return columns([HEADER, *(_cells(r) for r in rows)])


def rows_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


class Collector:
    """Keeps the latest available / stats / state of every box under ``prefix`` (from paho's thread)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.lock = threading.Lock()
        self.seen: dict[str, Seen] = {}

    def filters(self) -> list[str]:
        return [f"{self.prefix}/+/{name}" for name in TOPICS]

    def on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        where = device_of(self.prefix, msg.topic)
        if where is None or where[1] not in TOPICS:
            return
        device, kind = where
        with self.lock:
            box = self.seen.setdefault(device, Seen())
            if kind == "available":
                box.available = msg.payload.decode("utf-8", "replace").strip()
                return
            try:
                body = json.loads(msg.payload)
            except (ValueError, UnicodeDecodeError):
                logger.warning("%s: not JSON, ignored", msg.topic)
                return
            if isinstance(body, dict):
                setattr(box, kind, body)

    def snapshot(self) -> dict[str, Seen]:
        with self.lock:
            return {d: Seen(s.available, s.stats, s.state) for d, s in self.seen.items()}

    def attach(self, client: paho.Client) -> None:
        for f in self.filters():
            client.message_callback_add(f, self.on_message)
        subscribe(client, self.filters())


def collect(client: paho.Client, prefix: str, wait_s: float) -> dict[str, Seen]:
    """What the broker holds and sends for ``wait_s`` seconds about every box under ``prefix``."""
    collector = Collector(prefix)
    collector.attach(client)
    time.sleep(wait_s)
    return collector.snapshot()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_broker_arguments(parser)
    parser.add_argument("--wait", type=float, default=2.0, metavar="S",
                        help="seconds to listen (retained messages arrive at once; stats every interval) "
                             "(default: 2)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of the table")


def run(args: argparse.Namespace) -> int:
    try:
        client = connect(args, "status")
    except BrokerError as exc:
        print(f"yugami-fleet status: {exc}", file=sys.stderr)
        return 1
    try:
        seen = collect(client, args.prefix, max(0.0, args.wait))
    except BrokerError as exc:
        print(f"yugami-fleet status: {exc}", file=sys.stderr)
        return 1
    finally:
        close(client)
    rows = build_rows(seen, time.time())
    if args.json:
        print(json.dumps(rows_json(rows), indent=2))
    else:
        print(format_table(rows))
    if not rows:
        print(f"yugami-fleet status: no box seen on {describe(args)} under the prefix {args.prefix!r} in "
              f"{args.wait:g} s; check --broker and --prefix (the boxes' mqtt.topic_prefix)", file=sys.stderr)
        return 1
    return 0
