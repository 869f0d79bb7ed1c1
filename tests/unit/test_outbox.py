"""The durable outbox: order, durability across a reopen, the bound, and the deliverer's window."""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from pathlib import Path

from agent.outbox import Deliverer, Outbox, Row


def test_rows_come_back_in_order_and_are_deleted_on_ack(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3")
    seqs = [box.put("t/verdict", f"m{i}".encode()) for i in range(5)]
    assert seqs == sorted(seqs) and box.depth() == 5
    rows = box.after(0, 3)
    assert [r.payload for r in rows] == [b"m0", b"m1", b"m2"] and rows[0].qos == 1 and not rows[0].retain
    assert [r.payload for r in box.after(rows[-1].seq, 10)] == [b"m3", b"m4"]
    assert box.delete(seqs[0]) and not box.delete(seqs[0])
    assert box.depth() == 4
    box.close()


def test_stored_rows_survive_a_reopen_and_sequence_keeps_growing(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    box = Outbox(path)
    a, b = box.put("t", b"a"), box.put("t", b"b")
    box.delete(b)
    box.close()  # as after a kill: nothing else is flushed at close
    again = Outbox(path)
    assert [r.payload for r in again.after(0, 10)] == [b"a"] and again.depth() == 1
    c = again.put("t", b"c")
    assert c > b > a  # never reuses a delivered row's number, so order stays meaningful
    again.close()


def test_bound_drops_the_oldest_and_reports(tmp_path: Path) -> None:
    reports: list[tuple[int, int]] = []
    box = Outbox(tmp_path / "o.sqlite3", max_messages=5, on_drop=lambda n, upto: reports.append((n, upto)))
    seqs = [box.put("t", str(i).encode()) for i in range(8)]
    assert box.depth() == 5 and box.dropped_total == 3
    assert [r.payload for r in box.after(0, 10)] == [b"3", b"4", b"5", b"6", b"7"]
    assert reports == [(1, seqs[0]), (1, seqs[1]), (1, seqs[2])]
    with sqlite3.connect(str(tmp_path / "o.sqlite3")) as conn:
        assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 5


def test_deliverer_hands_in_order_within_its_window_and_only_online(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3")
    for i in range(10):
        box.put("t", str(i).encode())
    handed: list[Row] = []
    mids = itertools.count(1)
    lock = threading.Lock()

    def publish(row: Row) -> int:
        with lock:
            handed.append(row)
        return next(mids)

    d = Deliverer(box, publish, window=3)
    d.start()
    try:
        d.wake()
        time.sleep(0.3)  # give it every chance to misbehave while offline
        assert handed == []
        d.set_online(True)
        deadline = time.monotonic() + 10
        while len(handed) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert [r.payload for r in handed] == [b"0", b"1", b"2"]  # window full: no more until acks
        for mid in (1, 2, 3):
            d.acked(mid)
        d.acked(999)  # some other QoS 1 message: ignored
        assert d.wait_idle(0.2) is False  # 7 rows still to go
        while len(handed) < 10 and time.monotonic() < deadline:
            d.acked(len(handed))
            time.sleep(0.01)
        for mid in range(1, 11):
            d.acked(mid)
        assert d.wait_idle(10)
    finally:
        d.stop()
    assert [r.payload for r in handed] == [str(i).encode() for i in range(10)]
    assert box.depth() == 0 and d.delivered == 10
