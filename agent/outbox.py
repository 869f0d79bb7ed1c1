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

When the disk fails (full, read-only, I/O errors: ``sqlite3.Error`` or ``OSError``), :class:`Spool` keeps
the verdicts that cannot be written in a bounded memory queue (``outbox.memory_max``) behind the rows
already on disk. They are handed to the broker like rows (QoS 1, removed on PUBACK), and every
``outbox.retry_s`` the disk is tried again: once it takes writes, the waiting verdicts are written to it,
oldest first, and the memory queue is empty again. Order holds throughout: rows on disk go before rows in
memory, and rows re-persisted from memory keep their place. When the memory queue is full the service
stops taking frames (``Spool.has_room``) rather than drop one.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MEMORY_MAX = 10000  # verdicts held in memory at most while the disk refuses writes
DISK_RETRY_S = 5.0  # how often a failing disk is tried again
DISK_ERRORS = (sqlite3.Error, OSError)

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
    seq: int  # the outbox's sequence number, or the memory queue's key when ``held``
    topic: str
    payload: bytes
    qos: int
    retain: bool
    held: bool = False  # waiting in memory (the disk refused it), not in the outbox


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
        try:
            # WAL + NORMAL: a committed row survives a killed process; only an OS crash / power cut can
            # lose the last few commits. FULL would fsync every verdict for that last bit of safety.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(SCHEMA)
            self._depth = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        except BaseException:
            self._db.close()
            raise
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



@dataclass
class Held:
    """A verdict waiting in memory because the disk refused it."""

    key: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    handed: bool = False  # given to the MQTT client, waiting for its PUBACK

    def row(self) -> Row:
        return Row(self.key, self.topic, self.payload, self.qos, self.retain, held=True)


class Spool:
    """The outbox, with a bounded memory queue behind it for the verdicts a failing disk refuses.

    Thread-safe: the frame loop puts and ticks, the deliverer takes and acknowledges. Events
    (``outbox_degraded``, ``outbox_recovered``, ``outbox_memory_full``) go to ``on_event(name, detail)``,
    once per episode, called without the lock held."""

    def __init__(self, path: str | Path, max_messages: int = 100000,
                 on_drop: Callable[[int, int], None] | None = None, capacity: int = MEMORY_MAX,
                 retry_s: float = DISK_RETRY_S, on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, open_now: bool = True) -> None:
        self.path = Path(path)
        self.max_messages = max_messages
        self.on_drop = on_drop
        self.capacity = max(1, capacity)
        self.retry_s = retry_s
        self.on_event = on_event
        self.clock = clock
        self.outbox: Outbox | None = None
        self.degraded = False
        self.last_error: str | None = None
        self.held_total = 0  # verdicts that ever waited in memory
        self.repersisted = 0  # of those, written to the disk once it took writes again
        self.disk_errors = 0
        self._memory: deque[Held] = deque()
        self._next_key = 1
        self._cursor = 0  # outbox rows up to this seq were handed over
        self._relocated: dict[int, int] = {}  # held key -> outbox seq: re-persisted after it was handed over
        self._skip: set[int] = set()  # outbox seqs handed over already (as held rows)
        self._moved: dict[int, int] = {}  # held key -> outbox seq, for the last re-persisting pass
        self._deletes: list[int] = []  # acknowledged outbox rows whose delete failed: retried
        self._next_retry = 0.0
        self._full = False
        self._events: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.RLock()
        if open_now:
            self._open(strict=True)

    @classmethod
    def around(cls, outbox: Outbox) -> Spool:
        """A spool over an outbox that is already open."""
        spool = cls(outbox.path, outbox.max_messages, outbox.on_drop, open_now=False)
        spool.outbox = outbox
        return spool

    # --- the frame loop's side ---

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> str:
        """Store a verdict: 'disk', 'memory' (the disk refused it), or 'full' (not stored: memory is full)."""
        with self._lock:
            self._retry_if_due()
            where = self._put(topic, payload, qos, retain)
        self._announce()
        return where

    def has_room(self) -> bool:
        """Whether a verdict can be stored now; False while the memory queue is full (stop taking frames)."""
        with self._lock:
            full = len(self._memory) >= self.capacity
            if full and not self._full:
                logger.error("outbox: %d verdicts wait in memory (outbox.memory_max) and the disk still refuses "
                             "writes: no frames are taken until the broker or the disk takes some", self.capacity)
                self._events.append(("outbox_memory_full", {"memory_max": self.capacity,
                                                            "error": self.last_error}))
            elif not full and self._full:
                logger.warning("outbox: memory queue has room again; taking frames")
            self._full = full
        self._announce()
        return not full

    def tick(self) -> None:
        """Try the disk again when it is due (called every loop turn)."""
        with self._lock:
            self._retry_if_due()
        self._announce()

    # --- the deliverer's side ---

    def pending(self, limit: int) -> list[Row]:
        """Up to ``limit`` rows not yet handed over, oldest first: the disk's, then memory's."""
        rows: list[Row] = []
        with self._lock:
            more_on_disk = False
            if self.outbox is not None:
                want = limit + len(self._skip)
                try:
                    got = self.outbox.after(self._cursor, want)
                except DISK_ERRORS as exc:  # unreadable disk: what waits in memory still goes out
                    self._failed(exc, "read")
                    got = []
                more_on_disk = len(got) == want
                rows = [r for r in got if r.seq not in self._skip][:limit]
            if not more_on_disk:
                rows.extend(h.row() for h in self._memory if not h.handed)
        self._announce()
        return rows[:limit]

    def mark_handed(self, row: Row) -> None:
        with self._lock:
            if not row.held:
                self._cursor = max(self._cursor, row.seq)
                return
            held = next((h for h in self._memory if h.key == row.seq), None)
            if held is not None:
                held.handed = True
            elif row.seq in self._moved:  # re-persisted between pending() and now: not to be sent again
                seq = self._moved[row.seq]
                self._relocated[row.seq] = seq
                self._skip.add(seq)

    def done(self, row: Row) -> None:
        """The broker acknowledged ``row``: forget it."""
        with self._lock:
            if not row.held:
                self._delete(row.seq)
            elif row.seq in self._relocated:
                seq = self._relocated.pop(row.seq)
                self._skip.discard(seq)
                self._delete(seq)
            else:
                self._forget_held(row.seq)
        self._announce()

    # --- reports ---

    def depth(self) -> int:
        with self._lock:
            return (self.outbox.depth() if self.outbox is not None else 0) + len(self._memory)

    @property
    def dropped_total(self) -> int:
        return self.outbox.dropped_total if self.outbox is not None else 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"depth": self.depth(), "dropped": self.dropped_total, "degraded": self.degraded,
                    "memory": len(self._memory), "memory_max": self.capacity, "held_total": self.held_total,
                    "repersisted": self.repersisted, "disk_errors": self.disk_errors, "error": self.last_error}

    def close(self) -> None:
        """Write what waits in memory if the disk takes it now, then close; report what could not be kept."""
        with self._lock:
            if self._memory:
                self._retry()
            if self._memory:
                logger.error("outbox: %d verdict(s) held in memory could not be written to %s and are lost with "
                             "this process (the disk refused writes: %s)", len(self._memory), self.path,
                             self.last_error)
            if self.outbox is not None:
                with contextlib.suppress(*DISK_ERRORS):
                    self.outbox.close()

    # --- inside the lock ---

    def _put(self, topic: str, payload: bytes, qos: int, retain: bool) -> str:
        if not self._memory and self.outbox is not None:
            try:
                self.outbox.put(topic, payload, qos, retain)
            except DISK_ERRORS as exc:
                self._failed(exc, "write a verdict to")
            else:
                if self.degraded and not self._deletes:
                    self._recovered()
                return "disk"
        if len(self._memory) >= self.capacity:
            return "full"
        self._memory.append(Held(self._next_key, topic, payload, qos, retain))
        self._next_key += 1
        self.held_total += 1
        return "memory"

    def _open(self, strict: bool = False) -> bool:
        """Open the outbox; a failing disk makes the spool degraded. ``strict``: a file that is not an SQLite
        database (or a folder in its place) raises, for the caller to report as a config problem."""
        try:
            self.outbox = Outbox(self.path, self.max_messages, on_drop=self.on_drop)
        except (sqlite3.OperationalError, OSError) as exc:
            if strict and self.path.is_dir():
                raise
            self._failed(exc, "open")
            return False
        except sqlite3.Error as exc:
            if strict:
                raise
            self._failed(exc, "open")
            return False
        return True

    def _retry_if_due(self) -> None:
        if not (self.degraded or self._deletes):
            return
        now = self.clock()
        if now < self._next_retry:
            return
        self._next_retry = now + self.retry_s
        self._retry()

    def _retry(self) -> None:
        if self.outbox is None and not self._open():
            return
        try:
            self._retry_deletes()
            self._repersist()
        except DISK_ERRORS as exc:
            self._failed(exc, "write to")
            return
        if self.degraded and not self._memory:
            self._recovered()

    def _repersist(self) -> None:
        """Memory to disk, oldest first; stops at the first refusal (the rest wait for the next try)."""
        assert self.outbox is not None
        self._moved = {}
        while self._memory:
            held = self._memory[0]
            seq = self.outbox.put(held.topic, held.payload, held.qos, held.retain)
            self._memory.popleft()
            self.repersisted += 1
            self._moved[held.key] = seq
            if held.handed:  # in the MQTT client already: its PUBACK deletes the row, it is not sent again
                self._relocated[held.key] = seq
                self._skip.add(seq)

    def _retry_deletes(self) -> None:
        assert self.outbox is not None
        while self._deletes:
            self.outbox.delete(self._deletes[0])
            self._deletes.pop(0)

    def _delete(self, seq: int) -> None:
        if self.outbox is None:
            self._deletes.append(seq)
            return
        try:
            self.outbox.delete(seq)
        except DISK_ERRORS as exc:
            self._deletes.append(seq)  # delivered; deleted once the disk takes writes (a restart may resend it)
            self._failed(exc, "delete a delivered verdict from")

    def _forget_held(self, key: int) -> None:
        for i, held in enumerate(self._memory):
            if held.key == key:
                del self._memory[i]
                return

    def _failed(self, exc: BaseException, action: str) -> None:
        self.disk_errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._next_retry = self.clock() + self.retry_s
        if self.degraded:
            logger.debug("outbox %s: cannot %s it (%s)", self.path, action, self.last_error)
            return
        self.degraded = True
        logger.error("outbox %s: cannot %s it (%s); verdicts wait in memory (up to %d, outbox.memory_max) until "
                     "the broker or the disk takes them; the disk is tried again every %g s (outbox.retry_s). "
                     "Check free space and permissions of storage.dir", self.path, action, self.last_error,
                     self.capacity, self.retry_s)
        self._events.append(("outbox_degraded", {"error": self.last_error, "path": str(self.path),
                                                 "memory_max": self.capacity}))

    def _recovered(self) -> None:
        self.degraded = False
        logger.warning("outbox %s takes writes again; %d verdict(s) held in memory were written to it so far",
                       self.path, self.repersisted)
        self._events.append(("outbox_recovered", {"repersisted": self.repersisted, "held_total": self.held_total}))

    def _announce(self) -> None:
        with self._lock:
            events, self._events = self._events, []
        if self.on_event is None:
            return
        for name, detail in events:
            try:
                self.on_event(name, detail)
            except Exception:  # a report must never lose a verdict
                logger.exception("cannot report %s", name)


class Deliverer:
    """Moves stored verdicts to the broker in order, at most ``window`` unacknowledged at a time.

    ``store`` is a :class:`Spool` (an :class:`Outbox` is wrapped in one). ``publish(row)`` hands a row to
    the MQTT client and returns its message id, or None when the client refused it. ``acked(mid)`` may be
    called from any thread (paho's network thread).
    """

    def __init__(self, store: Spool | Outbox, publish: Callable[[Row], int | None], window: int = 20) -> None:
        self.store = store if isinstance(store, Spool) else Spool.around(store)
        self.publish = publish
        self.window = max(1, window)
        self.delivered = 0
        self._inflight: dict[int, Row] = {}  # mid -> row; touched only by the deliverer thread
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
            if self.store.depth() == 0 and not self._inflight:
                return True
            self._idle.clear()
            self._wake.set()
            self._idle.wait(0.05)
        return self.store.depth() == 0 and not self._inflight

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
            row = self._inflight.pop(mid, None)
            if row is not None:  # other QoS 1 messages (state, results) share the id space
                self.store.done(row)
                self.delivered += 1

    def _hand_over(self) -> None:
        room = self.window - len(self._inflight)
        if not self._online or room <= 0:
            return
        for row in self.store.pending(room):
            mid = self.publish(row)
            if mid is None:
                return  # the client refused (queue full / stopping): try again on the next wake
            self._inflight[mid] = row
            self.store.mark_handed(row)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                self._drain_acks()
                self._hand_over()
            except DISK_ERRORS as exc:
                # A locked or failing disk must not kill delivery for good; the rows are still there.
                logger.error("outbox delivery failed (%s); retrying", exc)
                self._stop.wait(1.0)
            self._idle.set()
