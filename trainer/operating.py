"""Operating-point figures: what a threshold does, not only how well the scores rank.

Image AUROC says how well scores separate good from defective parts, averaged over every possible
threshold; a line runs at one threshold. These functions report that one point (recall, false-alarm
rate, precision, F1 at the bundle's threshold), the best F1 any threshold could give, the recall at a
fixed false-alarm rate, and the pixel-level figures of anomaly maps (pixel AUROC and MVTec's AUPRO).

Conventions, shared by every function here so their figures agree with each other and with
``trainer.evaluate.metrics``:

* labels are 1 for a defective image (or pixel) and 0 for a good one;
* higher scores are more anomalous, and a score counts as an alarm when ``score > threshold``
  (strictly, as the device and ``metrics()`` do);
* scores are compared in float64, so a float32 score array and a float64 threshold give the same
  verdicts here as in any later call with the threshold read back from JSON.

Small test sets cannot resolve small rates: with 41 good images one false alarm is a rate of 0.024,
so a false-alarm rate of 0.01 lies below one image and a recall quoted there is an interpolation
between the ROC points at 0 and 1 false alarms. :func:`recall_at_far` states that resolution
alongside the figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _labels_scores(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """(bool labels, float64 scores) as 1-D arrays of one length; raises on anything else, because a
    silently broadcast or mislabelled array would give plausible-looking wrong rates."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (defect)")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y.astype(bool), s


def _f1(tp: Any, fp: Any, fn: Any) -> Any:
    """F1 as 2 TP / (2 TP + FP + FN): the harmonic mean of precision and recall, but defined (0) when
    nothing is flagged. :func:`operating_point` and :func:`f1_max` both use this one expression so
    the maximum reproduces bit for bit at its threshold."""
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    den = 2.0 * tp + fp + fn
    return np.divide(2.0 * tp, den, out=np.zeros_like(den), where=den > 0)


def operating_point(labels: Any, scores: Any, threshold: float) -> dict[str, float | None]:
    """What ``threshold`` does to this test set (alarm when ``score > threshold``).

    Returns ``recall_at_threshold`` (defects flagged / defects), ``far_at_threshold`` (goods flagged /
    goods), ``precision_at_threshold`` (defects among the flagged) and ``f1_at_threshold``. A rate
    whose denominator is empty is None (no defects: no recall; no goods: no false-alarm rate).
    Precision when nothing is flagged is 0.0, as scikit-learn's ``zero_division=0``: a threshold that
    flags nothing finds no defects and should read as useless, not perfect.
    """
    y, s = _labels_scores(labels, scores)
    flagged = s > float(threshold)
    tp = int(np.sum(flagged & y))
    fp = int(np.sum(flagged & ~y))
    n_defect, n_good = int(y.sum()), int((~y).sum())
    fn = n_defect - tp
    return {
        "recall_at_threshold": tp / n_defect if n_defect else None,
        "far_at_threshold": fp / n_good if n_good else None,
        "precision_at_threshold": tp / (tp + fp) if tp + fp else 0.0,
        "f1_at_threshold": float(_f1(tp, fp, fn)) if n_defect or fp else None,
    }


def _threshold_below(high: float, low: float | None) -> float:
    """A threshold t with ``low <= t < high`` so that ``score > t`` flags ``high`` and not ``low``:
    the midpoint, which survives rounding of the threshold (JSON, float32 manifests) better than the
    score itself; ``low`` when the two are adjacent floats (the midpoint would round onto one of them).
    With no lower score, the next float below ``high``."""
    if low is None:
        return float(np.nextafter(high, -np.inf))
    mid = low + (high - low) / 2.0
    return float(mid) if low <= mid < high else float(low)


def f1_max(labels: Any, scores: Any) -> dict[str, float]:
    """The best F1 any threshold gives on this test set, and that threshold.

    Every distinct score is a candidate cut (flag it and everything above, i.e. each point of the
    precision-recall curve); the threshold reported lies between the cut score and the next lower
    distinct score (their midpoint, see :func:`_threshold_below`), so ``operating_point(labels,
    scores, f1_max_threshold)["f1_at_threshold"] == f1_max`` exactly. Tied scores are never split, as
    no threshold can split them. Among equal F1 values the highest threshold wins (fewest false alarms).
    This is an optimistic figure (the threshold is chosen on the test set itself): it says what the
    scores allow, the bundle's own threshold says what the line gets.
    """
    y, s = _labels_scores(labels, scores)
    if not y.any():
        raise ValueError("f1_max needs at least one defect")
    order = np.argsort(-s, kind="stable")
    s_desc, y_desc = s[order], y[order]
    # the last index of each run of equal scores: cutting there flags the whole run and all above it
    last = np.flatnonzero(np.r_[s_desc[1:] != s_desc[:-1], True])
    tp = np.cumsum(y_desc)[last]
    fp = (last + 1) - tp
    f1 = _f1(tp, fp, y.sum() - tp)
    best = int(np.argmax(f1))  # first maximum = highest threshold
    distinct = s_desc[last]
    low = float(distinct[best + 1]) if best + 1 < distinct.size else None
    return {"f1_max": float(f1[best]), "f1_max_threshold": _threshold_below(float(distinct[best]), low)}


def _polyline_at(x: np.ndarray, y: np.ndarray, x0: float) -> float:
    """y of the curve through (x, y) (x nondecreasing) at ``x0``, linear between points. Where the
    curve is vertical at ``x0`` (several points share it) the highest y is taken: at that rate the
    operator can have every one of them. ``np.interp`` cannot be used directly, as it needs strictly
    increasing x, and collapsing repeated x to their maximum y would tilt the following segment."""
    j = int(np.searchsorted(x, x0, side="right")) - 1  # last point with x <= x0
    if j < 0:
        return float(y[0])
    if x[j] == x0 or j == x.size - 1:
        return float(y[j])
    return float(y[j] + (y[j + 1] - y[j]) * (x0 - x[j]) / (x[j + 1] - x[j]))


def recall_at_far(labels: Any, scores: Any, far: float) -> dict[str, Any]:
    """Recall at false-alarm rate ``far``, interpolated linearly on the ROC curve.

    Returns ``{"far": far, "recall": r, "resolution": {"far": 1 / n_good, "recall": 1 / n_defect},
    "below_resolution": far < 1 / n_good}``. A test set can only realise false-alarm rates in steps of
    one good image: with 41 good images FAR 0.01 lies below one image, and the recall given there is
    interpolated between the ROC points at 0 and 1 false alarms, not a rate any threshold achieves on
    this set. The resolution entries say how coarse the two rates are, so a reader does not take a
    0.01 figure from 41 images for a measurement at 1 %.
    """
    from sklearn.metrics import roc_curve

    y, s = _labels_scores(labels, scores)
    n_defect, n_good = int(y.sum()), int((~y).sum())
    if not n_defect or not n_good:
        raise ValueError("recall_at_far needs both good and defective samples")
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"false-alarm rate {far} must be in [0, 1]")
    fpr, tpr, _ = roc_curve(y.astype(int), s, drop_intermediate=False)
    return {
        "far": float(far),
        "recall": _polyline_at(fpr, tpr, float(far)),
        "resolution": {"far": 1.0 / n_good, "recall": 1.0 / n_defect},
        "below_resolution": bool(far < 1.0 / n_good),
    }


def _masks_maps(masks: Sequence[Any], maps: Sequence[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pairs of (bool mask, float64 map); a None mask is an all-normal image of its map's shape."""
    if len(masks) != len(maps):
        raise ValueError(f"{len(masks)} masks for {len(maps)} maps")
    pairs = []
    for i, (mask, amap) in enumerate(zip(masks, maps, strict=True)):
        m = np.asarray(amap, dtype=np.float64)
        if m.ndim != 2:
            raise ValueError(f"map {i} has shape {m.shape}; anomaly maps are HxW")
        g = np.zeros(m.shape, bool) if mask is None else np.asarray(mask).astype(bool)
        if g.shape != m.shape:
            raise ValueError(f"mask {i} has shape {g.shape}, its map {m.shape}; resize one to the other first")
        if not np.isfinite(m).all():
            raise ValueError(f"map {i} has non-finite values")
        pairs.append((g, m))
    if not pairs:
        raise ValueError("no maps")
    return pairs


def pixel_auroc(masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray]) -> float | None:
    """AUROC over every pixel of every image (defect pixels against normal pixels).

    ``masks``: HxW ground truth per image, None for an image without one (all normal, e.g. test/good);
    ``maps``: HxW anomaly maps of the same sizes. None when the pixels hold only one class. Large
    defects dominate this figure (it counts pixels, not defects); :func:`aupro` weighs each defect
    region equally.
    """
    from sklearn.metrics import roc_auc_score

    pairs = _masks_maps(masks, maps)
    truth = np.concatenate([g.reshape(-1) for g, _ in pairs])
    values = np.concatenate([m.reshape(-1) for _, m in pairs])
    if truth.all() or not truth.any():
        return None
    return float(roc_auc_score(truth, values))


def aupro(
    masks: Sequence[np.ndarray | None], maps: Sequence[np.ndarray], max_fpr: float = 0.3, steps: int = 200
) -> float | None:
    """Normalised area under the per-region-overlap curve up to pixel false-positive rate ``max_fpr``
    (MVTec AD's AUPRO).

    At each of ``steps`` thresholds evenly spread over the maps' range (a pixel is flagged when its
    value is above the threshold), PRO is the mean, over the connected ground-truth regions of all
    images (8-connectivity, per image), of the fraction of the region's pixels flagged; FPR is the
    fraction of all normal pixels (of every image, None masks included) flagged. The curve runs from
    (0, 0) (nothing flagged) to (1, 1) (everything flagged); PRO is integrated over FPR from 0 to
    ``max_fpr`` (trapezoids, the curve interpolated at ``max_fpr``) and divided by ``max_fpr``, so a
    perfect map gives 1.0 and a map of noise (PRO = FPR, area ``max_fpr ** 2 / 2``) gives
    ``max_fpr / 2``, 0.15 at the default.

    Why per region: pixel AUROC lets one large defect outweigh many small ones; PRO counts a scratch
    of 30 pixels as much as a missing part of 3000. Why up to ``max_fpr``: beyond ~30 % of normal
    pixels flagged a map is useless for localisation, and the full-range area would be dominated by it.
    None when there are no defect regions or no normal pixels.
    """
    import cv2

    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr {max_fpr} must be in (0, 1]")
    if steps < 2:
        raise ValueError("aupro needs at least 2 thresholds")
    pairs = _masks_maps(masks, maps)
    regions: list[np.ndarray] = []  # each region's map values, sorted
    normal = []
    for g, m in pairs:
        normal.append(m[~g])
        if g.any():
            n, labelled = cv2.connectedComponents(g.astype(np.uint8), connectivity=8)
            regions.extend(np.sort(m[labelled == k]) for k in range(1, n))
    normal_sorted = np.sort(np.concatenate(normal))
    if not regions or normal_sorted.size == 0:
        return None
    lo = min(float(normal_sorted[0]), min(float(r[0]) for r in regions))
    hi = max(float(normal_sorted[-1]), max(float(r[-1]) for r in regions))
    thresholds = np.linspace(hi, lo, steps)  # descending: FPR and PRO both rise along the curve

    def above(sorted_values: np.ndarray) -> np.ndarray:
        return (sorted_values.size - np.searchsorted(sorted_values, thresholds, side="right")) / sorted_values.size

    fpr = above(normal_sorted)
    pro = np.mean([above(r) for r in regions], axis=0)
    fpr = np.r_[0.0, fpr, 1.0]  # nothing flagged, ..., everything flagged (threshold below the range)
    pro = np.r_[0.0, pro, 1.0]
    keep = fpr <= max_fpr
    x = np.r_[fpr[keep], max_fpr]
    y = np.r_[pro[keep], _polyline_at(fpr, pro, max_fpr)]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0) / max_fpr)
