"""agent.collect: what cmd/collect_list lists and cmd/fetch reads, from real files in the two stores."""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.collect import (
    LIST_LIMIT_MAX,
    MAX_FETCH_BYTES,
    CollectError,
    Collector,
    check_fetch_body,
    check_list_body,
    file_name_problem,
    parse_time,
)
from agent.commands import TABLE, CommandError, parse_command_body


@dataclass
class Entry:
    """The fields of agent.feedback.FeedbackEntry that the listing reads."""

    frame_id: str
    label: str
    ts: str
    note: str = ""
    files: dict[str, Path] = field(default_factory=dict)


def labelled(folder: Path, fid: str, label: str, ts: str, picture: bytes = b"png-bytes", note: str = "") -> Entry:
    folder.mkdir(parents=True, exist_ok=True)
    png, meta = folder / f"{fid}.png", folder / f"{fid}.json"
    png.write_bytes(picture)
    meta.write_text(f'{{"frame_id": "{fid}", "label": "{label}"}}')
    return Entry(fid, label, ts, note, {png.name: png, meta.name: meta})


def evidence(root: Path, day: str, hhmmss: str, fid: str, picture: bytes, t: float) -> tuple[float, Path]:
    folder = root / "evidence" / day
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / f"{hhmmss}_{fid}"
    (folder / f"{base.name}.jpg").write_bytes(picture)
    (folder / f"{base.name}.json").write_text(f'{{"id": "{fid}"}}')
    return t, base


@pytest.fixture()
def box(tmp_path: Path):
    fb = tmp_path / "feedback"
    entries = [labelled(fb, "cam-000001", "good", "2026-01-01T10:00:00.000Z", note="glare"),
               labelled(fb, "cam-000002", "defect", "2026-01-01T11:00:00.000Z")]
    t0 = parse_time("2026-01-01T09:00:00Z")
    ev = [evidence(tmp_path, "2026-01-01", "090000", "cam-000001", b"j1", t0),  # also labelled: listed once
          evidence(tmp_path, "2026-01-01", "090500", "cam-000003", b"j3" * 1000, t0 + 300),
          evidence(tmp_path, "2026-01-01", "120000", "part.v2-1a2b", b"j4", t0 + 3 * 3600)]

    return Collector(lambda: entries, lambda: ev), tmp_path


def test_list_gives_each_frame_once_with_label_sizes_and_sha256(box) -> None:
    collector, _ = box
    out = collector.list({})
    assert out["more"] is False
    items = out["items"]
    assert [(i["frame_id"], i["label"]) for i in items] == [
        ("cam-000003", "unlabelled"), ("cam-000001", "good"), ("cam-000002", "defect"), ("part.v2-1a2b", "unlabelled")]
    good = items[1]
    assert good["note"] == "glare" and good["store"] == "feedback" and good["ts"] == "2026-01-01T10:00:00.000Z"
    assert good["files"]["cam-000001.png"] == {"bytes": 9, "sha256": hashlib.sha256(b"png-bytes").hexdigest()}
    assert set(items[0]["files"]) == {"090500_cam-000003.jpg", "090500_cam-000003.json"}  # no .png: not listed
    assert items[0]["files"]["090500_cam-000003.jpg"]["bytes"] == 2000


def test_list_filters_by_label_and_since_and_pages_with_a_cursor(box) -> None:
    collector, _ = box
    assert [i["frame_id"] for i in collector.list({"labels": ["good", "defect"]})["items"]] == [
        "cam-000001", "cam-000002"]
    assert [i["frame_id"] for i in collector.list({"since": "2026-01-01T10:30:00Z"})["items"]] == [
        "cam-000002", "part.v2-1a2b"]
    seen, body = [], {"limit": 1}
    while True:
        page = collector.list(body)
        seen += [i["frame_id"] for i in page["items"]]
        if not page["more"]:
            break
        body = {"limit": 1, "after": page["next"]}
    assert seen == ["cam-000003", "cam-000001", "cam-000002", "part.v2-1a2b"]


def test_list_stops_after_its_time_budget_and_says_more(box) -> None:
    collector, _ = box
    ticks = iter(range(100))
    collector.clock = lambda: float(next(ticks))  # every look at the clock: one second later
    page = collector.list({})
    assert len(page["items"]) == 1 and page["more"] is True
    rest = collector.list({"after": page["next"]})
    assert rest["items"][0]["frame_id"] == "cam-000001"


def test_fetch_reads_chunks_and_names_the_whole_file(box) -> None:
    collector, _ = box
    name = "090500_cam-000003.jpg"
    first = collector.fetch({"frame_id": "cam-000003", "file": name, "offset": 0, "length": 1500})
    rest = collector.fetch({"frame_id": "cam-000003", "file": name, "offset": 1500, "length": 1500})
    data = base64.b64decode(first["data"]) + base64.b64decode(rest["data"])
    assert data == b"j3" * 1000
    assert first["bytes_total"] == 2000 and first["eof"] is False and rest["eof"] is True
    assert first["sha256"] == rest["sha256"] == hashlib.sha256(data).hexdigest()
    whole = collector.fetch({"frame_id": "cam-000003", "file": name, "length": 10 * MAX_FETCH_BYTES})
    assert base64.b64decode(whole["data"]) == data


def test_fetch_length_is_capped(tmp_path: Path) -> None:
    big = bytes(range(256)) * (MAX_FETCH_BYTES // 128)
    entry = labelled(tmp_path / "feedback", "f1", "good", "2026-01-01T10:00:00Z", picture=big)
    collector = Collector(lambda: [entry], list)
    out = collector.fetch({"frame_id": "f1", "file": "f1.png", "length": len(big)})
    assert len(base64.b64decode(out["data"])) == MAX_FETCH_BYTES and out["bytes_total"] == len(big)


def test_fetch_only_reads_the_frames_own_files(box) -> None:
    collector, root = box
    (root / "secret.txt").write_text("no")
    with pytest.raises(CollectError, match=r"has no file 'secret.txt'; its files: cam-000001\.json, cam-000001\.png"):
        collector.fetch({"frame_id": "cam-000001", "file": "secret.txt"})
    with pytest.raises(CollectError, match="not on this box"):
        collector.fetch({"frame_id": "nope", "file": "nope.png"})
    with pytest.raises(CollectError, match="past the end"):
        collector.fetch({"frame_id": "cam-000001", "file": "cam-000001.png", "offset": 10})
    # a file removed (evidence retention) after it was listed
    (root / "evidence" / "2026-01-01" / "120000_part.v2-1a2b.jpg").unlink()
    with pytest.raises(CollectError, match="has no file"):
        collector.fetch({"frame_id": "part.v2-1a2b", "file": "120000_part.v2-1a2b.jpg"})
    assert [i["frame_id"] for i in collector.list({})["items"]][-1] == "cam-000002"  # listed no more


@pytest.mark.parametrize("name", ["../secret.txt", "a/b.png", "..", ".", "a\\b", "x\0y", "", None, 3, "x" * 300])
def test_file_names_with_path_parts_are_refused(name) -> None:
    assert file_name_problem(name)
    assert check_fetch_body({"frame_id": "f1", "file": name})


def test_bodies_are_checked_before_they_are_queued() -> None:
    assert "collect_list" in TABLE and "fetch" in TABLE
    assert parse_command_body("collect_list", b'{"since": "2026-01-01T00:00:00Z", "labels": ["good"], "limit": 5}',
                              4096).body["limit"] == 5
    for bad, words in [({"since": "yesterday"}, "ISO 8601"), ({"labels": ["nice"]}, "unknown 'nice'"),
                       ({"labels": []}, "non-empty"), ({"limit": 0}, "whole number"),
                       ({"after": "x"}, "cursor")]:
        assert words in (check_list_body(bad) or ""), bad
    with pytest.raises(CommandError, match="bare file name"):
        parse_command_body("fetch", b'{"frame_id": "f", "file": "../../etc/passwd"}', 4096)
    assert "whole number" in (check_fetch_body({"frame_id": "f", "file": "f.png", "offset": -1}) or "")
    assert check_fetch_body({"frame_id": "f", "file": "f.png", "offset": 0, "length": 10}) is None
    assert LIST_LIMIT_MAX >= 100


def test_hashes_are_cached_until_the_file_changes(box) -> None:
    collector, root = box
    collector.list({})
    path = root / "feedback" / "cam-000001.png"
    assert collector.hashes.cached(path)
    tmp = path.with_name(".tmp")
    tmp.write_bytes(b"changed!!")  # same size, written by rename as the stores do
    os.replace(tmp, path)
    item = next(i for i in collector.list({})["items"] if i["frame_id"] == "cam-000001")
    assert item["files"]["cam-000001.png"]["sha256"] == hashlib.sha256(b"changed!!").hexdigest()


def test_new_evidence_and_new_labels_show_in_the_next_listing(tmp_path: Path) -> None:
    t0 = parse_time("2026-01-01T09:00:00Z")
    ev = [evidence(tmp_path, "2026-01-01", "090000", "a-1", b"a", t0)]
    entries: list[Entry] = []
    collector = Collector(lambda: entries, lambda: list(ev))
    assert [(i["frame_id"], i["label"]) for i in collector.list({})["items"]] == [("a-1", "unlabelled")]
    ev.append(evidence(tmp_path, "2026-01-01", "090100", "a-2", b"b", t0 + 60))  # saved since
    assert [i["frame_id"] for i in collector.list({})["items"]] == ["a-1", "a-2"]
    ev.pop(0)  # retention removed the oldest
    ev.append(evidence(tmp_path, "2026-01-01", "090200", "a-3", b"c", t0 + 120))
    assert [i["frame_id"] for i in collector.list({})["items"]] == ["a-2", "a-3"]
    entries.append(labelled(tmp_path / "feedback", "a-2", "defect", "2026-01-01T09:05:00Z"))  # labelled since
    assert [(i["frame_id"], i["label"]) for i in collector.list({})["items"]] == [
        ("a-3", "unlabelled"), ("a-2", "defect")]
