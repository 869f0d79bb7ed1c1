import numpy as np
import pytest

from trainer.anomalies import (
    AnomalyConfig,
    AnomalyGenerator,
    DistortionConfig,
    LineConfig,
    add_distortion,
    add_line,
    patch_side,
)


def _part(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A textured disc (the object) on a flat background, and its mask."""
    rng = np.random.default_rng(3)
    pic = np.full((size, size, 3), 40, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size // 2) ** 2 + (xx - size // 2) ** 2 < (size // 3) ** 2
    texture = (120 + 60 * np.sin(xx / 3.0) + rng.integers(0, 20, (size, size))).astype(np.uint8)
    pic[inside] = texture[inside, None]
    return pic, inside.astype(np.uint8) * 255


def test_line_changes_pixels_inside_the_object_only():
    pic, mask = _part()
    cfg = LineConfig(anywhere_share=0.0)
    for seed in range(20):
        out = add_line(pic, mask, np.random.default_rng(seed), cfg)
        changed = np.any(out != pic, axis=2)
        assert changed[mask > 0].sum() > 0, f"seed {seed}: no pixel of the object changed"
        assert changed[mask == 0].sum() == 0, f"seed {seed}: the line left the object"


def test_anywhere_lines_may_leave_the_object():
    pic, mask = _part()
    cfg = LineConfig(anywhere_share=1.0, length_frac=(1.0, 1.0))
    outside = sum(
        np.any(add_line(pic, mask, np.random.default_rng(s), cfg) != pic, axis=2)[mask == 0].sum() for s in range(5)
    )
    assert outside > 0


def test_generation_is_reproducible_for_a_seed_and_varies_across_seeds():
    pic, mask = _part()
    gen = AnomalyGenerator(AnomalyConfig(classes=3))
    pics, masks = np.stack([pic] * 4), np.stack([mask] * 4)
    labels = np.array([0, 1, 2, 1])
    a = gen.batch(pics, masks, labels, np.random.default_rng(7))
    b = gen.batch(pics, masks, labels, np.random.default_rng(7))
    c = gen.batch(pics, masks, labels, np.random.default_rng(8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.array_equal(a[0], pic)  # class 0 is the normal picture itself


def test_distortion_changes_a_patch_no_smaller_than_the_floor():
    pic, mask = _part(224)
    cfg = DistortionConfig(patch_frac=(0.01, 0.02), patch_floor_px=24)  # asks for 2-4 px patches
    for seed in range(10):
        out = add_distortion(pic, mask, np.random.default_rng(seed), cfg)
        ys, xs = np.nonzero(np.any(out != pic, axis=2))
        assert ys.size > 0, f"seed {seed}: distortion changed nothing"
        assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 >= 0.7 * 24
        assert ys.max() - ys.min() < 24 and xs.max() - xs.min() < 24  # stays within the one patch


def test_patch_floor_scales_with_picture_size():
    cfg = DistortionConfig(patch_floor_px=16)
    assert patch_side(224, 0.001, cfg) == 16
    assert patch_side(448, 0.001, cfg) == 32
    assert patch_side(224, 0.25, cfg) == 56


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="classes"):
        AnomalyConfig(classes=4)
    with pytest.raises(ValueError, match="width_px"):
        LineConfig(width_px=(5.0, 1.0))
    with pytest.raises(ValueError, match="label 2"):
        AnomalyGenerator(AnomalyConfig(classes=2)).make(*_part(), 2, np.random.default_rng(0))
