"""agent.feedback: labelled frames on disk, and the bank extension that stops a false alarm at once.

The store and the extension file are checked on their own (bounded, persisted, undone, plain npz bound to
a model's sha256); the loop with the real demo bundle (GeM scoring) and, where TensorFlow is installed, a
tiny patch-scoring bundle (the extension's patch rows and the anomaly map)."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bundle import load_bundle
from agent.config import FeedbackConfig
from agent.feedback import (
    BankExtension,
    ExtensionFrame,
    FeedbackEntry,
    FeedbackError,
    FeedbackLoop,
    FeedbackStore,
    FrameRef,
    read_entries,
    storable_id,
)
from agent.scoring import Scorer
from tests.builders import plain_part_images

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"


def entry(fid: str, label: str = "good", ts: str = "2026-01-01T00:00:00.000Z") -> FeedbackEntry:
    return FeedbackEntry(frame_id=fid, label=label, note="n", ts=ts, device="cam1",
                         verdict={"id": fid, "verdict": "anomaly", "score": 0.5}, extension=False)


def test_the_store_keeps_png_and_json_persists_and_drops_the_oldest(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, max_frames=2)
    img = plain_part_images(1)[0]
    stored, dropped = store.add(entry("a", ts="2026-01-01T00:00:01.000Z"), img)
    assert dropped == [] and set(stored.files) == {"a.png", "a.json"}
    assert (tmp_path / "feedback" / "a.png").is_file()
    doc = json.loads((tmp_path / "feedback" / "a.json").read_text())
    assert list(doc) == ["frame_id", "label", "note", "ts", "device", "verdict", "extension"]
    import cv2

    back = cv2.imread(str(tmp_path / "feedback" / "a.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(back, img)  # lossless
    store.add(entry("b", "defect", ts="2026-01-01T00:00:02.000Z"), img)
    _, dropped = store.add(entry("c", ts="2026-01-01T00:00:03.000Z"), img)
    assert [d.frame_id for d in dropped] == ["a"] and not (tmp_path / "feedback" / "a.png").exists()
    again = FeedbackStore(tmp_path, max_frames=2)  # a restart reads the folder
    assert [e.frame_id for e in again.entries()] == ["b", "c"] and again.counts() == {"good": 1, "defect": 1}
    listed = read_entries(tmp_path)  # the read API cmd/collect_list uses
    assert [(e.frame_id, e.label, sorted(e.files)) for e in listed] == [
        ("b", "defect", ["b.json", "b.png"]), ("c", "good", ["c.json", "c.png"])]
    assert again.remove("b") is not None and again.remove("b") is None
    # a new label for a kept frame keeps its first picture (from memory: lossless) and replaces the label
    again.add(entry("c", "defect"), np.zeros_like(img))
    assert np.array_equal(cv2.imread(str(tmp_path / "feedback" / "c.png"), cv2.IMREAD_UNCHANGED), img)
    assert again.get("c").label == "defect" and len(again) == 1
    assert [e.frame_id for e in read_entries(tmp_path)] == ["c"]


def test_frame_ids_that_cannot_name_a_file_are_refused() -> None:
    assert storable_id("img_0042-3f9c2a1b7e") is None
    for bad in ("", "../x", "a/b", ".hidden", "x" * 300, "a\nb"):
        assert storable_id(bad) is not None, bad


def ext_frame(fid: str, dim: int = 4, cells: int = 3, pdim: int = 5, seed: int = 0) -> ExtensionFrame:
    rng = np.random.default_rng(seed)
    g = rng.normal(size=dim).astype(np.float32)
    return ExtensionFrame(fid, 1.0, g / np.linalg.norm(g), rng.normal(size=(cells, pdim)).astype(np.float32))


def test_the_extension_is_bounded_persisted_as_plain_npz_and_bound_to_a_model(tmp_path: Path) -> None:
    path = tmp_path / "feedback" / "extension.npz"
    ext = BankExtension(path, max_frames=2)
    assert ext.add(ext_frame("a", seed=1), "sha1") == []
    assert ext.add(ext_frame("b", seed=2, cells=0), "sha1") == []
    dropped = ext.add(ext_frame("c", seed=3), "sha1")
    assert [(f.frame_id, why) for f, why in dropped] == [("a", "feedback.max_extension")]
    ext.save()
    with zipfile.ZipFile(path) as z:  # plain arrays only: no pickled object inside
        assert all(n.endswith(".npy") for n in z.namelist())
    with np.load(path, allow_pickle=False) as z:
        assert str(z["model_sha256"]) == "sha1" and list(z["frame_ids"]) == ["b", "c"]
        assert z["gem"].shape == (2, 4) and z["patch"].shape == (3, 5) and list(z["patch_frame"]) == [1, 1, 1]
    again = BankExtension(path, max_frames=2)
    again.load()
    assert again.model_sha256 == "sha1" and [f.frame_id for f in again.frames] == ["b", "c"]
    np.testing.assert_array_equal(again.frames[1].patch, ext.frames[1].patch)
    banks = again.banks()
    assert banks is not None and banks.gem.shape == (2, 4) and banks.patch.rows.shape == (3, 5)
    assert again.remove("c") is not None and again.banks().patch is None
    # another model's frame replaces every row of the old model
    dropped = again.add(ext_frame("d", seed=4), "sha2")
    assert [(f.frame_id, why) for f, why in dropped] == [("b", "made with another model")]
    assert again.model_sha256 == "sha2"


def test_a_damaged_extension_file_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "extension.npz"
    path.write_bytes(b"not a zip")
    ext = BankExtension(path, 4)
    ext.load()
    assert ext.frames == [] and "cannot be read" in (ext.load_error or "")


# --- the loop with a real bundle ------------------------------------------------------------------------


class Events(list):
    def __call__(self, name: str, **detail: Any) -> None:
        self.append((name, detail))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [d for n, d in self if n == name]


def false_alarm_setup(tmp_path: Path, scorer: Scorer, max_extension: int = 32) -> tuple[
        FeedbackLoop, Events, list[FrameRef]]:
    """The bundle with a threshold under every frame's score: each one is a false alarm. Four pictures that
    look nothing alike, so one's extension row does not cover another."""
    images = distinct_pictures()
    scores = [scorer.score(img)[0].score for img in images]
    b = scorer.bundle
    lowest = float(b.fusion.fuse(0.0, 0.0)) if b.scoring == "fused" else 0.0  # a frame that is in the bank
    scorer.threshold_override = (min(scores) + lowest) / 2
    events = Events()
    loop = FeedbackLoop(tmp_path, FeedbackConfig(max_extension=max_extension), "cam1", events)
    loop.follow(scorer)
    frames = []
    for i, img in enumerate(images):
        result, _ = scorer.score(img)
        assert result.verdict == "anomaly"
        frames.append(FrameRef(f"f{i}", img, {"id": f"f{i}", "verdict": "anomaly", "score": result.score}, "recent"))
    return loop, events, frames


def distinct_pictures(size: int = 96) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    part = plain_part_images(1, seed=5, size=size)[0]
    noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    checker = np.repeat((((yy // 12) + (xx // 12)) % 2 * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    stripes = np.zeros((size, size, 3), np.uint8)
    stripes[::8] = (0, 200, 255)
    return [part, noise, checker, stripes]


@pytest.fixture(scope="module")
def demo_bundle():
    return load_bundle(DEMO, num_threads=1)


def test_a_good_label_on_a_false_alarm_stops_it_and_undo_brings_it_back(tmp_path: Path, demo_bundle) -> None:
    scorer = Scorer(demo_bundle)
    loop, events, frames = false_alarm_setup(tmp_path, scorer)
    data = loop.label(scorer, frames[0], "good", "glare")
    assert data["extension"] is True and data["score"]["after"] < data["score"]["threshold"] < data["score"]["before"]
    assert data["counts"] == {"good": 1, "defect": 0, "extension_frames": 1}
    assert scorer.score(frames[0].image)[0].verdict == "ok"  # the same frame again: below the threshold
    assert scorer.score(frames[1].image)[0].verdict == "anomaly"  # another one still alarms
    assert [n for n, _ in events] == ["feedback_added", "bank_extended"]
    assert events.named("bank_extended")[0]["gem_rows"] == 1
    # Grad-CAM draws against the row the score came from: the view's bank holds the extension row
    result, emb = scorer.score(frames[0].image)
    assert result.nearest == demo_bundle.bank.shape[0] and scorer.view.bank.shape[0] == result.nearest + 1
    from agent.gradcam import inspection_jpeg

    assert inspection_jpeg(scorer.view, emb, result.nearest)[:2] == b"\xff\xd8"  # what cmd/gradcam draws
    assert scorer.bundle is demo_bundle  # the model itself is untouched

    listing = loop.listing(10)
    assert [i["frame_id"] for i in listing["items"]] == ["f0"] and listing["items"][0]["extension"] is True
    assert listing["extension"]["frames"] == 1 and listing["extension"]["applied"] is True

    undone = loop.undo("f0")
    assert undone["extension_removed"] is True and undone["counts"] == {"good": 0, "defect": 0, "extension_frames": 0}
    assert scorer.score(frames[0].image)[0].verdict == "anomaly"
    assert events[-1][0] == "feedback_undone"
    with pytest.raises(FeedbackError, match="no feedback"):
        loop.undo("f0")


def test_defect_labels_and_good_labels_on_ok_frames_do_not_extend(tmp_path: Path, demo_bundle) -> None:
    scorer = Scorer(demo_bundle)
    loop, _, frames = false_alarm_setup(tmp_path, scorer)
    assert loop.label(scorer, frames[0], "defect", "")["extension"] is False
    ok = dataclasses.replace(frames[1], payload={**frames[1].payload, "verdict": "ok"})
    assert "only a good label" in loop.label(scorer, ok, "good", "")["why_no_extension"]
    assert len(loop.extension) == 0 and loop.counts() == {"good": 1, "defect": 1, "extension_frames": 0}
    # relabelling a frame in the extension as a defect takes its rows out
    loop.label(scorer, frames[2], "good", "")
    assert len(loop.extension) == 1
    assert loop.label(scorer, frames[2], "defect", "")["replaced"] == "good" and len(loop.extension) == 0
    off = FeedbackLoop(tmp_path / "off", FeedbackConfig(bank_extension=False), "cam1", Events())
    assert "bank_extension is false" in off.label(scorer, frames[3], "good", "")["why_no_extension"]


def test_the_extension_is_bounded_survives_a_restart_and_ignores_another_model(tmp_path: Path, demo_bundle) -> None:
    scorer = Scorer(demo_bundle)
    loop, events, frames = false_alarm_setup(tmp_path, scorer, max_extension=2)
    for f in frames[:3]:
        loop.label(scorer, f, "good", "")
    assert [f.frame_id for f in loop.extension.frames] == ["f1", "f2"]
    assert events.named("bank_extension_dropped")[0]["frame_id"] == "f0"
    assert (tmp_path / "feedback" / "extension.npz").is_file()

    # a restart: a new scorer for the same model gets the extension from the file
    restarted = Scorer(demo_bundle, threshold=scorer.threshold_override)
    events2 = Events()
    FeedbackLoop(tmp_path, FeedbackConfig(max_extension=2), "cam1", events2).follow(restarted)
    assert [n for n, _ in events2] == ["bank_extension_applied"]
    assert restarted.score(frames[2].image)[0].verdict == "ok"
    assert restarted.score(frames[0].image)[0].verdict == "anomaly"  # dropped by the bound

    # another model (another manifest sha256): not applied, said once
    other = Scorer(dataclasses.replace(demo_bundle, manifest_sha256="0" * 64), threshold=scorer.threshold_override)
    events3 = Events()
    other_loop = FeedbackLoop(tmp_path, FeedbackConfig(max_extension=2), "cam1", events3)
    other_loop.follow(other)
    other_loop.follow(other)
    assert [n for n, _ in events3] == ["bank_extension_not_applied"]
    assert events3[0][1]["extension_model"] == demo_bundle.manifest_sha256
    assert other.extra is None and other.score(frames[2].image)[0].verdict == "anomaly"


# --- a bundle that scores patches -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patch_bundle(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("tensorflow")
    from tests.unit.test_bundle_patch import write_tiny_patch_bundle  # the same tiny bundle as the loader's tests

    # floor 0: every cell of a false alarm is added to the extension
    return load_bundle(write_tiny_patch_bundle(tmp_path_factory.mktemp("patch_bundle") / "b", 0.0, 50))


def test_patch_bundles_extend_the_patch_bank_and_the_anomaly_map(tmp_path: Path, patch_bundle) -> None:
    scorer = Scorer(patch_bundle)
    loop, _, frames = false_alarm_setup(tmp_path, scorer)
    before_map = scorer.score(frames[0].image)[1].patch_map
    data = loop.label(scorer, frames[0], "good", "")
    cells = patch_bundle.patch.grid[0] * patch_bundle.patch.grid[1]
    assert data["extension"] is True and data["patch_rows"] == cells  # floor 0: every cell
    result, emb = scorer.score(frames[0].image)
    assert result.verdict == "ok" and result.components["patch"] == pytest.approx(0.0, abs=1e-2)
    assert float(emb.patch_map.max()) < float(before_map.max())  # the map Grad-CAM's overlay draws
    assert scorer.extra is not None and scorer.extra.patch.rows.shape[0] == cells
    with np.load(tmp_path / "feedback" / "extension.npz", allow_pickle=False) as z:
        assert z["patch"].shape == (cells, patch_bundle.patch_bank.dim)
    loop.undo("f0")
    assert scorer.extra is None and scorer.score(frames[0].image)[0].verdict == "anomaly"


def test_only_the_cells_above_the_floor_are_added(tmp_path: Path, patch_bundle) -> None:
    scorer = Scorer(patch_bundle)
    image = plain_part_images(1, seed=5)[0]
    _, _, distances = scorer.extension_features(image)
    floor = float(np.median(distances))
    floored = Scorer(dataclasses.replace(patch_bundle, map_floor=floor))
    from agent.feedback import extension_features

    _, cells = extension_features(floored, image, "f")
    assert cells.shape[0] == int((distances > floor).sum()) and 0 < cells.shape[0] < distances.size


def test_feedback_command_bodies_are_checked_before_they_run() -> None:
    from agent.commands import CommandError, parse_command_body

    ok = parse_command_body("feedback", b'{"id": "r1", "frame_id": "f", "label": "good", "note": "glare"}', 4096)
    assert ok.request_id == "r1" and ok.body["label"] == "good"
    for body, words in [(b'{"label": "good"}', "'frame_id'"), (b'{"frame_id": "f", "label": "meh"}', "'label'"),
                        (b'{"frame_id": "f", "label": "good", "note": 5}', "'note'"),
                        (b'{"frame_id": 3, "label": "defect"}', "'frame_id'")]:
        with pytest.raises(CommandError, match=words):
            parse_command_body("feedback", body, 4096)
    assert parse_command_body("feedback_list", b"", 4096).body == {}
    with pytest.raises(CommandError, match="'limit'"):
        parse_command_body("feedback_list", b'{"limit": -1}', 4096)
    with pytest.raises(CommandError, match="'frame_id'"):
        parse_command_body("feedback_undo", b"{}", 4096)
