import numpy as np

from trainer.localize import debug_picture, object_mask, object_masks


def _scene(n: int, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Dark bars on a bright background, at a different place in each picture."""
    rng = np.random.default_rng(seed)
    pics, centres = [], []
    for _ in range(n):
        pic = np.full((64, 64, 3), 200, np.uint8)
        x, y = int(rng.integers(12, 52)), int(rng.integers(12, 52))
        pic[y - 6 : y + 6, x - 6 : x + 6] = 30
        pics.append(pic)
        centres.append((x, y))
    return np.stack(pics), centres


def test_mask_finds_the_object_and_not_the_background():
    pics, centres = _scene(12)
    _, masks = object_masks(pics)
    for mask, (x, y) in zip(masks, centres, strict=True):
        assert mask[y, x] == 255
        assert mask[2, 2] == 0  # a corner no object ever reaches
        assert 0.02 < np.mean(mask > 0) < 0.3


def test_static_scene_falls_back_to_whole_picture():
    pic = np.full((32, 32, 3), 120, np.uint8)
    mask = object_mask(pic, pic.astype(np.float32))
    assert mask.min() == 255


def test_debug_picture_has_four_panels_per_row():
    pics, _ = _scene(5)
    mean, masks = object_masks(pics)
    picture = debug_picture(pics, mean, masks, count=3)
    assert picture.shape == (3 * 64, 4 * 64, 3)
    assert picture.dtype == np.uint8
