"""Issue 13, item 6: evidence retention by bytes as well as files, and a free-space floor under which no
evidence is written, so the outbox keeps room."""

from __future__ import annotations

import time
from collections import namedtuple
from pathlib import Path

import pytest

import agent.storage as storage
from agent.config import StorageConfig
from agent.storage import Evidence
from tests.unit.test_storage import frame, pairs, payload


def test_retention_by_bytes_keeps_the_newest_under_max_bytes(tmp_path: Path) -> None:
    probe = Evidence(tmp_path / "probe", StorageConfig())
    probe.save(frame(), payload(0))
    one = probe.bytes
    assert one > 0
    ev = Evidence(tmp_path, StorageConfig(max_bytes=3 * one + one // 2, min_free_bytes=0))
    now = time.time()
    for i in range(6):
        ev.save(frame(), payload(i), now=now + i)
    assert len(ev) == 3 and ev.bytes <= 3 * one + one // 2
    assert pairs(tmp_path) == ["run-000003", "run-000004", "run-000005"]
    again = Evidence(tmp_path, StorageConfig(max_bytes=2 * one + one // 2))  # a restart reads sizes from disk
    assert len(again) == 2 and again.bytes == sum(p.stat().st_size for p in (tmp_path / "evidence").glob("*/*"))


def test_no_evidence_under_the_free_space_floor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    free = {"bytes": 50_000_000}
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - free["bytes"], free["bytes"]))
    ev = Evidence(tmp_path, StorageConfig(min_free_bytes=100_000_000))
    assert ev.save(frame(), payload(0)) is None
    assert ev.skipped == 1 and ev.errors == 0 and ev.saved == 0 and pairs(tmp_path) == []
    free["bytes"] = 500_000_000
    assert ev.save(frame(), payload(1)) is not None and ev.saved == 1
