from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.preprocess import ImageError, Preprocessing, load_image, prepare_rgb, preprocess


def test_grey_frame_becomes_rgb_in_model_range() -> None:
    frame = np.full((100, 80), 255, np.uint8)
    x = preprocess(frame, Preprocessing(input_size=(64, 48)))
    assert x.shape == (64, 48, 3) and x.dtype == np.float32
    assert np.allclose(x, 1.0)


def test_bgr_is_turned_into_rgb() -> None:
    frame = np.zeros((40, 40, 3), np.uint8)
    frame[:, :, 0] = 255  # blue in OpenCV's BGR
    rgb = prepare_rgb(frame, Preprocessing(input_size=(32, 32)))
    assert rgb[0, 0].tolist() == [0, 0, 255]


def test_roi_crops_before_resizing() -> None:
    frame = np.zeros((100, 100), np.uint8)
    frame[10:30, 20:60] = 200
    rgb = prepare_rgb(frame, Preprocessing(input_size=(32, 32), roi=(20, 10, 40, 20)))
    assert rgb.min() == 200


def test_roi_outside_the_frame_is_a_clear_error() -> None:
    with pytest.raises(ImageError, match="ROI"):
        prepare_rgb(np.zeros((50, 50), np.uint8), Preprocessing(input_size=(32, 32), roi=(40, 40, 20, 20)))


def test_sixteen_bit_frames_are_scaled_to_eight() -> None:
    frame = np.full((40, 40), 65535, np.uint16)
    assert prepare_rgb(frame, Preprocessing(input_size=(32, 32))).max() == 255


def test_corrupt_and_missing_files_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    ok = tmp_path / "ok.png"
    cv2.imwrite(str(ok), np.zeros((20, 20), np.uint8))
    bad.write_bytes(ok.read_bytes()[:30])
    with pytest.raises(ImageError, match=r"broken\.png.*not a readable image"):
        load_image(bad)
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "absent.png")
    assert load_image(ok).shape == (20, 20)


def test_manifest_round_trip() -> None:
    spec = Preprocessing(input_size=(320, 288), resize="linear", roi=(1, 2, 300, 280))
    assert Preprocessing.from_manifest(spec.to_manifest()) == spec


def test_invalid_recipes_are_refused() -> None:
    with pytest.raises(ValueError, match="resize"):
        Preprocessing(resize="lanczos9")
    with pytest.raises(ValueError, match="too small"):
        Preprocessing(input_size=(16, 16))


def test_resizing_before_the_colour_conversion_changes_no_pixel() -> None:
    rng = np.random.default_rng(0)
    spec = Preprocessing(input_size=(64, 48))
    for frame in (rng.integers(0, 256, (123, 97, 3), dtype=np.uint8), rng.integers(0, 256, (123, 97), dtype=np.uint8)):
        convert_first = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB if frame.ndim == 3 else cv2.COLOR_GRAY2RGB)
        expected = cv2.resize(convert_first, (48, 64), interpolation=cv2.INTER_AREA)
        assert np.array_equal(prepare_rgb(frame, spec), expected)
