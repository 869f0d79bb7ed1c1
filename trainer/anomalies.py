"""Synthetic anomaly classes, drawn afresh for every batch from a seeded generator.

Class 0 is the normal picture itself. Class 1, *line*: a thin straight stroke (a scratch, a hair,
a crack) drawn on the object. Class 2, *distortion*: a patch of the object turned and shifted and
pasted back, so the part's own texture is locally out of place (a dent, a bent thread).

All sizes are given for a 224 px picture and scale with the actual input size, so a config means
the same thing at 96 px and at 448 px. Everything is OpenCV on uint8 RGB pictures.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

logger = logging.getLogger(__name__)

CLASS_NAMES = ("normal", "line", "distortion")
REFERENCE_SIZE = 224.0


@dataclass(frozen=True)
class LineConfig:
    width_px: tuple[float, float] = (1.0, 10.0)  # stroke width at 224 px
    length_frac: tuple[float, float] = (0.1, 0.5)  # stroke length as a share of the picture side
    anywhere_share: float = 0.1  # this share of lines is placed anywhere, not clipped to the object
    color_share: float = 0.2  # this share gets a random colour; the rest a grey level
    min_contrast: float = 40.0  # the stroke's level differs from the object's mean by at least this

    def __post_init__(self) -> None:
        if not 0 < self.width_px[0] <= self.width_px[1]:
            raise ValueError(f"line width_px {self.width_px} must be 0 < low <= high")
        if not 0 < self.length_frac[0] <= self.length_frac[1] <= 1.5:
            raise ValueError(f"line length_frac {self.length_frac} must be 0 < low <= high <= 1.5")
        for name in ("anywhere_share", "color_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"line {name} must be in [0, 1]")


@dataclass(frozen=True)
class DistortionConfig:
    patch_frac: tuple[float, float] = (0.1, 0.25)  # patch side as a share of the picture side
    # Below ~16 px at 224 the turned patch is a few pixels of blur the backbone cannot tell from
    # noise (its stride-32 features average it away): the class then cannot be learned.
    patch_floor_px: float = 16.0
    max_angle_deg: float = 30.0  # rotation drawn from +-[min_angle, max_angle]
    min_angle_deg: float = 5.0  # a patch turned by less than this is hardly a change
    max_shift_frac: float = 0.2  # shift up to this share of the patch side

    def __post_init__(self) -> None:
        if not 0 < self.patch_frac[0] <= self.patch_frac[1] <= 0.9:
            raise ValueError(f"distortion patch_frac {self.patch_frac} must be 0 < low <= high <= 0.9")
        if self.patch_floor_px < 4:
            raise ValueError("distortion patch_floor_px must be at least 4")
        if not 0 <= self.min_angle_deg <= self.max_angle_deg <= 180:
            raise ValueError("distortion angles must satisfy 0 <= min_angle_deg <= max_angle_deg <= 180")


@dataclass(frozen=True)
class AnomalyConfig:
    classes: int = 2  # 2: normal, line; 3: normal, line, distortion
    line: LineConfig = field(default_factory=LineConfig)
    distortion: DistortionConfig = field(default_factory=DistortionConfig)

    def __post_init__(self) -> None:
        if self.classes not in (2, 3):
            raise ValueError(f"classes must be 2 (normal, line) or 3 (normal, line, distortion), not {self.classes}")

    @property
    def class_names(self) -> list[str]:
        return list(CLASS_NAMES[: self.classes])

    def to_manifest(self) -> dict[str, Any]:
        return asdict(self)


def _pick_point(mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        h, w = mask.shape
        return int(rng.integers(w)), int(rng.integers(h))
    i = int(rng.integers(ys.size))
    return int(xs[i]), int(ys[i])


def _stroke_color(picture: np.ndarray, region: np.ndarray, cfg: LineConfig, rng: np.random.Generator) -> tuple:
    """A grey level (or colour) far enough from the region's mean that the stroke is visible."""
    base = picture[region > 0].mean(axis=0) if np.any(region) else picture.reshape(-1, 3).mean(axis=0)
    if rng.random() < cfg.color_share:
        for _ in range(20):
            color = rng.integers(0, 256, 3)
            if np.abs(color - base).max() >= cfg.min_contrast:
                return tuple(int(c) for c in color)
    level_base = float(base.mean())
    candidates = [v for v in range(256) if abs(v - level_base) >= cfg.min_contrast]
    level = int(rng.choice(candidates)) if candidates else (0 if level_base > 127 else 255)
    return (level, level, level)


def add_line(picture: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: LineConfig) -> np.ndarray:
    """One straight stroke; on the object (clipped to its mask) unless drawn as an 'anywhere' line."""
    h, w = picture.shape[:2]
    side = float(min(h, w))
    scale = side / REFERENCE_SIZE
    anywhere = rng.random() < cfg.anywhere_share
    region = np.full((h, w), 255, np.uint8) if anywhere else mask
    cx, cy = _pick_point(region, rng)
    length = rng.uniform(*cfg.length_frac) * side
    angle = rng.uniform(0, np.pi)
    dx, dy = 0.5 * length * np.cos(angle), 0.5 * length * np.sin(angle)
    p1 = (round(cx - dx), round(cy - dy))
    p2 = (round(cx + dx), round(cy + dy))
    width = max(1, round(rng.uniform(*cfg.width_px) * scale))
    stroke = np.zeros((h, w), np.uint8)
    cv2.line(stroke, p1, p2, 255, width, lineType=cv2.LINE_AA)
    if not anywhere:
        stroke = cv2.bitwise_and(stroke, region)
    if not np.any(stroke):  # a mask too thin for this stroke: fall back to a 1 px dot on the object
        stroke[cy, cx] = 255
    color = np.array(_stroke_color(picture, region, cfg, rng), np.float32)
    alpha = (stroke.astype(np.float32) / 255.0)[..., None]
    out = picture.astype(np.float32) * (1 - alpha) + color * alpha
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def patch_side(picture_side: int, frac: float, cfg: DistortionConfig) -> int:
    """Patch side in pixels: the drawn share of the picture, never below the (scaled) floor."""
    floor = cfg.patch_floor_px * picture_side / REFERENCE_SIZE
    return round(max(frac * picture_side, floor, 4.0))


def add_distortion(
    picture: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: DistortionConfig
) -> np.ndarray:
    """Turn and shift a square patch centred on the object, paste it back in place."""
    h, w = picture.shape[:2]
    side = patch_side(min(h, w), rng.uniform(*cfg.patch_frac), cfg)
    cx, cy = _pick_point(mask, rng)
    half = side // 2
    x0 = int(np.clip(cx - half, 0, w - side))
    y0 = int(np.clip(cy - half, 0, h - side))
    angle = rng.uniform(cfg.min_angle_deg, cfg.max_angle_deg) * rng.choice([-1.0, 1.0])
    shift = rng.uniform(-cfg.max_shift_frac, cfg.max_shift_frac, 2) * side
    centre = (x0 + side / 2.0, y0 + side / 2.0)
    matrix = cv2.getRotationMatrix2D(centre, float(angle), 1.0)
    matrix[:, 2] += shift
    # Warp the whole picture so the patch's turned corners are filled with real neighbouring texture.
    warped = cv2.warpAffine(picture, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    out = picture.copy()
    out[y0 : y0 + side, x0 : x0 + side] = warped[y0 : y0 + side, x0 : x0 + side]
    return out


class AnomalyGenerator:
    """Makes class ``label`` of a normal picture; the rng is passed in, so batches are reproducible."""

    def __init__(self, cfg: AnomalyConfig) -> None:
        self.cfg = cfg

    def make(self, picture: np.ndarray, mask: np.ndarray, label: int, rng: np.random.Generator) -> np.ndarray:
        if label == 0:
            return picture
        if label == 1:
            return add_line(picture, mask, rng, self.cfg.line)
        if label == 2 and self.cfg.classes == 3:
            return add_distortion(picture, mask, rng, self.cfg.distortion)
        raise ValueError(f"label {label} is not a class of a {self.cfg.classes}-class config")

    def batch(
        self, pictures: np.ndarray, masks: np.ndarray, labels: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        return np.stack([self.make(p, m, int(lb), rng) for p, m, lb in zip(pictures, masks, labels, strict=True)])
