"""The bank of normal embeddings, reduced by greedy k-center (a coreset) to a size budget.

Greedy k-center picks, one by one, the embedding farthest (cosine distance) from everything picked
so far. The picked set covers every training embedding within the final radius, which is what a
nearest-neighbour score needs: rare normal looks are kept, near-duplicates are dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

BANK_BUDGET_BYTES = 1_000_000
# Room for the npz container and zip headers, so the file stays under the budget.
_OVERHEAD_BYTES = 4096


@dataclass(frozen=True)
class Coreset:
    indices: np.ndarray  # into the input rows, in pick order
    radius: float  # largest cosine distance from any input row to its nearest picked row

    def to_manifest(self, n_from: int) -> dict[str, Any]:
        return {
            "method": "greedy k-center (cosine distance)" if len(self.indices) < n_from else "none (all fit)",
            "from": int(n_from),
            "covering_radius": round(float(self.radius), 6),
        }


def max_bank_size(dim: int, budget_bytes: int = BANK_BUDGET_BYTES) -> int:
    """How many float16 vectors of ``dim`` fit in ``budget_bytes`` (uncompressed, to be safe)."""
    return max(1, (budget_bytes - _OVERHEAD_BYTES) // (2 * dim))


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def kcenter_greedy(embeddings: np.ndarray, size: int, seed: int = 0) -> Coreset:
    """Greedy k-center of at most ``size`` rows; the first centre is the row nearest the mean."""
    x = _normalize(embeddings)
    n = x.shape[0]
    if size < 1:
        raise ValueError(f"bank size must be at least 1, not {size}")
    mean = _normalize(x.mean(axis=0, keepdims=True))
    first = int(np.argmax(x @ mean[0]))
    picked = [first]
    dist = 1.0 - x @ x[first]
    for _ in range(min(size, n) - 1):
        nxt = int(np.argmax(dist))
        if dist[nxt] <= 0:
            break  # everything left duplicates a picked row
        picked.append(nxt)
        dist = np.minimum(dist, 1.0 - x @ x[nxt])
    return Coreset(indices=np.asarray(picked), radius=float(max(dist.max(), 0.0)))


def build_bank(embeddings: np.ndarray, size: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """(float16 bank, manifest 'reduction' entry). ``size`` None means: what fits in 1 MB."""
    n, dim = embeddings.shape
    limit = max_bank_size(dim) if size is None else min(size, max_bank_size(dim))
    if size is not None and size > limit:
        logger.warning("bank size %d would exceed 1 MB at dim %d; using %d", size, dim, limit)
    core = kcenter_greedy(embeddings, limit)
    bank = _normalize(embeddings[core.indices]).astype(np.float16)
    logger.info("bank: %d of %d embeddings, covering radius %.4f", bank.shape[0], n, core.radius)
    return bank, core.to_manifest(n)


PATCH_PROJECTION_DIM = 64  # k-center runs on a random projection: distances keep their order (JL), 4x cheaper


def kcenter_euclidean(x: np.ndarray, size: int) -> np.ndarray:
    """Indices of a greedy k-center of the rows of ``x`` (Euclidean), first centre nearest the mean."""
    x = np.asarray(x, np.float32)
    sq = np.einsum("nd,nd->n", x, x)
    mean = x.mean(axis=0)
    first = int(np.argmin(sq - 2.0 * (x @ mean)))
    picked = [first]
    dist = sq - 2.0 * (x @ x[first]) + sq[first]
    for _ in range(min(size, x.shape[0]) - 1):
        nxt = int(np.argmax(dist))
        if dist[nxt] <= 0:
            break
        picked.append(nxt)
        dist = np.minimum(dist, sq - 2.0 * (x @ x[nxt]) + sq[nxt])
    return np.asarray(picked)


def patch_coreset(features: np.ndarray, rows: int, seed: int = 0) -> np.ndarray:
    """(rows, D) float32 coreset of patch features (pictures, cells, D) or (cells, D): PatchCore's
    greedy k-center on a random projection (PATCH_PROJECTION_DIM), rows taken at full dimension.

    One coreset over all cells: a union of per-fold coresets (each fold's outliers kept k times,
    the common looks covered more thinly) scored screw patch AUROC 0.833 against 0.936 for this."""
    d = features.shape[-1]
    cells = np.asarray(features.reshape(-1, d), np.float32)
    proj = np.random.default_rng([seed, 23]).standard_normal((d, PATCH_PROJECTION_DIM)).astype(np.float32)
    proj /= np.sqrt(PATCH_PROJECTION_DIM)
    return cells[kcenter_euclidean(cells @ proj, rows)]
