"""Training and test images on disk: MVTec layout or a plain folder of normal images.

MVTec layout::

    DATA_DIR/train/good/*.png        normal images, the only thing training sees
    DATA_DIR/test/good/*.png         normal test images (evaluation only)
    DATA_DIR/test/<defect type>/*    defective test images (evaluation only)

A plain folder (images directly in DATA_DIR) is read as normal training images with no test set.
Every image goes through :mod:`agent.preprocess`, so the trainer sees frames exactly as the device does.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.preprocess import Preprocessing, list_images, load_image, prepare_rgb, scale_to_float

logger = logging.getLogger(__name__)

GOOD = "good"


class DataError(ValueError):
    """A data folder that cannot be used; the message says what is expected."""


@dataclass(frozen=True)
class DataSet:
    root: Path
    layout: str  # "mvtec" | "plain"
    train: list[Path]
    test: dict[str, list[Path]] = field(default_factory=dict)  # defect type ("good" too) -> files

    @property
    def defect_types(self) -> list[str]:
        return sorted(t for t in self.test if t != GOOD)


def find_dataset(data_dir: str | Path) -> DataSet:
    """Read the folder layout; raise DataError when no normal images are found."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory; give a folder with train/good/ (MVTec layout) or images")
    good = root / "train" / GOOD
    if good.is_dir():
        train = list_images(good)
        test_root = root / "test"
        test = {}
        if test_root.is_dir():
            for sub in sorted(p for p in test_root.iterdir() if p.is_dir()):
                files = list_images(sub)
                if files:
                    test[sub.name] = files
        layout = "mvtec"
    else:
        train, test, layout = list_images(root), {}, "plain"
    if not train:
        where = good if layout == "mvtec" else root
        raise DataError(f"{where}: no images found (PNG, JPEG, BMP, TIFF...); normal training images go here")
    logger.info("%s: %s layout, %d training images, test types %s", root, layout, len(train), sorted(test))
    return DataSet(root=root, layout=layout, train=train, test=test)


def fingerprint(paths: list[Path]) -> str:
    """sha256 over the sorted file names and their bytes: which data a bundle was trained on."""
    digest = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.name):
        digest.update(p.name.encode("utf-8") + b"\0")
        digest.update(p.read_bytes())
    return digest.hexdigest()


def load_prepared(paths: list[Path], spec: Preprocessing) -> np.ndarray:
    """The uint8 RGB pictures the model sees (N, H, W, 3), prepared by the agent's own code."""
    h, w = spec.input_size
    out = np.empty((len(paths), h, w, 3), np.uint8)
    for i, p in enumerate(paths):
        out[i] = prepare_rgb(load_image(p), spec, str(p))
    return out


def to_model_input(rgb: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """uint8 RGB (N, H, W, 3) or (H, W, 3) to the model's float32 input, the agent's scaling."""
    return scale_to_float(rgb, spec)


def split_holdout(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, held_out): a seeded random ``share`` of the normals kept for calibration."""
    if not 0.0 <= share < 1.0:
        raise DataError(f"held-out share {share} must be in [0, 1)")
    order = np.random.default_rng([seed, 7]).permutation(n)
    n_held = round(n * share)
    if share > 0 and n_held < 2:
        n_held = min(2, n - 1)
    if n - n_held < 2:
        raise DataError(f"{n} training images are too few; give at least 4 normal images")
    return np.sort(order[n_held:]), np.sort(order[:n_held])
