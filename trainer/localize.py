"""Where the object is in each training image, from normal images alone.

The mean of the training pictures is the "typical scene"; what differs from it in one picture is
mostly the object (it moves, turns, or stands out from a fixed background). Per picture: absolute
difference to the mean (grey), blur, Otsu threshold, morphological open and close, keep the large
connected regions. When that finds nearly nothing (a static scene, a texture filling the frame)
the whole picture is the object, so synthetic defects can still be placed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalizeConfig:
    blur: int = 5  # Gaussian blur kernel (odd) before Otsu: thresholds regions, not sensor noise
    open_size: int = 3  # opening removes specks smaller than this
    close_size: int = 7  # closing fills holes and joins parts of one object
    min_component_share: float = 0.1  # keep regions at least this share of the largest one
    min_area_share: float = 0.01  # below this share of the picture, fall back to the whole picture


def mean_image(pictures: np.ndarray) -> np.ndarray:
    """Mean picture (H, W, 3) float32 of a uint8 stack (N, H, W, 3)."""
    if pictures.ndim != 4 or pictures.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, H, W, 3) stack, got shape {pictures.shape}")
    return pictures.astype(np.float32).mean(axis=0)


def difference(picture: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Absolute difference to the mean as a uint8 grey picture (max over channels)."""
    diff = np.abs(picture.astype(np.float32) - mean).max(axis=2)
    return np.clip(diff, 0, 255).astype(np.uint8)


def _kernel(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (max(1, size), max(1, size)))


def _keep_large_components(mask: np.ndarray, share: float) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = 1 + np.flatnonzero(areas >= share * areas.max())
    return np.isin(labels, keep).astype(np.uint8) * 255


def object_mask(picture: np.ndarray, mean: np.ndarray, cfg: LocalizeConfig | None = None) -> np.ndarray:
    """uint8 mask (255 = object) of one picture against the mean picture."""
    cfg = cfg or LocalizeConfig()
    diff = difference(picture, mean)
    k = cfg.blur | 1
    blurred = cv2.GaussianBlur(diff, (k, k), 0) if k > 1 else diff
    if int(blurred.max()) - int(blurred.min()) < 2:
        return np.full(diff.shape, 255, np.uint8)  # no contrast at all: nothing to separate
    _, mask = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _kernel(cfg.open_size))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _kernel(cfg.close_size))
    mask = _keep_large_components(mask, cfg.min_component_share)
    if np.count_nonzero(mask) < cfg.min_area_share * mask.size:
        return np.full(diff.shape, 255, np.uint8)
    return mask


def object_masks(pictures: np.ndarray, cfg: LocalizeConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean picture, masks (N, H, W) uint8) for a stack of training pictures."""
    mean = mean_image(pictures)
    masks = np.stack([object_mask(p, mean, cfg) for p in pictures])
    logger.info("object masks: mean coverage %.1f%%", 100.0 * np.mean(masks > 0))
    return mean, masks


def debug_picture(pictures: np.ndarray, mean: np.ndarray, masks: np.ndarray, count: int = 4) -> np.ndarray:
    """Rows of [picture | mean | difference | mask overlay] for the first ``count`` pictures (RGB uint8)."""
    rows = []
    mean8 = np.clip(mean, 0, 255).astype(np.uint8)
    for pic, mask in zip(pictures[:count], masks[:count], strict=True):
        diff = cv2.cvtColor(difference(pic, mean), cv2.COLOR_GRAY2RGB)
        overlay = pic.copy()
        overlay[mask > 0] = (0.5 * overlay[mask > 0] + 0.5 * np.array([255, 0, 0])).astype(np.uint8)
        rows.append(np.concatenate([pic, mean8, diff, overlay], axis=1))
    return np.concatenate(rows, axis=0)


def write_debug_picture(path: Path, pictures: np.ndarray, mean: np.ndarray, masks: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(debug_picture(pictures, mean, masks), cv2.COLOR_RGB2BGR))
    return path
