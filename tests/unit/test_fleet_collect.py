"""fleet.collect without a broker: the layout, names, --since, resume of a .part, retries of lost chunks.

The box side is the real agent.collect.Collector on real files; only the transport is replaced by a direct
call (tests/integration/test_collect.py runs the same over mosquitto with a real agent)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from agent.collect import CollectError, Collector
from fleet.collect import (
    BoxCollector,
    DeviceSilent,
    Manifest,
    Options,
    eval_readiness,
    parse_labels,
    parse_since,
    picture_of,
    resume_offset,
    safe_part,
    target_path,
)
from tests.unit.test_collect import Entry  # the feedback entry the box's listing reads


def test_target_paths_follow_the_trainers_layout(tmp_path: Path) -> None:
    assert target_path(tmp_path, "cam-1", "f-01", "good", ".PNG") == tmp_path / "train/good/cam-1_f-01.png"
    assert target_path(tmp_path, "cam-1", "f-01", "defect", ".jpg") == tmp_path / "test/defect/cam-1_f-01.jpg"
    assert target_path(tmp_path, "cam-1", "f-01", "unlabelled", ".jpg") == tmp_path / "unlabelled/cam-1_f-01.jpg"
    with pytest.raises(ValueError, match="unknown label"):
        target_path(tmp_path, "cam-1", "f", "maybe", ".png")


def test_names_from_the_box_cannot_leave_the_folder() -> None:
    assert safe_part("line 2/cam#1") == "line_2_cam_1"
    assert safe_part("../../etc") == "_.._etc"
    assert safe_part("..") == "_"
    assert safe_part("part.v2-1a2b") == "part.v2-1a2b"
    bad = {"frame_id": "f", "files": {"../x.png": {"bytes": 1, "sha256": "a"}}}
    assert picture_of(bad) is None
    good = {"files": {"f.json": {"bytes": 1, "sha256": "b"}, "f.png": {"bytes": 2, "sha256": "a"}}}
    assert picture_of(good) == ("f.png", {"bytes": 2, "sha256": "a"})


def test_since_and_labels_arguments() -> None:
    assert parse_since("2026-01-31T12:00:00Z") == "2026-01-31T12:00:00.000Z"
    assert parse_since("2026-01-31T13:00:00+01:00") == "2026-01-31T12:00:00.000Z"
    assert parse_since("2d", now=86400 * 10) == "1970-01-09T00:00:00.000Z"
    assert parse_since("90m", now=5400) == "1970-01-01T00:00:00.000Z"
    with pytest.raises(ValueError, match=r"ISO 8601 time .* or an age"):
        parse_since("last week")
    assert parse_labels("good, defect") == ["good", "defect"]
    with pytest.raises(ValueError, match="--labels"):
        parse_labels("good,bad")


def test_resume_offset(tmp_path: Path) -> None:
    part = tmp_path / "x.png.part"
    assert resume_offset(part, 100) == 0
    part.write_bytes(b"a" * 40)
    assert resume_offset(part, 100) == 40
    assert resume_offset(part, 40) == 40
    part.write_bytes(b"a" * 120)  # longer than the file is now: start again
    assert resume_offset(part, 100) == 0 and not part.exists()


def test_eval_readiness_says_what_is_missing(tmp_path: Path) -> None:
    missing = eval_readiness(tmp_path)
    assert any("train/good" in m for m in missing) and any("test/good" in m for m in missing)
    for sub, n in (("train/good", 4), ("test/good", 1), ("test/defect", 1)):
        (tmp_path / sub).mkdir(parents=True)
        for i in range(n):
            (tmp_path / sub / f"{i}.png").write_bytes(b"x")
    assert eval_readiness(tmp_path) == []


# --- transfers against a real Collector ------------------------------------------------------------


class DirectRequests:
    """fleet.collect.Requests' interface answered by the box's Collector in-process; ``lose`` answers vanish
    (the first ``lose`` fetch answers), ``silent`` means the box answers nothing."""

    def __init__(self, collector: Collector, lose: int = 0, silent: bool = False) -> None:
        self.collector = collector
        self.lose = lose
        self.silent = silent
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.answers: dict[str, dict[str, Any]] = {}
        self.n = 0

    def send(self, device: str, name: str, body: dict[str, Any]) -> str:
        self.n += 1
        rid = f"r{self.n}"
        self.sent.append((name, body))
        if self.silent:
            return rid
        if name == "fetch" and self.lose > 0:
            self.lose -= 1
            return rid
        try:
            data = getattr(self.collector, "list" if name == "collect_list" else "fetch")(body)
            self.answers[rid] = {"ok": True, "request_id": rid, **data}
        except CollectError as exc:
            self.answers[rid] = {"ok": False, "request_id": rid, "error": str(exc)}
        return rid

    def take(self, rids: set[str], timeout: float):
        for rid in sorted(rids):
            if rid in self.answers:
                return rid, self.answers.pop(rid)
        return None

    def forget(self, rids: set[str]) -> None:
        for rid in rids:
            self.answers.pop(rid, None)

    def ask(self, device: str, name: str, body: dict[str, Any], timeout: float, retries: int) -> dict[str, Any]:
        for _ in range(retries + 1):
            got = self.take({self.send(device, name, body)}, timeout)
            if got:
                return got[1]
        raise DeviceSilent(f"{device} did not answer cmd/{name}")

    def fetched_bytes(self) -> int:
        return sum(b.get("length", 0) for n, b in self.sent if n == "fetch")


@pytest.fixture()
def box(tmp_path: Path):
    fb = tmp_path / "box" / "feedback"
    fb.mkdir(parents=True)
    pictures = {"f-good": bytes(range(256)) * 40, "f-defect": b"D" * 5000}
    entries = []
    for fid, label in (("f-good", "good"), ("f-defect", "defect")):
        (fb / f"{fid}.png").write_bytes(pictures[fid])
        (fb / f"{fid}.json").write_text(json.dumps({"frame_id": fid, "label": label, "note": f"{label} note",
                                                    "verdict": {"id": fid, "verdict": "anomaly"}}))
        entries.append(Entry(fid, label, f"2026-01-01T10:00:0{len(entries)}.000Z", f"{label} note",
                             {f"{fid}.png": fb / f"{fid}.png", f"{fid}.json": fb / f"{fid}.json"}))
    ev = tmp_path / "box" / "evidence" / "2026-01-01"
    ev.mkdir(parents=True)
    (ev / "090000_f-ev.jpg").write_bytes(b"J" * 3000)
    (ev / "090000_f-ev.json").write_text(json.dumps({"id": "f-ev", "verdict": "anomaly"}))
    evidence = [(1767258000.0, ev / "090000_f-ev")]

    return Collector(lambda: entries, lambda: evidence), entries, pictures


def collect(collector: Collector, out: Path, **kw: Any) -> tuple[Any, DirectRequests]:
    lose = kw.pop("lose", 0)
    req = DirectRequests(collector, lose=lose)
    opts = Options(out=out, since=None, labels=["good", "defect", "unlabelled"], timeout=0.01, retries=2,
                   window=3, chunk=1000, **kw)
    return BoxCollector(req, "cam-1", opts, Manifest(out)).run(), req  # type: ignore[arg-type]


def test_collect_writes_the_layout_and_a_manifest(box, tmp_path: Path) -> None:
    collector, _, pictures = box
    out = tmp_path / "data"
    tally, _ = collect(collector, out)
    assert tally.answered and tally.listed == 3 and tally.fetched == 3 and tally.failed == 0, tally
    assert (out / "train/good/cam-1_f-good.png").read_bytes() == pictures["f-good"]
    assert (out / "test/defect/cam-1_f-defect.png").read_bytes() == pictures["f-defect"]
    assert (out / "unlabelled/cam-1_f-ev.jpg").read_bytes() == b"J" * 3000
    frames = json.loads((out / "collected.json").read_text())["frames"]
    good = frames["cam-1/f-good"]
    assert good["label"] == "good" and good["note"] == "good note" and good["verdict"]["verdict"] == "anomaly"
    assert good["sha256"] == hashlib.sha256(pictures["f-good"]).hexdigest()
    assert good["source"] == {"store": "feedback", "file": "f-good.png", "record": "f-good.json"}
    assert frames["cam-1/f-ev"]["verdict"] == {"id": "f-ev", "verdict": "anomaly"}
    assert frames["cam-1/f-ev"]["saved_at"] and frames["cam-1/f-good"]["labelled_at"]
    assert not list(out.rglob("*.part"))


def test_a_second_run_transfers_nothing(box, tmp_path: Path) -> None:
    collector, _, _ = box
    out = tmp_path / "data"
    collect(collector, out)
    tally, req = collect(collector, out)
    assert tally.present == 3 and tally.fetched == 0 and tally.bytes == 0
    assert [n for n, _ in req.sent] == ["collect_list"]


def test_a_cut_part_file_is_continued_at_its_length(box, tmp_path: Path) -> None:
    collector, _, pictures = box
    out = tmp_path / "data"
    collect(collector, out)
    dest = out / "train/good/cam-1_f-good.png"
    whole = dest.read_bytes()
    dest.unlink()
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(whole[:4000])  # an interrupted run left the first 4000 bytes
    tally, req = collect(collector, out)
    assert dest.read_bytes() == pictures["f-good"] and not part.exists()
    offsets = [b["offset"] for n, b in req.sent if n == "fetch" and b["file"] == "f-good.png"]
    assert offsets == list(range(4000, len(whole), 1000))
    record = tmp_path / "box" / "feedback" / "f-good.json"
    assert tally.bytes == len(whole) - 4000 + record.stat().st_size  # the rest of the picture, and its record


def test_a_damaged_part_is_fetched_again_whole(box, tmp_path: Path) -> None:
    collector, _, pictures = box
    out = tmp_path / "data"
    dest = out / "test/defect/cam-1_f-defect.png"
    dest.parent.mkdir(parents=True)
    dest.with_name(dest.name + ".part").write_bytes(b"X" * 100)  # not the file's first bytes
    tally, _ = collect(collector, out)
    assert tally.failed == 1 and "sha256 differs" in tally.errors[0]
    assert not dest.with_name(dest.name + ".part").exists()
    tally, _ = collect(collector, out)
    assert tally.failed == 0 and dest.read_bytes() == pictures["f-defect"]


def test_lost_answers_are_asked_again(box, tmp_path: Path) -> None:
    collector, _, _ = box
    out = tmp_path / "data"
    tally, req = collect(collector, out, lose=2)  # the answers to the first picture's first two chunks
    assert tally.failed == 0 and tally.fetched == 3
    assert (out / "unlabelled/cam-1_f-ev.jpg").read_bytes() == b"J" * 3000
    asked = [b["offset"] for n, b in req.sent if n == "fetch" and b["file"] == "090000_f-ev.jpg"]
    assert sorted(asked) == [0, 0, 1000, 1000, 2000]  # the lost chunks were asked for again


def test_a_silent_box_is_reported(box, tmp_path: Path) -> None:
    collector, _, _ = box
    req = DirectRequests(collector, silent=True)
    opts = Options(out=tmp_path / "data", since=None, labels=["good"], timeout=0.01, retries=1)
    tally = BoxCollector(req, "cam-9", opts, Manifest(tmp_path / "data")).run()  # type: ignore[arg-type]
    assert not tally.answered and "did not answer" in tally.errors[0]


def test_a_relabelled_frame_moves_without_a_new_transfer(box, tmp_path: Path) -> None:
    collector, entries, pictures = box
    out = tmp_path / "data"
    collect(collector, out)
    entries[0].label = "defect"  # the operator changed their mind on the box
    tally, req = collect(collector, out)
    assert tally.moved == 1
    assert not (out / "train/good/cam-1_f-good.png").exists()
    assert (out / "test/defect/cam-1_f-good.png").read_bytes() == pictures["f-good"]
    assert not [b for n, b in req.sent if n == "fetch" and b["file"] == "f-good.png"]
    assert json.loads((out / "collected.json").read_text())["frames"]["cam-1/f-good"]["label"] == "defect"


def test_test_good_puts_good_frames_where_yugami_eval_reads(box, tmp_path: Path) -> None:
    collector, _, pictures = box
    out = tmp_path / "data"
    collect(collector, out, test_good=True)
    assert (out / "test/good/cam-1_f-good.png").read_bytes() == pictures["f-good"]
    assert (out / "train/good/cam-1_f-good.png").is_file()
    assert json.loads((out / "collected.json").read_text())["frames"]["cam-1/f-good"]["test_copy"] == \
        "test/good/cam-1_f-good.png"


def test_summary_table() -> None:
    from fleet.collect import Tally, table

    text = table([Tally("line1-cam", True, 4, 4, 0, 0, 0, 250000, {"good": 1, "defect": 1, "unlabelled": 2}),
                  Tally("line2-cam")])
    head, first, second = text.splitlines()
    assert head.split() == ["device", "answered", "listed", "fetched", "present", "moved", "failed", "bytes", "labels"]
    assert first.split() == ["line1-cam", "yes", "4", "4", "0", "0", "0", "250000", "defect=1", "good=1",
                             "unlabelled=2"]
    assert second.split()[:2] == ["line2-cam", "NO"]
