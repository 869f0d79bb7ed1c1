"""Nothing lost while the broker is away: a durable outbox of verdicts in SQLite.

Every verdict is written here *before* it is published and deleted only when the broker has
acknowledged it (paho's ``on_publish`` with the message id, i.e. PUBACK for QoS 1). After a
SIGKILL or power cut the rows left are published again, oldest first, on the next start; a
verdict may therefore arrive twice (same frame id), never not at all, and never out of order.

Order across reconnects: a row handed to paho stays in paho's own session queue, which paho sends
again, in order, right after the next CONNACK and before anything newer. The deliverer hands new
rows to paho only after that resend is done (the service tells it when the SUBACK of the
command subscription arrives, which the network thread handles strictly after the CONNACK), so a
newer verdict never overtakes an older one.

The table is bounded (``outbox.max_messages``): beyond it the oldest rows are dropped and
reported, so a broker that never comes back cannot fill the disk.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created REAL NOT NULL
)
"""


@dataclass(frozen=True)
class Row:
    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Outbox:
    """The SQLite table; safe to use from several threads (one connection behind a lock)."""

    def __init__(self, path: str | Path, max_messages: int = 100000,
                 on_drop: Callable[[int, int], None] | None = None) -> None:
        self.path = Path(path)
        self.max_messages = max_messages
        self.on_drop = on_drop  # (rows dropped now, seq of the newest dropped row)
        self.dropped_total = 0
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10.0)
        # WAL + NORMAL: a committed row survives a killed process; only an OS crash / power cut can
        # lose the last few commits. FULL would fsync every verdict for that last bit of safety.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)
        self._depth = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        if self._depth:
            logger.info("outbox %s holds %d undelivered verdict(s) from before; they go first", self.path, self._depth)

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Store one message durably; return its sequence number. Drops the oldest beyond the bound."""
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO outbox (topic, payload, qos, retain, created) VALUES (?, ?, ?, ?, ?)",
                (topic, payload, qos, int(retain), time.time()),
            )
            seq = int(cur.lastrowid or 0)
            self._depth += 1
            excess = self._depth - self.max_messages
            dropped_upto = 0
            if excess > 0:
                rows = self._db.execute("SELECT seq FROM outbox ORDER BY seq LIMIT ?", (excess,)).fetchall()
                dropped_upto = int(rows[-1][0])
                self._db.execute("DELETE FROM outbox WHERE seq <= ?", (dropped_upto,))
                self._depth -= len(rows)
                self.dropped_total += len(rows)
        if excess > 0:
            logger.warning(
                "outbox full (%d messages, outbox.max_messages): dropped the oldest %d verdict(s) up to #%d",
                self.max_messages, excess, dropped_upto,
            )
            if self.on_drop:
                self.on_drop(excess, dropped_upto)
        return seq

    def after(self, seq: int, limit: int) -> list[Row]:
        """Up to ``limit`` rows newer than ``seq``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload, qos, retain FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit),
            ).fetchall()
        return [Row(int(s), str(t), bytes(p), int(q), bool(r)) for s, t, p, q, r in rows]

    def delete(self, seq: int) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            if cur.rowcount:
                self._depth -= cur.rowcount
            return bool(cur.rowcount)

    def depth(self) -> int:
        return self._depth

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Deliverer:
    """Moves outbox rows to the broker in order, at most ``window`` unacknowledged at a time.

    ``publish(row)`` hands a row to the MQTT client and returns its message id, or None when the
    client refused it. ``acked(mid)`` may be called from any thread (paho's network thread).
    """

    def __init__(self, outbox: Outbox, publish: Callable[[Row], int | None], window: int = 20) -> None:
        self.outbox = outbox
        self.publish = publish
        self.window = max(1, window)
        self.delivered = 0
        self._inflight: dict[int, int] = {}  # mid -> seq; touched only by the deliverer thread
        self._last_handed = 0
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._online = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-deliverer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def set_online(self, online: bool) -> None:
        self._online = online
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def acked(self, mid: int) -> None:
        self._acks.put(mid)
        self._wake.set()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every stored row was acknowledged (for a clean stop); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.outbox.depth() == 0 and not self._inflight:
                return True
            self._idle.clear()
            self._wake.set()
            self._idle.wait(0.05)
        return self.outbox.depth() == 0 and not self._inflight

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _drain_acks(self) -> None:
        while True:
            try:
                mid = self._acks.get_nowait()
            except queue.Empty:
                return
            seq = self._inflight.pop(mid, None)
            if seq is not None:  # other QoS 1 messages (state, results) share the id space
                self.outbox.delete(seq)
                self.delivered += 1

    def _hand_over(self) -> None:
        room = self.window - len(self._inflight)
        if not self._online or room <= 0:
            return
        for row in self.outbox.after(self._last_handed, room):
            mid = self.publish(row)
            if mid is None:
                return  # the client refused (queue full / stopping): try again on the next wake
            self._inflight[mid] = row.seq
            self._last_handed = row.seq

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                self._drain_acks()
                self._hand_over()
            except sqlite3.Error as exc:
                # A locked or failing disk must not kill delivery for good; the rows are still there.
                logger.error("outbox delivery failed (%s); retrying", exc)
                self._stop.wait(1.0)
            self._idle.set()
