"""Patch-level scoring: local features from several layers, nearest-neighbour distance to a bank of
normal patch features, the frame's score from its worst cell and an anomaly map from all of them.

The recipe is PatchCore's (Roth et al. 2022) on MobileNetV2 (AMCO-UniPD/PaSTe): the model gives
feature maps of a few early and middle layers (``patch_0`` is the highest resolution); each is
averaged over 3x3 neighbourhoods (a cell then describes a small patch, not a single position),
brought to one grid (area-averaged down, bilinear up) and the maps are concatenated per cell. The
score of a frame is the largest, over cells, Euclidean distance from the cell's feature to its
nearest row of the bank; the (grid) map of those distances says where.

Smoothing and resizing are linear along each axis, so a layer's whole trip to the grid is
``R_h @ A_c @ R_w^T`` per channel with two small matrices computed once per shape: numpy only,
no OpenCV call on many-channel arrays (OpenCV 5 refuses them).

Both the trainer (bank, calibration) and the agent (every frame) call :func:`patch_features`, so
the bank and the device's frames are read the same way.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SMOOTHING = 3  # PatchCore's local neighbourhood: 3x3 average


@dataclass(frozen=True)
class PatchSpec:
    """Manifest key ``patch``: which model outputs, the grid, and the bank file."""

    outputs: tuple[str, ...]  # roles in tflite.outputs, highest resolution first
    grid: tuple[int, int]  # (height, width) of the map all layers are brought to
    smoothing: int = SMOOTHING
    top_k: int = 1  # a frame's patch score: the mean of its top_k worst cells (absent in older bundles: 1)

    @classmethod
    def from_manifest(cls, d: Any) -> PatchSpec:
        """Validate the manifest's ``patch`` entry; a ValueError names the key (``patch.grid``, ...)."""
        if not isinstance(d, dict):
            raise ValueError('\'patch\' must be an object like {"outputs": ["patch_0", ...], "grid": [28, 28]}')
        outputs = d.get("outputs")
        if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
            raise ValueError("'patch.outputs' must be a non-empty list of output names")
        if len(set(outputs)) != len(outputs):
            raise ValueError(f"'patch.outputs' names an output twice: {outputs}")
        grid = d.get("grid")
        if not isinstance(grid, list) or len(grid) != 2 or not all(_is_int(g) and g > 0 for g in grid):
            raise ValueError("'patch.grid' must be [height, width], two positive integers")
        smoothing = d.get("smoothing", SMOOTHING)
        if not _is_int(smoothing) or smoothing < 1 or smoothing % 2 == 0:
            raise ValueError("'patch.smoothing' must be a positive odd integer")
        top_k = d.get("top_k", 1)
        top_k = 1 if top_k is None else top_k
        if not _is_int(top_k) or not 1 <= top_k <= grid[0] * grid[1]:
            raise ValueError("'patch.top_k' must be an integer from 1 to the grid's cell count")
        return cls(outputs=tuple(outputs), grid=(grid[0], grid[1]), smoothing=smoothing, top_k=top_k)

    def to_manifest(self) -> dict[str, Any]:
        return {
            "outputs": list(self.outputs),
            "grid": list(self.grid),
            "smoothing": self.smoothing,
            "top_k": self.top_k,
        }


def grid_for(first_map_hw: tuple[int, int]) -> tuple[int, int]:
    """The grid for a model whose highest-resolution patch map is ``first_map_hw``: half of it
    (28x28 for MobileNetV2 ``block_2_add`` at 224 px, the published recipe's grid)."""
    return (max(1, (first_map_hw[0] + 1) // 2), max(1, (first_map_hw[1] + 1) // 2))


def _box_matrix(n: int, k: int) -> np.ndarray:
    """(n, n): average over the k neighbours centred on each position, only those inside."""
    idx = np.arange(n)
    m = (np.abs(idx[:, None] - idx[None, :]) <= k // 2).astype(np.float64)
    return m / m.sum(axis=1, keepdims=True)


def _area_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src): each output cell the mean of the input it covers (fractional overlaps weighed)."""
    s = src / dst
    lo = np.arange(dst)[:, None] * s
    hi = lo + s
    j = np.arange(src)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    return overlap / s


def _linear_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src): bilinear resampling along one axis, half-pixel centres (OpenCV's INTER_LINEAR)."""
    x = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0.0, src - 1)
    left = np.floor(x).astype(int)
    right = np.minimum(left + 1, src - 1)
    w = x - left
    m = np.zeros((dst, src))
    m[np.arange(dst), left] += 1.0 - w
    m[np.arange(dst), right] += w
    return m


@functools.lru_cache(maxsize=32)
def axis_matrix(src: int, dst: int, smoothing: int) -> np.ndarray:
    """(dst, src) float32: smoothing, then area-down or bilinear-up to ``dst``, along one axis."""
    resize = _area_matrix(src, dst) if dst <= src else _linear_matrix(src, dst)
    return (resize @ _box_matrix(src, smoothing)).astype(np.float32)


def patch_features(maps: Sequence[np.ndarray], grid: tuple[int, int], smoothing: int = SMOOTHING) -> np.ndarray:
    """(gh * gw, sum of channels) float32: every map smoothed, brought to ``grid``, concatenated per cell.

    ``maps``: float (h, w, c) or (1, h, w, c) feature maps, highest resolution first.
    """
    gh, gw = grid
    parts = []
    for m in maps:
        a = np.asarray(m, np.float32)
        a = a[0] if a.ndim == 4 else a
        h, w, c = a.shape
        rows = axis_matrix(h, gh, smoothing)  # (gh, h)
        cols = axis_matrix(w, gw, smoothing)  # (gw, w)
        # (gh, h) @ (h, w*c) -> (gh, w, c); then contract w: (gh, c, w) @ (w, gw) -> (gh, c, gw)
        t = (rows @ a.reshape(h, w * c)).reshape(gh, w, c)
        parts.append(np.einsum("ywc,xw->yxc", t, cols, optimize=True))
    return np.concatenate(parts, axis=-1).reshape(gh * gw, -1)


@dataclass(frozen=True)
class PatchBank:
    """Normal patch features (N, D) float32, kept as ``-2 B^T`` (D, N) with the squared norms, ready
    for exact search, and a scratch buffer per query size so a frame's search allocates nothing
    (a fresh 7.5 MB array per frame costs page faults; one scorer thread uses a bank at a time)."""

    rows: np.ndarray
    sq_norms: np.ndarray
    neg2_t: np.ndarray
    _scratch: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, rows: np.ndarray) -> PatchBank:
        r = np.ascontiguousarray(rows, dtype=np.float32)
        return cls(rows=r, sq_norms=np.einsum("nd,nd->n", r, r), neg2_t=np.ascontiguousarray(-2.0 * r.T))

    @property
    def dim(self) -> int:
        return int(self.rows.shape[1])

    def scratch(self, m: int) -> np.ndarray:
        buf = self._scratch.get(m)
        if buf is None:
            buf = self._scratch[m] = np.empty((m, self.rows.shape[0]), np.float32)
        return buf


def nearest_distances(features: np.ndarray, bank: PatchBank) -> np.ndarray:
    """(M,) Euclidean distance from each row of ``features`` (M, D) to its nearest bank row.

    Exact: ``|x|^2 + min_b (|b|^2 - 2 x.b)`` by one matrix product (M x N) written into the bank's
    scratch buffer, the norms added in place: 9.3 ms for 784 x 2400 x 248 on one core of this
    machine, against 13.0 ms for the same sum with temporaries (bench/speed.py)."""
    x = np.ascontiguousarray(features, np.float32)
    d2 = bank.scratch(x.shape[0])
    np.matmul(x, bank.neg2_t, out=d2)
    np.add(d2, bank.sq_norms, out=d2)
    best = d2.min(axis=1) + np.einsum("md,md->m", x, x)
    return np.sqrt(np.maximum(best, 0.0))


@dataclass(frozen=True)
class Fusion:
    """How the GeM and patch scores become one (manifest key ``scoring``).

    Each score is standardised with the mean and standard deviation of normal pictures' scores
    (every training normal, scored against a bank built without it), then the two are averaged:
    neither scale dominates, and a frame far out on either is far out on the sum."""

    gem_mean: float
    gem_std: float
    patch_mean: float
    patch_std: float

    def fuse(self, gem: float | np.ndarray, patch: float | np.ndarray) -> Any:
        return 0.5 * ((gem - self.gem_mean) / self.gem_std + (patch - self.patch_mean) / self.patch_std)

    def to_manifest(self) -> dict[str, float]:
        return {
            "gem_mean": self.gem_mean,
            "gem_std": self.gem_std,
            "patch_mean": self.patch_mean,
            "patch_std": self.patch_std,
        }

    @classmethod
    def from_manifest(cls, d: Any) -> Fusion:
        """Validate the manifest's ``scoring.fusion`` entry; a ValueError names the key."""
        if not isinstance(d, dict):
            raise ValueError("'scoring.fusion' must be an object with gem_mean, gem_std, patch_mean, patch_std")
        values = {}
        for key in ("gem_mean", "gem_std", "patch_mean", "patch_std"):
            v = finite_number(d.get(key))
            if v is None:
                raise ValueError(f"'scoring.fusion.{key}' must be a finite number, not {_short(d.get(key))}")
            values[key] = v
        if values["gem_std"] <= 0 or values["patch_std"] <= 0:
            raise ValueError("'scoring.fusion.gem_std' and 'scoring.fusion.patch_std' must be positive")
        return cls(**values)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def finite_number(v: Any) -> float | None:
    """``v`` as a float when it is a JSON number (not a boolean) with a finite value, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:  # an integer beyond float range
        return None
    return f if math.isfinite(f) else None


def _short(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 10**18:
        return "an integer beyond float range" if finite_number(v) is None else "a very large integer"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


SCORINGS = ("gem", "patch", "fused")


def worst_cells(distances: np.ndarray, top_k: int = 1) -> np.ndarray:
    """A frame's patch score: the mean of its ``top_k`` largest cell distances (``top_k`` 1: the
    largest). ``distances``: (cells,) for one frame or (frames, cells)."""
    d = np.asarray(distances, np.float64)
    k = max(1, min(int(top_k), d.shape[-1]))
    if k == 1:
        return d.max(axis=-1)
    return np.partition(d, d.shape[-1] - k, axis=-1)[..., -k:].mean(axis=-1)
