"""trainer.calibrate: folds, the tail threshold and its promise, thresholds placed with defects."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.calibrate import expected_far, fold_indices, tail_threshold, threshold_from_defects


def test_folds_partition_every_picture_once():
    folds = fold_indices(23, 5, seed=1)
    assert len(folds) == 5 and sorted(np.concatenate(folds).tolist()) == list(range(23))
    assert max(len(f) for f in folds) - min(len(f) for f in folds) <= 1
    assert [f.tolist() for f in folds] == [f.tolist() for f in fold_indices(23, 5, seed=1)]


def test_tail_threshold_on_an_exponential_lands_near_its_true_quantile():
    # Exp(1): P(X > t) = exp(-t), so the 1 % threshold is ln 100 = 4.61; an empirical quantile of 400
    # points rests on 4 of them, the tail fit on 40.
    scores = np.random.default_rng(3).exponential(size=400)
    entry = tail_threshold(scores, far=0.01, seed=0)
    assert entry["value"] == pytest.approx(np.log(100), rel=0.2)
    assert entry["tail"]["exceedances"] == 40
    low, high = entry["expected_false_alarm_rate"]["interval_90"]
    assert low < 0.01 < high and entry["expected_false_alarm_rate"]["estimate"] == pytest.approx(0.01, rel=0.5)


def test_tail_threshold_falls_back_to_the_quantile_with_few_scores():
    entry = tail_threshold(np.arange(20.0), far=0.05)
    assert "empirical" in entry["method"] and entry["value"] == 19.0


def test_expected_far_rises_as_the_threshold_falls():
    scores = np.random.default_rng(4).normal(size=300)
    assert expected_far(scores, 1.5)["estimate"] > expected_far(scores, 2.5)["estimate"]


def test_threshold_for_a_target_recall_keeps_that_share_of_defects_above_it():
    normal = np.arange(10.0)  # 0 .. 9
    defects = np.array([5.0, 6.0, 7.0, 8.0, 20.0])
    entry = threshold_from_defects(normal, defects, rule="recall", target_recall=0.8)
    assert entry["value"] == 5.5  # the 4th highest defect (6) stays above; the next score below is 5
    assert entry["on_defects"]["recall"] == 0.8
    assert entry["normals"]["false_alarm_rate"] == pytest.approx(0.4)  # 6, 7, 8, 9 of 10 normals


def test_threshold_at_best_f1_separates_what_can_be_separated():
    normal = np.linspace(0.0, 1.0, 50)
    defects = np.array([2.0, 3.0, 4.0])
    entry = threshold_from_defects(normal, defects, rule="f1")
    assert 1.0 <= entry["value"] < 2.0 and entry["on_defects"]["recall"] == 1.0
    with pytest.raises(ValueError):
        threshold_from_defects(normal, defects, rule="median")
