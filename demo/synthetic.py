"""Synthetic machined parts, drawn with OpenCV, standing in for a camera in tests and the demo.

The part is a flat machined link (a hub with a bored boss, two drilled ears, a web with two small
holes) in brushed metal, lying on a conveyor belt. Every picture varies the pose (rotation, shift,
scale), the lighting (gain, gradient, light direction, a broad specular band) and the texture and
sensor noise. Defects are drawn on the part itself:

- ``scratch``: a thin bright groove with a dark rim, a gently curved stroke across the surface;
- ``dent``: the outline pushed inward at an edge, with the shading of a shallow depression;
- ``missing``: a chipped-off piece of the outline, the belt showing through;
- ``stain``: a dark rust or oil blot on the surface.

Everything is seeded: the same generator state gives the same picture. A normal and a defective
picture drawn from equal generator states share pose, lighting, texture and noise, and differ only
in the defect, which makes the defect's effect testable pixel by pixel.

This is a stand-in for a camera, never a substitute for real images in benchmarks.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)

DEFECT_KINDS = ("scratch", "dent", "missing", "stain")
SUPERSAMPLE = 2  # drawn at twice the size, then reduced with INTER_AREA: smooth edges without aliasing


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray  # (size, size, 3) BGR uint8
    part_mask: np.ndarray  # (size, size) uint8, 255 on the part (holes excluded)
    defect_mask: np.ndarray  # (size, size) uint8, 255 where the defect changed the part; all 0 for normal
    kind: str | None  # the defect kind, None for a normal part


@dataclass(frozen=True)
class _Scene:
    """Pose and lighting of one picture, drawn before anything else so that defects do not shift them."""

    angle: float  # degrees, counter-clockwise
    scale: float
    shift: tuple[float, float]  # in units of the canvas size
    light_deg: float  # direction the light comes from, in frame coordinates
    gain: float
    gradient: float
    gradient_deg: float
    band_pos: float
    band_deg: float
    base_grey: float
    belt_grey: float
    noise_sigma: float


# ---------------------------------------------------------------------------------------------
# geometry, in canonical part coordinates on an S x S canvas (S = SUPERSAMPLE * size)


@functools.lru_cache(maxsize=8)
def _geometry(s: int) -> tuple[np.ndarray, np.ndarray]:
    """The part's outline mask (holes cut) and the raised boss ring mask, both uint8 0/255."""
    c = s / 2.0

    def px(v: float) -> int:
        return round(v * s)

    body = np.zeros((s, s), np.uint8)
    ear_dx, ear_r, hub_r = 0.28, 0.11, 0.15
    for dx in (-ear_dx, ear_dx):
        cv2.circle(body, (round(c + dx * s), round(c)), px(ear_r), 255, -1, cv2.LINE_AA)
    cv2.circle(body, (round(c), round(c)), px(hub_r), 255, -1, cv2.LINE_AA)
    cv2.rectangle(body, (px(0.5 - ear_dx), px(0.5 - 0.075)), (px(0.5 + ear_dx), px(0.5 + 0.075)), 255, -1)
    # Fillets where the web meets hub and ears, as a machined part has them.
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (px(0.07) | 1, px(0.07) | 1))
    body = cv2.morphologyEx(body, cv2.MORPH_CLOSE, k)
    body = np.where(cv2.GaussianBlur(body, (0, 0), s * 0.002) > 127, 255, 0).astype(np.uint8)

    holes = np.zeros_like(body)
    for dx in (-ear_dx, ear_dx):
        cv2.circle(holes, (round(c + dx * s), round(c)), px(0.045), 255, -1, cv2.LINE_AA)
    for dx in (-0.165, 0.165):
        cv2.circle(holes, (round(c + dx * s), round(c)), px(0.018), 255, -1, cv2.LINE_AA)
    cv2.circle(holes, (round(c), round(c)), px(0.062), 255, -1, cv2.LINE_AA)
    mask = cv2.subtract(body, holes)

    boss = np.zeros_like(body)
    cv2.circle(boss, (round(c), round(c)), px(0.108), 255, -1, cv2.LINE_AA)
    boss = cv2.subtract(boss, holes)
    return mask, boss


def _scene(rng: np.random.Generator) -> _Scene:
    return _Scene(
        angle=float(rng.uniform(-12.0, 12.0)),
        scale=float(rng.uniform(0.95, 1.05)),
        shift=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04))),
        light_deg=float(rng.uniform(200.0, 250.0)),  # from the upper left, as a ring light rarely is even
        gain=float(rng.uniform(0.85, 1.12)),
        gradient=float(rng.uniform(0.0, 0.12)),
        gradient_deg=float(rng.uniform(0.0, 360.0)),
        band_pos=float(rng.uniform(-0.15, 0.15)),
        band_deg=float(rng.uniform(20.0, 70.0)),
        base_grey=float(rng.uniform(128.0, 150.0)),
        belt_grey=float(rng.uniform(52.0, 68.0)),
        noise_sigma=float(rng.uniform(1.2, 2.4)),
    )


def _pose_matrix(sc: _Scene, s: int) -> np.ndarray:
    m = cv2.getRotationMatrix2D((s / 2.0, s / 2.0), sc.angle, sc.scale)
    m[:, 2] += (sc.shift[0] * s, sc.shift[1] * s)
    return m


def _canonical_light(sc: _Scene) -> np.ndarray:
    """The unit vector towards the light, in the part's own coordinates (the light stays put as the part turns)."""
    a = math.radians(sc.light_deg)
    to_light = np.array([math.cos(a), math.sin(a)])
    r = math.radians(sc.angle)
    # getRotationMatrix2D turns counter-clockwise on screen (y down); undo that turn.
    inv = np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]])
    v = inv @ to_light
    return v / np.linalg.norm(v)


def _edge_shading(mask: np.ndarray, light: np.ndarray, sigma: float) -> np.ndarray:
    """Bevel shading from the outline: edges facing the light bright, the others dark, in [-1, 1]."""
    m = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), sigma)
    gx = cv2.Sobel(m, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(m, cv2.CV_32F, 0, 1, ksize=3)
    shade = -(gx * light[0] + gy * light[1])
    peak = float(np.abs(shade).max())
    return shade / peak if peak > 0 else shade


def _surface(rng: np.random.Generator, sc: _Scene, mask: np.ndarray, boss: np.ndarray) -> np.ndarray:
    """The part's BGR float picture in canonical coordinates (meaningful where mask > 0)."""
    s = mask.shape[0]
    light = _canonical_light(sc)
    # Brushed finish: noise smeared along the part's long axis.
    noise = rng.standard_normal((s, s)).astype(np.float32)
    brushed = cv2.blur(noise, (max(3, s // 12), 1))
    brushed = cv2.GaussianBlur(brushed, (0, 0), 0.6)
    brushed *= 7.0 / (float(brushed.std()) + 1e-6)
    # Turning marks on the boss: fine concentric rings.
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    r = np.hypot(xx - s / 2.0, yy - s / 2.0)
    rings = 5.0 * np.sin(2.0 * np.pi * r / (0.0075 * s) + float(rng.uniform(0, 2 * np.pi)))
    boss_f = boss.astype(np.float32) / 255.0
    # A broad specular band across the part.
    b = math.radians(sc.band_deg)
    along = ((xx / s - 0.5) * math.cos(b) + (yy / s - 0.5) * math.sin(b)) - sc.band_pos
    band = 24.0 * np.exp(-(along**2) / (2 * 0.12**2))

    grey = sc.base_grey + band + brushed * (1.0 - boss_f) + rings * boss_f + 8.0 * boss_f
    grey += 70.0 * _edge_shading(mask, light, s * 0.006)
    grey += 45.0 * _edge_shading(boss, light, s * 0.004) * (mask > 0)
    tint = np.array([1.03, 1.0, 0.95], np.float32)  # slightly cool steel
    return grey[:, :, None] * tint[None, None, :]


def _belt(rng: np.random.Generator, sc: _Scene, s: int) -> np.ndarray:
    """Conveyor belt: dark rubber with fine grain and faint lengthwise ribs."""
    grain = cv2.GaussianBlur(rng.standard_normal((s, s)).astype(np.float32), (0, 0), 1.2)
    grain *= 6.0 / (float(grain.std()) + 1e-6)
    rib_phase = float(rng.uniform(0, 2 * np.pi))
    rows = np.arange(s, dtype=np.float32)[:, None]
    ribs = 2.5 * np.sin(2 * np.pi * rows / (0.05 * s) + rib_phase)
    grey = sc.belt_grey + grain + ribs
    tint = np.array([1.06, 1.02, 0.96], np.float32)
    return np.broadcast_to(grey[:, :, None], (s, s, 3)) * tint[None, None, :]


# ---------------------------------------------------------------------------------------------
# defects, drawn in canonical part coordinates


def _random_inside(rng: np.random.Generator, mask: np.ndarray, margin: int) -> tuple[int, int]:
    """A random (x, y) on the part at least ``margin`` pixels away from any edge or hole."""
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    inner = cv2.erode(mask, k)
    ys, xs = np.nonzero(inner > 127)
    if xs.size == 0:
        ys, xs = np.nonzero(mask > 127)
    i = int(rng.integers(xs.size))
    return int(xs[i]), int(ys[i])


def _outline_point(
    rng: np.random.Generator, mask: np.ndarray, include_holes: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """A random point on the outline (optionally also a hole's rim) and the unit normal pointing off the part."""
    mode = cv2.RETR_LIST if include_holes else cv2.RETR_EXTERNAL
    contours, _ = cv2.findContours((mask > 127).astype(np.uint8), mode, cv2.CHAIN_APPROX_NONE)
    points = np.concatenate([c.reshape(-1, 2) for c in contours if len(c) > 20])
    p = points[int(rng.integers(len(points)))].astype(np.float32)
    m = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), mask.shape[0] * 0.01)
    x, y = int(p[0]), int(p[1])
    g = np.array([cv2.Sobel(m, cv2.CV_32F, 1, 0)[y, x], cv2.Sobel(m, cv2.CV_32F, 0, 1)[y, x]])
    n = -g / (np.linalg.norm(g) + 1e-9)
    return p, n


def _missing_chunk(rng: np.random.Generator, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chip a jagged piece off the outline; returns the new mask and the defect mask."""
    s = mask.shape[0]
    p, n = _outline_point(rng, mask)
    radius = s * float(rng.uniform(0.045, 0.07))
    centre = p - n * radius * 0.35  # bite into the part, not beside it
    k = int(rng.integers(7, 11))
    angles = np.sort(rng.uniform(0, 2 * np.pi, k))
    radii = radius * rng.uniform(0.55, 1.15, k)
    poly = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], axis=1)
    chunk = np.zeros_like(mask)
    cv2.fillPoly(chunk, [np.round(poly).astype(np.int32)], 255, cv2.LINE_AA)
    new_mask = cv2.subtract(mask, chunk)
    return new_mask, cv2.bitwise_and(mask, chunk)


def _dent(
    rng: np.random.Generator, part: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Press an edge or a hole's rim in: the picture and outline are warped locally.

    Returns the warped part picture, the new mask, the depression's height field and the defect mask.
    """
    s = mask.shape[0]
    p, n = _outline_point(rng, mask, include_holes=True)
    sigma = s * float(rng.uniform(0.035, 0.05))
    depth = s * float(rng.uniform(0.04, 0.06))
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    g = np.exp(-((xx - p[0]) ** 2 + (yy - p[1]) ** 2) / (2 * sigma**2))
    # Sampling from further out along the normal pulls the outline inward, bevel and all.
    map_x = xx + depth * g * n[0]
    map_y = yy + depth * g * n[1]
    new_mask = cv2.remap(mask, map_x, map_y, cv2.INTER_LINEAR, borderValue=0)
    new_part = cv2.remap(part, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    changed = cv2.absdiff(mask, new_mask) > 40
    region = (g > 0.3) & (new_mask > 127)
    defect = np.where(changed | region, 255, 0).astype(np.uint8)
    return new_part, new_mask, g, defect


def _dent_shading(height: np.ndarray, light: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Shading of a shallow depression: the wall facing the light bright, the far wall dark."""
    gx = cv2.Sobel(height, cv2.CV_32F, 1, 0, ksize=5)
    gy = cv2.Sobel(height, cv2.CV_32F, 0, 1, ksize=5)
    shade = gx * light[0] + gy * light[1]  # a depression's walls tilt opposite to a bump's
    peak = float(np.abs(shade).max()) or 1.0
    return (60.0 * shade / peak - 25.0 * height) * (mask > 127)


def _scratch(rng: np.random.Generator, mask: np.ndarray, light: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A curved groove, mostly along the part: returns the additive grey layer and the defect mask."""
    s = mask.shape[0]
    x0, y0 = _random_inside(rng, mask, int(s * 0.03))
    length = s * float(rng.uniform(0.14, 0.24))
    # Along the long axis (either way), so the groove stays on the part instead of leaving it at once.
    a = float(rng.uniform(-0.6, 0.6)) + (np.pi if rng.uniform() < 0.5 else 0.0)
    p0 = np.array([x0, y0], np.float32)
    p2 = p0 + length * np.array([math.cos(a), math.sin(a)], np.float32)
    bend = length * float(rng.uniform(-0.2, 0.2))
    p1 = (p0 + p2) / 2 + bend * np.array([-math.sin(a), math.cos(a)], np.float32)
    t = np.linspace(0, 1, 40, dtype=np.float32)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    width = max(3, round(s * float(rng.uniform(0.008, 0.012))))
    groove = np.zeros((s, s), np.float32)
    lip = np.zeros((s, s), np.float32)
    cv2.polylines(groove, [np.round(curve * 16).astype(np.int32)], False, 1.0, width, cv2.LINE_AA, shift=4)
    # The lip on the lit side of the groove catches the light.
    lit = curve + light[None, :].astype(np.float32) * width
    cv2.polylines(lip, [np.round(lit * 16).astype(np.int32)], False, 1.0, max(1, width // 2), cv2.LINE_AA, shift=4)
    groove = cv2.GaussianBlur(groove, (0, 0), 0.7)
    on_part = (mask > 127).astype(np.float32)
    layer = (-80.0 * groove + 55.0 * lip) * on_part
    defect = np.where((cv2.dilate(groove + lip, np.ones((3, 3), np.uint8)) > 0.2) & (on_part > 0), 255, 0)
    return layer, defect.astype(np.uint8)


def _stain(rng: np.random.Generator, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A blot of rust or oil: returns alpha (s, s), its BGR colour and the defect mask."""
    s = mask.shape[0]
    cx, cy = _random_inside(rng, mask, int(s * 0.02))
    r0 = s * float(rng.uniform(0.03, 0.05))
    blob = np.zeros((s, s), np.float32)
    for _ in range(int(rng.integers(4, 8))):
        off = rng.normal(0, r0 * 0.45, 2)
        axes = (max(2, round(r0 * rng.uniform(0.35, 0.8))), max(2, round(r0 * rng.uniform(0.35, 0.8))))
        centre = (round(cx + off[0]), round(cy + off[1]))
        cv2.ellipse(blob, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1, cv2.LINE_AA)
    blob = cv2.GaussianBlur(blob, (0, 0), r0 * 0.15)
    rust = np.array([40.0, 70.0, 120.0], np.float32)
    oil = np.array([38.0, 40.0, 44.0], np.float32)
    colour = rust if rng.uniform() < 0.6 else oil
    alpha = np.clip(blob, 0, 1) * float(rng.uniform(0.6, 0.85)) * (mask > 127)
    defect = np.where(alpha > 0.15, 255, 0).astype(np.uint8)
    return alpha, colour, defect


# ---------------------------------------------------------------------------------------------
# rendering


def render_part(rng: np.random.Generator, size: int = 256, kind: str | None = None) -> Rendered:
    """Draw one part (normal when ``kind`` is None) as a ``size`` x ``size`` BGR picture.

    Pose, lighting, texture and noise are drawn from ``rng`` first; the defect has generator state
    of its own, so equal ``rng`` states give the same part with and without a defect.
    """
    if kind is not None and kind not in DEFECT_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; use one of {list(DEFECT_KINDS)}")
    if size < 64:
        raise ValueError(f"size {size} is too small to draw a part; use 64 or more")
    base_rng = np.random.default_rng(rng.integers(2**63))
    defect_rng = np.random.default_rng(rng.integers(2**63))
    s = SUPERSAMPLE * size
    sc = _scene(base_rng)
    mask, boss = _geometry(s)
    defect = np.zeros_like(mask)
    if kind == "missing":
        mask, defect = _missing_chunk(defect_rng, mask)
        boss = cv2.bitwise_and(boss, mask)
    part = _surface(base_rng, sc, mask, boss)
    if kind == "dent":
        part, mask, height, defect = _dent(defect_rng, part, mask)
        part += _dent_shading(height, _canonical_light(sc), mask)[:, :, None]
    elif kind == "scratch":
        layer, defect = _scratch(defect_rng, mask, _canonical_light(sc))
        part += layer[:, :, None]
    elif kind == "stain":
        alpha, colour, defect = _stain(defect_rng, mask)
        a = alpha[:, :, None]
        part = part * (1 - a) + colour[None, None, :] * (sc.base_grey / 160.0) * a
    return _compose(base_rng, sc, part, mask, defect, size, kind)


def _compose(
    rng: np.random.Generator,
    sc: _Scene,
    part: np.ndarray,
    mask: np.ndarray,
    defect: np.ndarray,
    size: int,
    kind: str | None,
) -> Rendered:
    s = mask.shape[0]
    m = _pose_matrix(sc, s)
    flags = cv2.INTER_LINEAR
    part_w = cv2.warpAffine(part.astype(np.float32), m, (s, s), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    alpha = cv2.warpAffine(mask.astype(np.float32) / 255.0, m, (s, s), flags=flags)
    defect_w = cv2.warpAffine(defect, m, (s, s), flags=flags)
    belt = _belt(rng, sc, s)
    shadow = cv2.GaussianBlur(alpha, (0, 0), s * 0.012)
    shadow = np.roll(shadow, (round(s * 0.018), round(s * 0.012)), axis=(0, 1))
    belt = belt * (1.0 - 0.45 * shadow)[:, :, None]
    a = alpha[:, :, None]
    img = belt * (1 - a) + part_w * a
    # Lighting: overall gain and a gentle gradient across the field of view.
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s - 0.5
    g = math.radians(sc.gradient_deg)
    light = sc.gain * (1.0 + sc.gradient * 2.0 * (xx * math.cos(g) + yy * math.sin(g)))
    img = img * light[:, :, None]
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    img += rng.normal(0.0, sc.noise_sigma, img.shape).astype(np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    part_mask = cv2.resize(alpha, (size, size), interpolation=cv2.INTER_AREA)
    defect_small = cv2.resize(defect_w, (size, size), interpolation=cv2.INTER_AREA)
    return Rendered(
        image=image,
        part_mask=np.where(part_mask > 0.5, 255, 0).astype(np.uint8),
        defect_mask=np.where(defect_small > 64, 255, 0).astype(np.uint8),
        kind=kind,
    )


def normal_part(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A defect-free part, BGR uint8 (size, size, 3)."""
    return render_part(rng, size, None).image


def defective_part(rng: np.random.Generator, size: int = 256, kind: str = "scratch") -> np.ndarray:
    """A part with one defect of ``kind`` (one of DEFECT_KINDS), BGR uint8 (size, size, 3)."""
    return render_part(rng, size, kind).image


# ---------------------------------------------------------------------------------------------
# data sets and videos


def _item_rng(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split, index])


JPEG_QUALITY = 95  # of data-set JPEGs and video frames alike, so a bundle trains on what the camera sends


def _write_image(path: Path, image: np.ndarray) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if path.suffix == ".jpg" else []
    ok, data = cv2.imencode(path.suffix, image, params)
    if not ok:
        raise OSError(f"{path}: OpenCV could not encode the picture as {path.suffix}")
    path.write_bytes(data.tobytes())


IMAGE_FORMATS = ("png", "jpg", "mjpg")


def write_dataset(
    root: str | Path,
    n_train: int = 200,
    n_test_good: int = 30,
    n_test_defect: int = 10,
    size: int = 256,
    seed: int = 0,
    kinds: Sequence[str] = DEFECT_KINDS,
    image_format: str = "png",
) -> dict[str, int]:
    """Write an MVTec-layout data set and return the count per folder.

    ``root/train/good``, ``root/test/good``, ``root/test/<kind>`` (``n_test_defect`` pictures for each
    kind) and ``root/ground_truth/<kind>/<name>_mask.png``. ``image_format``: ``png`` (lossless),
    ``jpg`` (JPEG at the video's quality) or ``mjpg``: PNG files of the frames exactly as the agent
    decodes them from an MJPG video like write_video's. A bundle for the demo video must learn what
    that compression does to a part, or compression alone reads as an anomaly. Masks are always PNG.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format {image_format!r}: use one of {', '.join(IMAGE_FORMATS)}")
    root = Path(root)
    suffix = "jpg" if image_format == "jpg" else "png"
    counts: dict[str, int] = {}
    jobs: list[tuple[str, int, int, str | None]] = [
        ("train/good", 0, n_train, None),
        ("test/good", 1, n_test_good, None),
    ]
    jobs += [(f"test/{k}", 2 + DEFECT_KINDS.index(k), n_test_defect, k) for k in kinds]
    for folder, split, n, kind in jobs:
        out = root / folder
        out.mkdir(parents=True, exist_ok=True)
        rendered = [render_part(_item_rng(seed, split, i), size, kind) for i in range(n)]
        images = [r.image for r in rendered]
        if image_format == "mjpg" and images:
            images = mjpg_roundtrip(images)
        for i, image in enumerate(images):
            _write_image(out / f"{i:03d}.{suffix}", image)
        if kind is not None:
            gt = root / "ground_truth" / kind
            gt.mkdir(parents=True, exist_ok=True)
            for i, r in enumerate(rendered):
                _write_image(gt / f"{i:03d}_mask.png", r.defect_mask)
        counts[folder] = n
        logger.info("wrote %d pictures to %s", n, out)
    return counts


def video_schedule(n_frames: int, anomaly_every: int, kinds: Sequence[str] = DEFECT_KINDS) -> list[str | None]:
    """Which frames carry a defect: every ``anomaly_every``-th frame (the last of each group), kinds in turn."""
    plan: list[str | None] = []
    k = 0
    for i in range(n_frames):
        if anomaly_every > 0 and i % anomaly_every == anomaly_every - 1:
            plan.append(kinds[k % len(kinds)])
            k += 1
        else:
            plan.append(None)
    return plan


def sidecar_path(video: str | Path) -> Path:
    """Where write_video puts the list of defective frames: ``clip.avi`` -> ``clip.avi.json``."""
    video = Path(video)
    return video.with_name(video.name + ".json")


def _mjpg_writer(path: Path, size: tuple[int, int], fps: float) -> cv2.VideoWriter:
    # OpenCV's own MJPEG writer honours the quality setting (the FFmpeg one ignores it).
    fourcc = cv2.VideoWriter_fourcc(*"MJPG")
    writer = cv2.VideoWriter(str(path), cv2.CAP_OPENCV_MJPEG, fourcc, float(fps), size)
    if not writer.isOpened():
        writer = cv2.VideoWriter(str(path), fourcc, float(fps), size)
    if not writer.isOpened():
        raise OSError(
            f"{path}: OpenCV cannot write an MJPG video here; check the folder and that the name ends in .avi"
        )
    writer.set(cv2.VIDEOWRITER_PROP_QUALITY, JPEG_QUALITY)
    return writer


def read_video(path: str | Path) -> list[np.ndarray]:
    """Every frame of a video file, decoded as the agent decodes it (cv2.VideoCapture's default backend)."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(frame)
    finally:
        cap.release()
    return frames


def mjpg_roundtrip(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The pictures after an MJPG video's encode and decode: what a camera box reading the video sees."""
    h, w = images[0].shape[:2]
    with tempfile.TemporaryDirectory(prefix="yugami-mjpg-") as tmp:
        path = Path(tmp) / "roundtrip.avi"
        writer = _mjpg_writer(path, (w, h), 10.0)
        try:
            for image in images:
                writer.write(image)
        finally:
            writer.release()
        frames = read_video(path)
    if len(frames) != len(images):
        raise OSError(f"MJPG round trip gave {len(frames)} frames for {len(images)} pictures")
    return frames


def write_video(
    path: str | Path,
    n_frames: int = 40,
    anomaly_every: int = 5,
    size: int = 256,
    fps: float = 10.0,
    seed: int = 0,
    kinds: Sequence[str] = DEFECT_KINDS,
) -> Path:
    """Write an MJPG .avi of parts, one part per frame, and a JSON sidecar naming the defective frames.

    The sidecar (``<path>.json``) holds ``{"frames": n, "fps", "size", "seed", "defects": [kind|null per
    frame]}``. Returns the sidecar's path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plan = video_schedule(n_frames, anomaly_every, kinds)
    writer = _mjpg_writer(path, (size, size), fps)
    try:
        for i, kind in enumerate(plan):
            writer.write(render_part(_item_rng(seed, 100, i), size, kind).image)
    finally:
        writer.release()
    side = sidecar_path(path)
    side.write_text(
        json.dumps({"frames": n_frames, "fps": fps, "size": size, "seed": seed, "defects": plan}, indent=1) + "\n"
    )
    logger.info("wrote %d frames (%d defective) to %s", n_frames, sum(k is not None for k in plan), path)
    return side


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m demo.synthetic",
        description="Draw synthetic machined parts (normal and defective) as an MVTec-layout data set or a video.",
        epilog=(
            "Examples:\n"
            "  python -m demo.synthetic dataset out/synth --train 200 --test-good 30 --test-defect 10\n"
            "  python -m demo.synthetic video out/parts.avi --frames 40 --anomaly-every 5 --fps 10\n"
            f"Defect kinds: {', '.join(DEFECT_KINDS)}."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ds = sub.add_parser("dataset", help="write train/good, test/good, test/<kind>, ground_truth/<kind>")
    ds.add_argument("root", type=Path, help="output folder")
    ds.add_argument("--train", type=int, default=200, help="normal training pictures (default 200)")
    ds.add_argument("--test-good", type=int, default=30, help="normal test pictures (default 30)")
    ds.add_argument("--test-defect", type=int, default=10, help="test pictures per defect kind (default 10)")
    ds.add_argument("--kinds", default=",".join(DEFECT_KINDS), help="comma-separated defect kinds (default all)")
    ds.add_argument(
        "--format",
        choices=IMAGE_FORMATS,
        default="png",
        help=f"png; jpg (quality {JPEG_QUALITY}); mjpg: PNGs of the frames as decoded from an MJPG video (default png)",
    )
    vid = sub.add_parser("video", help="write an MJPG .avi and its <name>.avi.json list of defective frames")
    vid.add_argument("path", type=Path, help="output video, ending in .avi")
    vid.add_argument("--frames", type=int, default=40, help="number of frames (default 40)")
    vid.add_argument("--anomaly-every", type=int, default=5, help="every N-th frame is defective; 0 for none")
    vid.add_argument("--fps", type=float, default=10.0, help="frame rate written into the file (default 10)")
    for p in (ds, vid):
        p.add_argument("--size", type=int, default=256, help="picture side in pixels (default 256)")
        p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


def _parse_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in DEFECT_KINDS]
    if bad:
        raise SystemExit(f"unknown defect kind(s) {bad}; choose from {', '.join(DEFECT_KINDS)}")
    return kinds


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "dataset":
        counts = write_dataset(
            args.root,
            args.train,
            args.test_good,
            args.test_defect,
            args.size,
            args.seed,
            _parse_kinds(args.kinds),
            args.format,
        )
        print(json.dumps({"root": str(args.root), "counts": counts}))
    else:
        side = write_video(args.path, args.frames, args.anomaly_every, args.size, args.fps, args.seed)
        plan = json.loads(side.read_text())["defects"]
        print(
            json.dumps(
                {
                    "video": str(args.path),
                    "sidecar": str(side),
                    "defective_frames": [i for i, k in enumerate(plan) if k is not None],
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
