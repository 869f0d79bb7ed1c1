"""Issue 13, item 6: the memory queue behind the outbox. A disk that refuses writes loses no verdict: they
wait in memory (bounded, counted, announced once), go to the broker from there, and are written to the disk,
in order, once it takes writes again."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

import agent.outbox as outbox_module
from agent.outbox import Deliverer, Outbox, Row, Spool


class FlakyOutbox(Outbox):
    """A real outbox whose disk can be switched off: every access then fails as a full disk does."""

    broken = False

    def _check(self) -> None:
        if self.broken:
            raise sqlite3.OperationalError("database or disk is full")

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        self._check()
        return super().put(topic, payload, qos, retain)

    def delete(self, seq: int) -> bool:
        self._check()
        return super().delete(seq)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, capacity: int = 5) -> tuple[Spool, FlakyOutbox, Clock, list[tuple[str, dict]]]:
    box = FlakyOutbox(tmp_path / "outbox.sqlite3")
    clock = Clock()
    events: list[tuple[str, dict[str, Any]]] = []
    spool = Spool(box.path, capacity=capacity, retry_s=5.0, clock=clock, open_now=False,
                  on_event=lambda name, detail: events.append((name, detail)))
    spool.outbox = box
    return spool, box, clock, events


def payloads(rows: list[Row]) -> list[bytes]:
    return [r.payload for r in rows]


def test_a_refusing_disk_sends_verdicts_to_memory_announced_once(tmp_path: Path) -> None:
    spool, box, _, events = make(tmp_path)
    assert spool.put("t", b"1") == "disk"
    box.broken = True
    assert [spool.put("t", b"%d" % i) for i in (2, 3, 4)] == ["memory"] * 3
    assert [name for name, _ in events] == ["outbox_degraded"]
    assert "disk is full" in events[0][1]["error"] and events[0][1]["memory_max"] == 5
    stats = spool.stats()
    assert stats["degraded"] and stats["memory"] == 3 and stats["held_total"] == 3 and stats["depth"] == 4


def test_the_memory_queue_is_bounded_and_full_means_backpressure(tmp_path: Path) -> None:
    spool, box, _, events = make(tmp_path, capacity=3)
    box.broken = True
    assert [spool.put("t", b"x") for _ in range(3)] == ["memory"] * 3
    assert spool.has_room() is False
    assert spool.put("t", b"y") == "full"  # refused, never dropped silently: the caller keeps the frame
    assert spool.has_room() is False
    assert [name for name, _ in events] == ["outbox_degraded", "outbox_memory_full"]


def test_held_verdicts_are_written_to_the_disk_in_order_when_it_recovers(tmp_path: Path) -> None:
    spool, box, clock, events = make(tmp_path)
    spool.put("t", b"1")
    box.broken = True
    for i in (2, 3, 4):
        spool.put("t", b"%d" % i)
    box.broken = False
    spool.tick()  # not due yet: the disk is tried every retry_s
    assert spool.stats()["memory"] == 3
    clock.now += 5.0
    spool.tick()
    assert spool.stats()["memory"] == 0 and spool.repersisted == 3 and not spool.degraded
    assert payloads(box.after(0, 10)) == [b"1", b"2", b"3", b"4"]
    assert spool.put("t", b"5") == "disk"
    assert [name for name, _ in events] == ["outbox_degraded", "outbox_recovered"]


def test_new_verdicts_queue_behind_held_ones_while_the_disk_still_fails(tmp_path: Path) -> None:
    spool, box, clock, _ = make(tmp_path)
    box.broken = True
    spool.put("t", b"1")
    box.broken = False
    assert spool.put("t", b"2") == "memory"  # not before the retry: it must not overtake 1
    clock.now += 5.0
    assert spool.put("t", b"3") == "disk"
    assert payloads(box.after(0, 10)) == [b"1", b"2", b"3"]


def test_disk_rows_go_out_before_memory_rows(tmp_path: Path) -> None:
    spool, box, _, _ = make(tmp_path)
    spool.put("t", b"d1")
    spool.put("t", b"d2")
    box.broken = True
    spool.put("t", b"m1")
    spool.put("t", b"m2")
    first = spool.pending(1)
    assert payloads(first) == [b"d1"]
    spool.mark_handed(first[0])
    rest = spool.pending(10)
    assert payloads(rest) == [b"d2", b"m1", b"m2"] and [r.held for r in rest] == [False, True, True]


def test_a_held_row_acked_by_the_broker_is_gone_without_touching_the_disk(tmp_path: Path) -> None:
    spool, box, _, _ = make(tmp_path)
    box.broken = True
    spool.put("t", b"m1")
    row = spool.pending(5)[0]
    spool.mark_handed(row)
    assert spool.pending(5) == []
    spool.done(row)
    assert spool.depth() == 0 and spool.stats()["memory"] == 0


def test_a_held_row_written_to_disk_while_in_flight_is_not_sent_again(tmp_path: Path) -> None:
    spool, box, clock, _ = make(tmp_path)
    box.broken = True
    spool.put("t", b"m1")
    spool.put("t", b"m2")
    row = spool.pending(1)[0]
    spool.mark_handed(row)  # in the MQTT client, waiting for its PUBACK
    box.broken = False
    clock.now += 5.0
    spool.tick()  # both written to the disk
    assert box.depth() == 2
    assert payloads(spool.pending(10)) == [b"m2"]  # m1 is in flight already
    spool.done(row)  # its PUBACK deletes the row it became
    assert payloads(box.after(0, 10)) == [b"m2"]


def test_the_deliverer_sends_every_verdict_in_order_across_a_disk_failure(tmp_path: Path) -> None:
    spool, box, clock, _ = make(tmp_path, capacity=100)
    sent: list[bytes] = []
    mids: dict[int, Row] = {}
    d = Deliverer(spool, lambda row: (sent.append(row.payload), mids.setdefault(len(mids) + 1, row), len(mids))[2],
                  window=3)
    d.set_online(True)

    def pump() -> None:
        d._hand_over()
        for mid in list(mids):
            d.acked(mids.pop(mid) and mid)
        d._drain_acks()

    for i in range(20):
        if i == 5:
            box.broken = True
        if i == 15:
            box.broken = False
            clock.now += 5.0
        spool.tick()
        spool.put("t", b"%02d" % i)
        if i % 4 == 0:
            pump()
    for _ in range(20):
        pump()
    assert sent == [b"%02d" % i for i in range(20)]
    assert spool.depth() == 0 and d.inflight == 0


def test_an_outbox_that_cannot_be_opened_at_start_is_retried(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = []
    real = outbox_module.Outbox

    def opener(*args: Any, **kw: Any) -> Outbox:
        attempts.append(1)
        if len(attempts) == 1:
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return real(*args, **kw)

    monkeypatch.setattr(outbox_module, "Outbox", opener)
    clock = Clock()
    spool = Spool(tmp_path / "outbox.sqlite3", clock=clock)
    assert spool.outbox is None and spool.degraded
    assert spool.put("t", b"1") == "memory"
    clock.now += 5.0
    spool.tick()
    assert spool.outbox is not None and not spool.degraded and spool.outbox.depth() == 1


def test_a_file_that_is_not_a_database_still_raises_at_start(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(b"not a database at all, just some text " * 50)
    with pytest.raises(sqlite3.DatabaseError):
        Spool(path)
