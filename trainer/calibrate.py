"""The threshold, from normal images only.

A share of train/good is held out of the bank built from the rest (the fit share); their scores
(1 - max cosine to that bank) are what a normal frame scores on the device. The threshold is the
held-out score quantile at ``1 - far`` (taken at the next higher sample, so the held-out false-alarm
rate never exceeds the target), and the confidence scale is the held-out scores' standard deviation.

Once the threshold is set, the held-out normals join the bank that ships (:func:`bank_and_threshold`):
a larger bank can only raise a frame's best match, so normal scores fall and the false-alarm rate at
this threshold stays at or under the target (exactly so when the bank is not reduced; k-center
reduction keeps it approximately so). Measured on screw, zero-training, float: a bank of the 80 % fit
share scored image AUROC 0.907-0.943 depending on which 20 % the seed held out, all of train/good 0.939.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_FAR = 0.01


def bank_and_threshold(
    fit_emb: np.ndarray, held_emb: np.ndarray, far: float = DEFAULT_FAR, size: int | None = None
) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """(float16 bank of fit + held-out normals, its reduction entry, the threshold entry from the
    held-out normals scored against a bank of the fit normals alone)."""
    from agent.scoring import cosine_scores
    from trainer.bank import build_bank

    fit_bank, _ = build_bank(fit_emb, size)
    held_scores, _ = cosine_scores(held_emb, fit_bank.astype(np.float32))
    threshold = calibrate(held_scores, far)
    threshold["bank_for_calibration"] = f"the {len(fit_emb)} fit normals ({fit_bank.shape[0]} after reduction)"
    bank16, reduction = build_bank(np.concatenate([fit_emb, held_emb]), size)
    return bank16, reduction, threshold


def calibrate(held_scores: np.ndarray, far: float = DEFAULT_FAR) -> dict[str, Any]:
    """The manifest's ``threshold`` entry: value, scale, method and held-out statistics."""
    scores = np.asarray(held_scores, np.float64).reshape(-1)
    if scores.size < 2:
        raise ValueError("calibration needs at least 2 held-out normal scores; hold out a larger share")
    if not 0.0 < far < 1.0:
        raise ValueError(f"target false-alarm rate {far} must be in (0, 1)")
    value = float(np.quantile(scores, 1.0 - far, method="higher"))
    scale = float(max(scores.std(), 1e-6))
    return {
        "value": value,
        "scale": scale,
        "method": "held-out normal score quantile at 1 - target false-alarm rate (next higher sample)",
        "target_false_alarm_rate": far,
        "held_out": held_out_stats(scores, value),
    }


def held_out_stats(scores: np.ndarray, threshold: float) -> dict[str, Any]:
    return {
        "count": int(scores.size),
        "mean": float(scores.mean()),
        "std": float(scores.std()),
        "min": float(scores.min()),
        "median": float(np.median(scores)),
        "p90": float(np.quantile(scores, 0.9)),
        "max": float(scores.max()),
        "false_alarm_rate": float(np.mean(scores > threshold)),
    }


DEFAULT_FOLDS = 5
TAIL_SHARE = 0.1  # the upper 10 % of normal scores model the tail (peaks over threshold)
MIN_EXCEEDANCES = 10  # fewer than this and the tail fit is not trusted: empirical quantile instead
SHAPE_BOUNDS = (-0.5, 0.5)  # generalised Pareto shape kept in a range a few dozen points can support
BOOTSTRAP = 200


def fold_indices(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """``folds`` disjoint, seeded, near-equal index sets covering range(n)."""
    if n < 2:
        raise ValueError("calibration needs at least 2 normal pictures")
    k = max(2, min(folds, n))
    order = np.random.default_rng([seed, 5]).permutation(n)
    return [np.sort(part) for part in np.array_split(order, k)]


def _fit_tail(exceedances: np.ndarray) -> tuple[float, float]:
    """(shape, scale) of a generalised Pareto fitted to the exceedances, shape kept in SHAPE_BOUNDS."""
    from scipy import stats

    shape, _, scale = stats.genpareto.fit(exceedances, floc=0.0)
    if not SHAPE_BOUNDS[0] <= shape <= SHAPE_BOUNDS[1] or not np.isfinite(scale):
        shape = float(np.clip(np.nan_to_num(shape), *SHAPE_BOUNDS))
        _, _, scale = stats.genpareto.fit(exceedances, fc=shape, floc=0.0)
    return float(shape), float(max(scale, 1e-12))


def _tail_far(scores: np.ndarray, threshold: float) -> float:
    """The false-alarm rate at ``threshold`` that a tail fitted to ``scores`` predicts."""
    from scipy import stats

    u = float(np.quantile(scores, 1.0 - TAIL_SHARE))
    exc = scores[scores > u] - u
    if exc.size < MIN_EXCEEDANCES or threshold <= u:
        return float(np.mean(scores > threshold))
    shape, scale = _fit_tail(exc)
    return float(exc.size / scores.size * stats.genpareto.sf(threshold - u, shape, 0.0, scale))


def tail_threshold(scores: np.ndarray, far: float = DEFAULT_FAR, seed: int = 0) -> dict[str, Any]:
    """The manifest's ``threshold`` entry from normal scores, by modelling their upper tail.

    The top TAIL_SHARE of the scores, less the quantile u where that share starts, are fitted with a
    generalised Pareto distribution (peaks over threshold, the standard model of a distribution's
    tail); the threshold is where the fitted tail leaves ``far`` of normal pictures above it. An
    empirical quantile at 1 % of 300 pictures rests on the 3 highest scores; the fit uses the top 30.
    The uncertainty: the same fit on bootstrap resamples predicts a false-alarm rate at this
    threshold each; their median and 5-95 % range go into the manifest.
    """
    from scipy import stats

    s = np.sort(np.asarray(scores, np.float64).reshape(-1))
    if not 0.0 < far < 1.0:
        raise ValueError(f"target false-alarm rate {far} must be in (0, 1)")
    u = float(np.quantile(s, 1.0 - TAIL_SHARE))
    exc = s[s > u] - u
    entry: dict[str, Any]
    if exc.size >= MIN_EXCEEDANCES and far < TAIL_SHARE:
        shape, scale = _fit_tail(exc)
        zeta = exc.size / s.size
        value = u + float(stats.genpareto.ppf(1.0 - far / zeta, shape, 0.0, scale))
        method = "generalised Pareto fit to the upper 10 % of out-of-fold normal scores, at the target rate"
        entry = {"tail": {"u": u, "shape": shape, "scale": scale, "exceedances": int(exc.size)}}
    else:
        value = float(np.quantile(s, 1.0 - far, method="higher"))
        method = "empirical quantile of out-of-fold normal scores (too few for a tail fit)"
        entry = {}
    return {
        "value": float(value),
        "scale": float(max(s.std(), 1e-6)),
        "method": method,
        "target_false_alarm_rate": far,
        "expected_false_alarm_rate": expected_far(s, value, seed),
        **entry,
        "normals": held_out_stats(s, value),
    }


def out_of_fold_scores(
    emb: np.ndarray,
    patch_feats: np.ndarray | None,
    folds: list[np.ndarray],
    patch_rows: int,
    bank_size: int | None = None,
    seed: int = 0,
    top_k: int = 1,
) -> dict[str, np.ndarray]:
    """Every normal picture scored against banks built without its fold, the same way and to the same
    size as the banks that ship: what a new normal frame scores on the device. Keys ``gem`` (1 - max
    cosine, (n,)) and, with patch features, ``patch`` (largest cell distance, (n,)) and ``cells``
    (every cell's distance, (n, cells))."""
    from agent.patches import PatchBank, nearest_distances, worst_cells
    from agent.scoring import cosine_scores
    from trainer.bank import build_bank, patch_coreset

    n = emb.shape[0]
    gem = np.zeros(n)
    out: dict[str, np.ndarray] = {"gem": gem}
    if patch_feats is not None:
        out["cells"] = np.zeros(patch_feats.shape[:2], np.float32)
    for i, fold in enumerate(folds):
        others = np.concatenate([f for j, f in enumerate(folds) if j != i])
        bank, _ = build_bank(emb[others], bank_size)
        gem[fold] = cosine_scores(emb[fold], bank.astype(np.float32))[0]
        if "cells" in out:
            patch_bank = PatchBank.of(patch_coreset(patch_feats[others], patch_rows, seed))
            for k in fold:
                out["cells"][k] = nearest_distances(patch_feats[k].astype(np.float32), patch_bank)
    if "cells" in out:
        out["patch"] = worst_cells(out["cells"], top_k)
    return out


def expected_far(scores: np.ndarray, threshold: float, seed: int = 0) -> dict[str, Any]:
    """What the tail fit to normal ``scores`` predicts for ``threshold``: median and 5-95 % over
    bootstrap resamples (the manifest's ``expected_false_alarm_rate``)."""
    s = np.sort(np.asarray(scores, np.float64).reshape(-1))
    rng = np.random.default_rng([seed, 31])
    boot = np.array([_tail_far(np.sort(rng.choice(s, s.size)), threshold) for _ in range(BOOTSTRAP)])
    return {
        "estimate": float(np.median(boot)),
        "interval_90": [float(np.quantile(boot, 0.05)), float(np.quantile(boot, 0.95))],
        "how": f"the tail fit on {BOOTSTRAP} bootstrap resamples of the normal scores",
    }


THRESHOLD_RULES = ("f1", "recall")


def threshold_from_defects(
    normal_scores: np.ndarray,
    defect_scores: np.ndarray,
    rule: str = "f1",
    target_recall: float = 0.9,
    seed: int = 0,
) -> dict[str, Any]:
    """A threshold placed with a few labelled defects (``yugami-train --defects DIR``).

    ``f1``: the threshold of the best F1 between the out-of-fold normal scores and the defects'.
    ``recall``: the highest threshold that still flags ``target_recall`` of the defects. Either way
    the manifest keeps what the normal-only tail fit predicts for the false-alarm rate there."""
    from trainer.operating import f1_max, operating_point

    normal = np.asarray(normal_scores, np.float64).reshape(-1)
    defects = np.asarray(defect_scores, np.float64).reshape(-1)
    if defects.size == 0:
        raise ValueError("--defects: no defective pictures to place the threshold with")
    labels = np.r_[np.zeros(normal.size, int), np.ones(defects.size, int)]
    scores = np.r_[normal, defects]
    if rule == "f1":
        value = float(f1_max(labels, scores)["f1_max_threshold"])
    elif rule == "recall":
        if not 0.0 < target_recall <= 1.0:
            raise ValueError(f"--target-recall {target_recall} must be in (0, 1]")
        k = int(np.ceil(target_recall * defects.size))
        cut = float(np.sort(defects)[defects.size - k])  # the k-th highest defect score must stay above
        below = scores[scores < cut]
        value = float((cut + below.max()) / 2.0) if below.size else float(np.nextafter(cut, -np.inf))
    else:
        raise ValueError(f"threshold rule {rule!r}: use one of {list(THRESHOLD_RULES)}")
    point = operating_point(labels, scores, value)
    return {
        "value": value,
        "scale": float(max(normal.std(), 1e-6)),
        "method": f"placed with {defects.size} labelled defects: "
        + ("best F1 against the out-of-fold normals" if rule == "f1" else f"recall >= {target_recall} on them"),
        "on_defects": {
            "count": int(defects.size),
            "recall": point["recall_at_threshold"],
            "normals_false_alarm_rate": point["far_at_threshold"],
        },
        "expected_false_alarm_rate": expected_far(normal, value, seed),
        "normals": held_out_stats(normal, value),
    }
