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
