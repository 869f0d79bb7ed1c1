"""The threshold, from normal images only.

A share of train/good is held out of the bank; their scores (1 - max cosine to the bank) are
what a normal frame scores on the device. The threshold is the held-out score quantile at
``1 - far`` (taken at the next higher sample, so the held-out false-alarm rate never exceeds the
target), and the confidence scale is the held-out scores' standard deviation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_FAR = 0.01


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
