import numpy as np
import pytest

from agent.bundle import npz_bytes
from trainer.bank import BANK_BUDGET_BYTES, build_bank, kcenter_greedy, max_bank_size
from trainer.calibrate import calibrate


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_kcenter_covers_every_point_within_its_radius():
    x = _unit(np.random.default_rng(0).normal(size=(300, 16)))
    core = kcenter_greedy(x, 40)
    assert len(core.indices) == 40 and len(set(core.indices.tolist())) == 40
    dist = 1.0 - x @ x[core.indices].T
    assert np.isclose(dist.min(axis=1).max(), core.radius, atol=1e-5)
    # Greedy k-center beats a random subset of the same size at covering.
    rand = np.random.default_rng(1).choice(300, 40, replace=False)
    assert core.radius < (1.0 - x @ x[rand].T).min(axis=1).max()


def test_kcenter_keeps_the_outlier():
    x = _unit(np.vstack([np.random.default_rng(0).normal(0, 0.01, (50, 8)) + 1.0, -np.ones((1, 8))]))
    assert 50 in kcenter_greedy(x, 2).indices


def test_bank_stays_under_one_megabyte():
    dim = 1280
    x = np.random.default_rng(0).normal(size=(max_bank_size(dim) + 200, dim))
    bank, reduction = build_bank(x)
    assert bank.dtype == np.float16
    assert bank.shape[0] == max_bank_size(dim) < x.shape[0]
    assert len(npz_bytes({"bank": bank})) < BANK_BUDGET_BYTES
    assert reduction["method"].startswith("greedy k-center")
    small, red2 = build_bank(x[:10], size=50)
    assert small.shape[0] == 10 and red2["method"].startswith("none")


def test_threshold_meets_the_target_false_alarm_rate():
    scores = np.random.default_rng(0).gamma(2.0, 0.01, 500)
    entry = calibrate(scores, far=0.05)
    assert np.mean(scores > entry["value"]) <= 0.05
    assert np.mean(scores >= entry["value"]) > 0.04  # not needlessly high
    assert entry["scale"] == pytest.approx(scores.std())
    assert entry["held_out"]["count"] == 500
    assert entry["held_out"]["false_alarm_rate"] <= 0.05


def test_calibration_refuses_too_few_scores():
    with pytest.raises(ValueError, match="at least 2"):
        calibrate(np.array([0.1]))
