"""The synthetic-part generator: seeded, defects land on the part, data sets and videos read back."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.preprocess import list_images, load_image
from demo.synthetic import (
    DEFECT_KINDS,
    defective_part,
    main,
    mjpg_roundtrip,
    normal_part,
    read_video,
    render_part,
    sidecar_path,
    video_schedule,
    write_dataset,
    write_video,
)

SIZE = 128


def test_same_seed_same_picture_other_seed_other_picture() -> None:
    a = normal_part(np.random.default_rng(5), SIZE)
    b = normal_part(np.random.default_rng(5), SIZE)
    c = normal_part(np.random.default_rng(6), SIZE)
    assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0
    assert np.array_equal(
        defective_part(np.random.default_rng(5), SIZE, "dent"), defective_part(np.random.default_rng(5), SIZE, "dent")
    )


def test_normal_pictures_show_a_part_on_a_darker_belt() -> None:
    r = render_part(np.random.default_rng(1), SIZE)
    part = r.part_mask > 0
    assert 0.08 < part.mean() < 0.5  # the part fills a fair share of the frame, not all of it
    grey = cv2.cvtColor(r.image, cv2.COLOR_BGR2GRAY).astype(float)
    assert grey[part].mean() > grey[~part].mean() + 40
    assert not r.defect_mask.any()


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_changes_pixels_on_the_part_only(kind: str) -> None:
    for seed in range(3):
        normal = render_part(np.random.default_rng(seed), SIZE)
        bad = render_part(np.random.default_rng(seed), SIZE, kind)
        diff = np.abs(bad.image.astype(int) - normal.image.astype(int)).max(axis=2)
        changed = diff > 25
        assert changed.sum() >= 12, f"{kind} seed {seed}: the defect barely changes the picture"
        near_part = cv2.dilate(normal.part_mask, np.ones((7, 7), np.uint8)) > 0
        assert changed[near_part].sum() / changed.sum() > 0.97, f"{kind} seed {seed}: pixels changed off the part"
        assert bad.defect_mask.any()
        # The ground-truth mask covers where the picture changed.
        near_defect = cv2.dilate(bad.defect_mask, np.ones((5, 5), np.uint8)) > 0
        assert changed[near_defect].sum() / changed.sum() > 0.9, f"{kind} seed {seed}: mask misses the defect"


def test_unknown_kind_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="scratch"):
        render_part(np.random.default_rng(0), SIZE, "crack")


def test_dataset_has_mvtec_layout(tmp_path: Path) -> None:
    counts = write_dataset(tmp_path, n_train=3, n_test_good=2, n_test_defect=1, size=96, seed=3)
    assert counts["train/good"] == 3
    assert len(list_images(tmp_path / "train" / "good")) == 3
    assert len(list_images(tmp_path / "test" / "good")) == 2
    for kind in DEFECT_KINDS:
        [img] = list_images(tmp_path / "test" / kind)
        assert load_image(img).shape == (96, 96, 3)
        [mask] = list_images(tmp_path / "ground_truth" / kind)
        assert mask.name == f"{img.stem}_mask.png"
        assert load_image(mask).max() == 255
    # Seeded: writing again gives identical files.
    write_dataset(tmp_path / "again", n_train=3, n_test_good=0, n_test_defect=0, size=96, seed=3)
    assert (tmp_path / "again/train/good/002.png").read_bytes() == (tmp_path / "train/good/002.png").read_bytes()


def test_video_reads_back_with_the_right_frames_and_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "parts.avi"
    side = write_video(path, n_frames=12, anomaly_every=4, size=96, fps=5, seed=1)
    assert side == sidecar_path(path)
    meta = json.loads(side.read_text())
    assert meta["frames"] == 12
    assert meta["defects"] == [None, None, None, "scratch", None, None, None, "dent", None, None, None, "missing"]
    frames = read_video(path)
    assert len(frames) == 12
    assert frames[0].shape == (96, 96, 3)
    # MJPG is lossy, but each frame is still the part that was drawn.
    expected = render_part(np.random.default_rng([1, 100, 3]), 96, "scratch").image
    assert np.abs(frames[3].astype(int) - expected.astype(int)).mean() < 6


def test_mjpg_dataset_pictures_are_the_frames_the_agent_decodes(tmp_path: Path) -> None:
    """Training pictures made with image_format='mjpg' match video frames bit for bit (same encoder, decoder)."""
    write_video(tmp_path / "v.avi", n_frames=3, anomaly_every=0, size=96, seed=2)
    drawn = [render_part(np.random.default_rng([2, 100, i]), 96).image for i in range(3)]
    decoded = read_video(tmp_path / "v.avi")
    assert all(np.array_equal(a, b) for a, b in zip(mjpg_roundtrip(drawn), decoded, strict=True))
    assert not np.array_equal(drawn[0], decoded[0])  # the codec did change the picture
    write_dataset(tmp_path / "ds", n_train=2, n_test_good=0, n_test_defect=0, size=96, image_format="mjpg")
    assert [p.name for p in list_images(tmp_path / "ds/train/good")] == ["000.png", "001.png"]


def test_schedule_without_anomalies() -> None:
    assert video_schedule(4, 0) == [None] * 4


def test_cli_writes_a_video(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "clip.avi"
    assert main(["video", str(out), "--frames", "4", "--anomaly-every", "2", "--size", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["defective_frames"] == [1, 3]
    assert out.stat().st_size > 0
