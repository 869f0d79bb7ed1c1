"""Grad-CAM without TensorFlow: the closed-form gradient, the overlay and its colour anchoring.

The comparison with TensorFlow's GradientTape is in test_gradcam_tf.py.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.bundle import load_bundle
from agent.gradcam import (
    LEGEND_HEIGHT,
    PANEL_GAP,
    cam_from_weights,
    cam_scale,
    gradcam_weights,
    grid_image,
    overlay_image,
    overlay_jpeg,
    upsample,
)


def _score(fmap: np.ndarray, kernel: np.ndarray | None, bias: np.ndarray | None, target: np.ndarray) -> float:
    """1 - cos(e, target) straight from the definition (forward only)."""
    g = fmap.mean(axis=(0, 1))
    z = g if kernel is None else g @ kernel + bias
    return 1.0 - float(z @ target / np.linalg.norm(z))


@pytest.mark.parametrize("projection", [True, False])
def test_closed_form_weights_match_finite_differences(projection: bool) -> None:
    rng = np.random.default_rng(3)
    h, w, c, d = 4, 5, 6, 3 if projection else 6
    fmap = rng.uniform(0.0, 2.0, (h, w, c))
    kernel = rng.normal(size=(c, d)) if projection else None
    bias = rng.normal(size=d) if projection else None
    target = rng.normal(size=d)
    target /= np.linalg.norm(target)
    head = (kernel, bias) if projection else None
    alpha = gradcam_weights(fmap, -target, head)
    eps = 1e-6
    numeric = np.zeros((h, w, c))
    for idx in np.ndindex(h, w, c):
        up, down = fmap.copy(), fmap.copy()
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (_score(up, kernel, bias, target) - _score(down, kernel, bias, target)) / (2 * eps)
    # Global average pooling spreads the gradient evenly: every cell has the same dS/dA_c = alpha_c.
    assert np.allclose(numeric, alpha[None, None, :], atol=1e-7)
    cam = cam_from_weights(fmap, alpha)
    assert cam.shape == (h, w) and cam.dtype == np.float32 and np.all(cam >= 0)


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path):
    return load_bundle(tiny_bundle)


def test_upsample_keeps_shape_order_and_sign() -> None:
    cam = np.zeros((4, 8), np.float32)
    cam[1, 6] = 1.0
    big = upsample(cam, (40, 80))
    assert big.shape == (40, 80) and big.min() >= 0
    y, x = np.unravel_index(np.argmax(big), big.shape)
    assert 10 <= y < 20 and 60 <= x < 70


def test_overlay_jpeg_decodes_to_the_frame_plus_legend(bundle) -> None:
    rgb = np.full((64, 80, 3), 128, np.uint8)
    cam = np.random.default_rng(0).uniform(0, cam_scale(bundle), (8, 10)).astype(np.float32)
    data = overlay_jpeg(rgb, cam, bundle, quality=90)
    assert data[:2] == b"\xff\xd8"
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape == (64 + LEGEND_HEIGHT, 80, 3)


def test_zero_cam_leaves_the_picture_unchanged(bundle) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = overlay_image(rgb, np.zeros((4, 4), np.float32), bundle, with_legend=False)
    assert np.array_equal(out, rgb)


def test_same_cam_value_gets_the_same_colour_on_every_frame(bundle) -> None:
    """The scale is the bundle's, not the frame's: a much hotter spot elsewhere changes nothing here."""
    rgb = np.full((80, 80, 3), 100, np.uint8)
    scale = cam_scale(bundle)
    mild = np.zeros((8, 8), np.float32)
    mild[1:3, 1:3] = 0.4 * scale
    hot = mild.copy()
    hot[6, 6] = 3.0 * scale  # a per-frame max normalisation would dim the mild spot here
    a = overlay_image(rgb, mild, bundle)
    b = overlay_image(rgb, hot, bundle)
    assert np.array_equal(a[:40, :40], b[:40, :40])
    assert not np.array_equal(a[:40, :40], rgb[:40, :40])  # the mild spot is visible at all
    assert np.array_equal(a[-LEGEND_HEIGHT:], b[-LEGEND_HEIGHT:])  # same legend
    assert not np.array_equal(a[60:, 60:80], b[60:, 60:80])


def test_cam_scale_follows_the_threshold_or_the_manifest(bundle) -> None:
    h, w = bundle.feature_map_output.shape[1:3]
    assert cam_scale(bundle) == pytest.approx(4.0 * bundle.threshold / (h * w))
    bundle.manifest.setdefault("gradcam", {})["cam_scale"] = 0.123
    try:
        assert cam_scale(bundle) == 0.123
    finally:
        del bundle.manifest["gradcam"]["cam_scale"]


def test_grid_image_places_every_tile() -> None:
    tiles = [np.full((30, 50, 3), v, np.uint8) for v in (10, 60, 110, 160, 210)]
    grid = grid_image(tiles, labels=list("abcde"), columns=3, tile_size=40)
    assert grid.shape == (2 * (40 + 14), 3 * 40, 3)
    assert grid[5, 5, 0] == 10 and grid[5 + 54, 5, 0] == 160 and grid[5 + 54, 45, 0] == 210


def test_score_cli_writes_one_overlay_per_image(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    import json

    from agent.cli import score_main
    from tests.builders import plain_part_images, scratched

    images = []
    for i, img in enumerate(plain_part_images(2, seed=3)):
        sub = tmp_path / f"cam{i}"  # same file name in two folders: two overlays, not one overwritten
        sub.mkdir()
        cv2.imwrite(str(sub / "part.png"), scratched(img, seed=i))
        images.append(str(sub / "part.png"))
    out = tmp_path / "heat"
    assert score_main([str(tiny_bundle), *images, "--gradcam", str(out)]) == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    written = [Path(line["gradcam"]) for line in lines]
    assert len(set(written)) == 2 and all(p.parent == out for p in written)
    for p in written:
        img = cv2.imread(str(p))
        # the frame, then Grad-CAM over it (the tiny bundle scores no patches: no third panel)
        assert img is not None and img.shape == (64 + LEGEND_HEIGHT, 2 * 64 + PANEL_GAP, 3)


def test_eval_grid_has_a_tile_per_picked_image(tiny_bundle: Path, tmp_path: Path) -> None:
    from tests.builders import plain_part_images, scratched
    from trainer.plots_gradcam import pick_examples, write_gradcam_grid

    test: dict[str, list[Path]] = {"good": [], "scratch": []}
    for i, img in enumerate(plain_part_images(4, seed=9)):
        for kind, pic in (("good", img), ("scratch", scratched(img, seed=i))):
            path = tmp_path / kind / f"{i}.png"
            path.parent.mkdir(exist_ok=True)
            cv2.imwrite(str(path), pic)
            test[kind].append(path)
    picked = pick_examples(test, per_type=3)
    assert [k for k, _ in picked] == ["good"] * 3 + ["scratch"] * 3
    assert picked[0][1].name == "0.png" and picked[2][1].name == "3.png"  # spread over the list
    out = write_gradcam_grid(
        load_bundle(tiny_bundle), test, tmp_path / "plots" / "gradcam_grid.png", per_type=3, columns=3, tile_size=100
    )
    grid = cv2.imread(str(out))
    assert grid is not None and grid.shape == (2 * (100 + 14), 3 * 100, 3)
