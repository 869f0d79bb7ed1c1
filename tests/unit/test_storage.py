"""Evidence on disk: what is kept, with its verdict JSON, and retention by count and age."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np

from agent.config import StorageConfig
from agent.storage import Evidence


def payload(i: int, verdict: str = "anomaly", frame_id: str | None = None) -> dict:
    return {"v": 1, "id": frame_id or f"run-{i:06d}", "verdict": verdict, "score": 0.9}


def frame() -> np.ndarray:
    return np.full((32, 48, 3), 200, np.uint8)


def pairs(root: Path) -> list[str]:
    return sorted(json.loads(p.read_text())["id"] for p in (root / "evidence").glob("*/*.json"))


def test_anomalies_are_saved_with_their_verdict_ok_frames_only_as_a_sample(tmp_path: Path) -> None:
    ev = Evidence(tmp_path, StorageConfig(save_normal_every=3))
    assert ev.wants("anomaly")
    assert [ev.wants("ok") for _ in range(6)] == [False, False, True, False, False, True]
    path = ev.save(frame(), payload(1))
    assert path is not None and path.suffix == ".jpg"
    image = cv2.imread(str(path))
    assert image is not None and image.shape == (32, 48, 3)
    meta = json.loads(path.with_name(path.name[: -len(".jpg")] + ".json").read_text())
    assert meta == payload(1)
    assert not Evidence(tmp_path / "b", StorageConfig(save_anomalies=False)).wants("anomaly")
    assert not Evidence(tmp_path / "c", StorageConfig()).wants("ok")


def test_frame_ids_with_dots_keep_their_whole_name(tmp_path: Path) -> None:
    ev = Evidence(tmp_path, StorageConfig(image_format="png"))
    path = ev.save(frame(), payload(0, frame_id="part.v2-1a2b3c"))
    assert path is not None and path.name.endswith("_part.v2-1a2b3c.png")
    assert pairs(tmp_path) == ["part.v2-1a2b3c"]


def test_retention_by_count_keeps_the_newest(tmp_path: Path) -> None:
    ev = Evidence(tmp_path, StorageConfig(max_files=3))
    now = time.time()
    for i in range(5):
        ev.save(frame(), payload(i), now=now + i)
    assert pairs(tmp_path) == ["run-000002", "run-000003", "run-000004"] and len(ev) == 3
    assert len(list((tmp_path / "evidence").glob("*/*.jpg"))) == 3


def test_retention_by_age_and_after_a_restart(tmp_path: Path) -> None:
    ev = Evidence(tmp_path, StorageConfig(max_age_days=1))
    now = time.time()
    ev.save(frame(), payload(0), now=now - 3 * 86400)  # its folder is three days back
    ev.save(frame(), payload(1), now=now)
    assert pairs(tmp_path) == ["run-000001"]
    assert len(list((tmp_path / "evidence").iterdir())) == 1  # the emptied day folder went too
    # A restart with a tighter count sees what is on disk and applies it.
    for i in range(2, 5):
        ev.save(frame(), payload(i), now=now + i)
    again = Evidence(tmp_path, StorageConfig(max_files=2))
    assert len(again) == 2 and len(pairs(tmp_path)) == 2


def test_a_failing_disk_is_counted_not_raised(tmp_path: Path) -> None:
    ev = Evidence(tmp_path, StorageConfig())
    # A file where the evidence folder should be: fails for root too, unlike permissions.
    (tmp_path / "evidence").rmdir()
    (tmp_path / "evidence").write_text("in the way")
    assert ev.save(frame(), payload(0)) is None and ev.errors == 1 and ev.saved == 0
