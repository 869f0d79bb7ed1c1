"""Grad-CAM on the camera box, in closed form: numpy and OpenCV only, no TensorFlow.

TFLite has no gradients, but the head after the last convolutional feature map A (h, w, C) is
small and known (the Grad-CAM head contract, manifest key ``gradcam``)::

    g = GAP(A) = mean_ij A_ij          (C,)
    z = W^T g + b   (or z = g when there is no projection; W, b from head.npz)
    e = z / ||z||                       (the embedding)

For a scalar S(e) with gradient v = dS/de the chain rule gives

    dS/dz = (v - e (e . v)) / ||z||      (the L2 normalisation's Jacobian (I - e e^T) / ||z||)
    dS/dg = W dS/dz
    dS/dA_ijc = dS/dg_c / (h w)          (global average pooling)

and Grad-CAM is ``ReLU(sum_c alpha_c A_c)`` with ``alpha_c = mean_ij dS/dA_ijc = dS/dg_c / (h w)``.

With generalised mean pooling (``embedding.pooling: gem``), ``g_c = (mean_ij A_ijc^p)^(1/p)`` and the
gradient is no longer the same in every cell: ``dS/dA_ijc = dS/dg_c A_ijc^(p-1) g_c^(1-p) / (h w)``.
The map is then gradient x activation, ``ReLU(sum_c dS/dA_ijc A_ijc)``, which for average pooling is
exactly the Grad-CAM above and for GeM keeps its property that the cells sum to ``dS/dg . g``.

* Anomaly map: S = 1 - e . b_k for the nearest bank vector b_k, so v = -b_k: what makes this frame
  unlike its nearest normal picture.
* Class map: S = e . w_k for column k of the head's ``class_weights`` (D, K), so v = w_k.

z is not a model output: it is rebuilt as ``W^T GAP(A) + b`` from the (dequantised) feature map with
the float head weights, so the same code serves float and int8 bundles.

Units and the colour anchor: to first order a change of the feature map moves the score by
``sum_ij sum_c alpha_c dA_ijc``, so a cam cell is in score units (a cell's share of what pushes the
score up; without a projection bias the map before the ReLU sums to exactly 0, because the cosine
does not change when g is scaled). The overlay maps ``cam / cam_scale`` to the colour bar, where
``cam_scale`` is a constant of the bundle derived from its threshold, never of the frame (see
:func:`cam_scale`): the same cam value gets the same colour on every frame, and a cold picture really
means "nothing here pushes the score up much".
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import cv2
import numpy as np

from agent.bundle import Bundle
from agent.scoring import GEM_EPS, Embedding, gem_powers

logger = logging.getLogger(__name__)

# Without a calibrated ``gradcam.cam_scale`` in the manifest the colour bar tops out at TOP_SHARES times
# threshold / (h w): what each feature-map cell would carry if a frame exactly at the threshold spread its
# score evenly over the map. Measured on magnetic tile (docs/GRADCAM.md): a frame's hottest cell carries
# 1.5-2x score / (h w), so a frame at the threshold peaks near the middle of the bar, one at twice the
# threshold near the top, and normal frames stay in the blues.
TOP_SHARES = 4.0
LEGEND_HEIGHT = 18  # pixels of colour bar + labels appended below the overlay picture
COLORMAP = cv2.COLORMAP_JET
MAX_ALPHA = 0.65  # how much heat covers the picture at the top of the scale


class GradCamError(ValueError):
    """The bundle cannot give a heat map (no feature map output, or a head it does not describe)."""


def head_weights(bundle: Bundle) -> tuple[np.ndarray, np.ndarray] | None:
    """The projection (kernel (C, D), bias (D,)) as float64, or None when e = n(GAP(A))."""
    spec = bundle.manifest.get("gradcam") or {}
    if not spec.get("projection", "proj_kernel" in bundle.head):
        return None
    if "proj_kernel" not in bundle.head:
        raise GradCamError(
            f"bundle {bundle.path}: the manifest says gradcam.projection is true but head.npz has no "
            "'proj_kernel'; re-export the bundle with the trainer's head weights"
        )
    kernel = np.asarray(bundle.head["proj_kernel"], dtype=np.float64)
    bias = bundle.head.get("proj_bias")
    bias = np.zeros(kernel.shape[1]) if bias is None else np.asarray(bias, dtype=np.float64)
    return kernel, bias


def _check(bundle: Bundle, embedding: Embedding) -> np.ndarray:
    if embedding.feature_map is None:
        raise GradCamError(
            f"bundle {bundle.path}: the model has no feature_map output, so there is no heat map; "
            "export the embedder with its two outputs [embedding, feature_map]"
        )
    spec = bundle.manifest.get("gradcam") or {}
    if spec.get("pooling", "avg") not in ("avg", "gem"):
        raise GradCamError(
            f"bundle {bundle.path}: gradcam.pooling {spec.get('pooling')!r} is not supported, only 'avg' or 'gem'"
        )
    fmap = np.asarray(embedding.feature_map, dtype=np.float64)
    if fmap.ndim == 4:
        fmap = fmap[0]
    return fmap


def pooled_gradient(g: np.ndarray, v: np.ndarray, head: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """dS/dg for a scalar S(e) with dS/de = v, where g is the pooled feature map, through projection
    and L2 norm."""
    z = g if head is None else g @ head[0] + head[1]
    if z.shape != v.shape:
        raise GradCamError(f"embedding dimension {z.shape[-1]} from the head disagrees with the target's {v.shape}")
    norm = max(float(np.linalg.norm(z)), 1e-12)
    e = z / norm
    dz = (v - e * float(e @ v)) / norm
    return dz if head is None else head[0] @ dz


def gradcam_weights(fmap: np.ndarray, v: np.ndarray, head: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """alpha_c = mean_ij dS/dA_ijc for a scalar S(e) with dS/de = v, through average pooling, projection and L2 norm."""
    h, w, c = fmap.shape
    return pooled_gradient(fmap.reshape(-1, c).mean(axis=0), v, head) / (h * w)


def cam_from_weights(fmap: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """ReLU(sum_c alpha_c A_c) as float32 (h, w)."""
    return np.maximum(fmap @ alpha, 0.0).astype(np.float32)


def target_cam(bundle: Bundle, fmap: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Heat map (h, w) of the scalar with dS/de = v, for the bundle's pooling."""
    head = head_weights(bundle)
    if bundle.embedding.pooling != "gem":
        return cam_from_weights(fmap, gradcam_weights(fmap, v, head))
    p = bundle.embedding.p
    h, w, _ = fmap.shape
    powered = gem_powers(fmap, p).astype(np.float64)  # computed once: it gives g and weighs the cells
    g = np.power(powered.mean(axis=0), 1.0 / p)
    dg = pooled_gradient(g, v, head)
    cam = powered @ (dg * np.power(np.maximum(g, GEM_EPS), 1.0 - p)) / (h * w)
    return np.maximum(cam, 0.0).reshape(h, w).astype(np.float32)


def anomaly_cam(bundle: Bundle, embedding: Embedding, nearest: int) -> np.ndarray:
    """Heat map (h, w) at feature-map resolution for the score 1 - cos(e, bank[nearest])."""
    fmap = _check(bundle, embedding)
    return target_cam(bundle, fmap, -bundle.bank[int(nearest)].astype(np.float64))


def class_names(bundle: Bundle) -> list[str]:
    """Names of the head's classes (manifest gradcam.class_names), [] when the head keeps none."""
    weights = bundle.head.get("class_weights")
    if weights is None:
        return []
    names = list((bundle.manifest.get("gradcam") or {}).get("class_names") or [])
    k = int(weights.shape[1])
    return [str(n) for n in names[:k]] + [f"class{i}" for i in range(len(names), k)]


def class_cam(bundle: Bundle, embedding: Embedding, class_index: int) -> np.ndarray:
    """Heat map (h, w) for the head's logit e . w_k (class_weights column k, e.g. 'line', 'distortion')."""
    weights = bundle.head.get("class_weights")
    if weights is None:
        raise GradCamError(f"bundle {bundle.path}: head.npz has no 'class_weights', so there are no class maps")
    if not 0 <= class_index < weights.shape[1]:
        raise GradCamError(f"class index {class_index} is outside the head's {weights.shape[1]} classes")
    fmap = _check(bundle, embedding)
    return target_cam(bundle, fmap, np.asarray(weights[:, class_index], dtype=np.float64))


def class_cams(bundle: Bundle, embedding: Embedding) -> dict[str, np.ndarray]:
    """One heat map per head class, by name."""
    return {name: class_cam(bundle, embedding, i) for i, name in enumerate(class_names(bundle))}


def cam_scale(bundle: Bundle) -> float:
    """The cam value at the top of the colour bar: a constant of the bundle, the same for every frame.

    ``manifest["gradcam"]["cam_scale"]`` when the trainer calibrated one, else
    ``TOP_SHARES * threshold / (h * w)`` with (h, w) the feature map's size (see :data:`TOP_SHARES`).
    """
    spec = bundle.manifest.get("gradcam") or {}
    value = spec.get("cam_scale")
    if value is not None and float(value) > 0:
        return float(value)
    cells = 1
    if bundle.feature_map_output is not None:
        cells = int(np.prod(bundle.feature_map_output.shape[1:3]))
    return max(TOP_SHARES * float(bundle.threshold) / cells, 1e-12)


def upsample(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Cam resized to ``size`` = (height, width), bilinear, still >= 0."""
    h, w = size
    out = cv2.resize(np.asarray(cam, dtype=np.float32), (int(w), int(h)), interpolation=cv2.INTER_LINEAR)
    return np.maximum(out, 0.0)


def _level_index(level: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(level, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _tables() -> tuple[np.ndarray, np.ndarray]:
    """Per colour level (256): its RGB colour and its blend weight in 1/256 steps (sqrt: faint heat shows)."""
    colours = cv2.cvtColor(cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], COLORMAP), cv2.COLOR_BGR2RGB)
    weights = np.rint(256.0 * MAX_ALPHA * np.sqrt(np.arange(256) / 255.0)).astype(np.uint16)
    return colours.reshape(256, 3).astype(np.uint16), weights


def colorize(level: np.ndarray) -> np.ndarray:
    """Levels in [0, 1] to RGB uint8 colours of the colour map."""
    return _tables()[0][_level_index(level)].astype(np.uint8)


def blend(rgb: np.ndarray, level: np.ndarray) -> np.ndarray:
    """Heat over the picture; a cold cell leaves the picture as it is, a hot one is mostly colour.

    Integer arithmetic through 256-entry tables: this runs for every published heat map on the box.
    """
    colours, weights = _tables()
    idx = _level_index(level)
    a = weights[idx][..., None]
    out = (rgb.astype(np.uint16) * (256 - a) + colours[idx] * a + 128) >> 8
    return out.astype(np.uint8)


@functools.lru_cache(maxsize=8)
def legend(width: int, scale: float, threshold: float, cells: int = 0) -> np.ndarray:
    """A colour bar: 0 at the left, the anchored top at the right, the bundle's threshold named."""
    bar = np.full((LEGEND_HEIGHT, width, 3), 255, np.uint8)
    bar[:8] = colorize(np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :].repeat(8, axis=0))
    font, fs = cv2.FONT_HERSHEY_SIMPLEX, 0.3
    cv2.putText(bar, "0", (1, LEGEND_HEIGHT - 2), font, fs, (0, 0, 0), 1, cv2.LINE_AA)
    # The top of the bar in words a person can read: how many times its even share of the threshold a cell
    # carries (the default scale is TOP_SHARES shares), with the raw value for whoever compares bundles.
    share = scale * cells / threshold if threshold > 0 and cells > 0 else float("nan")
    top = f">={share:.0f}x thr/cell" if np.isfinite(share) else f"{scale:.3g}"
    (tw, _), _ = cv2.getTextSize(top, font, fs, 1)
    cv2.putText(bar, top, (max(width - tw - 1, 0), LEGEND_HEIGHT - 2), font, fs, (0, 0, 0), 1, cv2.LINE_AA)
    label = f"thr {threshold:.3g}"
    (lw, _), _ = cv2.getTextSize(label, font, fs, 1)
    if lw + 24 < width - tw:
        cv2.putText(bar, label, (12, LEGEND_HEIGHT - 2), font, fs, (60, 60, 60), 1, cv2.LINE_AA)
    bar.flags.writeable = False  # cached and shared between calls
    return bar


def overlay_image(
    rgb: np.ndarray, cam: np.ndarray, bundle: Bundle, *, with_legend: bool = True, scale: float | None = None
) -> np.ndarray:
    """RGB uint8 picture: ``cam`` over ``rgb`` (the prepared frame), coloured by ``cam / cam_scale(bundle)``.

    With ``with_legend`` a colour bar of :data:`LEGEND_HEIGHT` rows is appended below, so the result is
    (h + LEGEND_HEIGHT, w, 3).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"overlay needs an RGB picture (h, w, 3), got shape {rgb.shape}")
    top = cam_scale(bundle) if scale is None else float(scale)
    level = upsample(cam, rgb.shape[:2]) / np.float32(top)
    picture = blend(rgb, level)
    if not with_legend:
        return picture
    cells = int(np.prod(cam.shape[:2]))
    return np.vstack([picture, legend(rgb.shape[1], top, bundle.threshold, cells)])


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("OpenCV could not encode the overlay as JPEG")
    return buf.tobytes()


def overlay_jpeg(rgb: np.ndarray, cam: np.ndarray, bundle: Bundle, quality: int = 85) -> bytes:
    """JPEG bytes of :func:`overlay_image` (heat over the prepared frame, colour bar below)."""
    return encode_jpeg(overlay_image(rgb, cam, bundle), quality)


def anomaly_overlay_jpeg(bundle: Bundle, embedding: Embedding, nearest: int, quality: int = 85) -> bytes:
    """The one call the service needs: anomaly heat map of a scored frame, as a JPEG."""
    return overlay_jpeg(embedding.rgb, anomaly_cam(bundle, embedding, nearest), bundle, quality)


def grid_image(
    tiles: Sequence[np.ndarray], labels: Sequence[str] | None = None, columns: int = 4, tile_size: int = 160
) -> np.ndarray:
    """Tiles (RGB uint8, any size) in a grid with an optional caption under each; RGB uint8."""
    if not tiles:
        raise ValueError("grid_image needs at least one tile")
    cap = 14 if labels else 0
    cols = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + cols - 1) // cols
    grid = np.full((rows * (tile_size + cap), cols * tile_size, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = r * (tile_size + cap), c * tile_size
        th, tw = tile.shape[:2]
        f = tile_size / max(th, tw)
        small = cv2.resize(tile, (max(1, round(tw * f)), max(1, round(th * f))), interpolation=cv2.INTER_AREA)
        grid[y : y + small.shape[0], x : x + small.shape[1]] = small if small.ndim == 3 else small[..., None]
        if labels:
            text = str(labels[i])[: tile_size // 6]
            cv2.putText(
                grid, text, (x + 2, y + tile_size + cap - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (0, 0, 0), 1, cv2.LINE_AA
            )
    return grid


def patch_cam(bundle: Bundle, embedding: Embedding) -> np.ndarray:
    """The patch anomaly map (gh, gw) above the bundle's floor (a normal frame's worst cell): what the
    overlay colours. Raises GradCamError when the bundle scores no patches."""
    if embedding.patch_map is None:
        raise GradCamError(f"bundle {bundle.path}: no patch anomaly map (the bundle has no patch scoring)")
    return np.maximum(np.asarray(embedding.patch_map, np.float32) - np.float32(bundle.map_floor), 0.0)


def patch_legend(width: int, bundle: Bundle) -> np.ndarray:
    """Colour bar of the patch map: the floor (a normal frame's worst cell) to the bundle's top."""
    bar = np.full((LEGEND_HEIGHT, width, 3), 255, np.uint8)
    bar[:8] = colorize(np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :].repeat(8, axis=0))
    font, fs = cv2.FONT_HERSHEY_SIMPLEX, 0.3
    cv2.putText(bar, "normal", (1, LEGEND_HEIGHT - 2), font, fs, (0, 0, 0), 1, cv2.LINE_AA)
    top = f"patch dist {bundle.map_top:.3g}"
    (tw, _), _ = cv2.getTextSize(top, font, fs, 1)
    cv2.putText(bar, top, (max(width - tw - 1, 0), LEGEND_HEIGHT - 2), font, fs, (0, 0, 0), 1, cv2.LINE_AA)
    return bar


def patch_overlay_image(bundle: Bundle, embedding: Embedding, with_legend: bool = True) -> np.ndarray:
    """RGB uint8: the patch anomaly map over the prepared frame, on the bundle's fixed scale."""
    scale = max(bundle.map_top - bundle.map_floor, 1e-12)
    picture = overlay_image(embedding.rgb, patch_cam(bundle, embedding), bundle, with_legend=False, scale=scale)
    return np.vstack([picture, patch_legend(picture.shape[1], bundle)]) if with_legend else picture


PANEL_GAP = 4  # white pixels between the panels of the inspection picture


def inspection_image(bundle: Bundle, embedding: Embedding, nearest: int) -> np.ndarray:
    """What ``cmd/gradcam`` publishes, left to right: the frame as the model saw it (a heat map hides what
    it covers, and a reviewer judges the part, not the colours), the Grad-CAM overlay, and the patch
    anomaly map where the bundle has one (the map the fused score's patch half comes from)."""
    cam = overlay_image(embedding.rgb, anomaly_cam(bundle, embedding, nearest), bundle)
    plain = np.full_like(cam, 255)
    plain[: embedding.rgb.shape[0]] = embedding.rgb  # white where the others have their colour bar
    panels = [plain, cam]
    if embedding.patch_map is not None:
        panels.append(patch_overlay_image(bundle, embedding))
    gap = np.full((cam.shape[0], PANEL_GAP, 3), 255, np.uint8)
    return np.hstack([part for panel in panels for part in (gap, panel)][1:])


def inspection_jpeg(bundle: Bundle, embedding: Embedding, nearest: int, quality: int = 85) -> bytes:
    """JPEG bytes of :func:`inspection_image`."""
    return encode_jpeg(inspection_image(bundle, embedding, nearest), quality)
