"""trainer.operating: operating point, F1 max, recall at a false-alarm rate, pixel AUROC and AUPRO,
against figures worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer.operating import aupro, f1_max, operating_point, pixel_auroc, recall_at_far

# 4 good images, 3 defective; by descending score: 0.9 D, 0.7 D, 0.6 G, 0.5 D, 0.3 G, 0.2 G, 0.1 G
LABELS = [0, 0, 0, 0, 1, 1, 1]
SCORES = [0.1, 0.2, 0.3, 0.6, 0.5, 0.7, 0.9]


def test_operating_point_between_scores():
    op = operating_point(LABELS, SCORES, 0.4)
    # flagged: 0.5 D, 0.6 G, 0.7 D, 0.9 D -> TP 3, FP 1, FN 0
    assert op["recall_at_threshold"] == pytest.approx(1.0)
    assert op["far_at_threshold"] == pytest.approx(0.25)
    assert op["precision_at_threshold"] == pytest.approx(0.75)
    assert op["f1_at_threshold"] == pytest.approx(6 / 7)


def test_operating_point_is_strict_at_a_score():
    op = operating_point(LABELS, SCORES, 0.5)  # 0.5 itself is not above 0.5: TP 2, FP 1, FN 1
    assert op["recall_at_threshold"] == pytest.approx(2 / 3)
    assert op["far_at_threshold"] == pytest.approx(0.25)
    assert op["precision_at_threshold"] == pytest.approx(2 / 3)
    assert op["f1_at_threshold"] == pytest.approx(2 / 3)


def test_operating_point_flagging_nothing_and_one_class():
    op = operating_point(LABELS, SCORES, 5.0)
    assert op == {
        "recall_at_threshold": 0.0,
        "far_at_threshold": 0.0,
        "precision_at_threshold": 0.0,
        "f1_at_threshold": 0.0,
    }
    goods_only = operating_point([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.6], 0.25)
    assert goods_only["recall_at_threshold"] is None
    assert goods_only["far_at_threshold"] == pytest.approx(0.5)


def test_operating_point_rejects_bad_input():
    with pytest.raises(ValueError, match="length"):
        operating_point([0, 1], [0.1, 0.2, 0.3], 0.2)
    with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
        operating_point([0, 2], [0.1, 0.2], 0.2)


def test_f1_max_hand_computed_and_reproduced_by_operating_point():
    # cuts (flag the top k): k=1 0.5, k=2 0.8, k=3 4/6, k=4 6/7, k=5 6/8, k=6 6/9, k=7 6/10
    best = f1_max(LABELS, SCORES)
    assert best["f1_max"] == pytest.approx(6 / 7)
    assert best["f1_max_threshold"] == pytest.approx(0.4)  # midpoint of 0.3 and 0.5
    assert operating_point(LABELS, SCORES, best["f1_max_threshold"])["f1_at_threshold"] == best["f1_max"]


def test_f1_max_does_not_split_ties():
    labels, scores = [0, 1, 1, 0], [0.5, 0.5, 0.9, 0.1]
    # flag {0.9}: 2/3; flag {0.9, 0.5, 0.5}: TP 2 FP 1 -> 4/5; flag all: 4/6. A threshold at 0.5 cannot
    # flag the defect at 0.5 without the good one.
    best = f1_max(labels, scores)
    assert best["f1_max"] == pytest.approx(0.8)
    assert best["f1_max_threshold"] == pytest.approx(0.3)
    assert operating_point(labels, scores, best["f1_max_threshold"])["f1_at_threshold"] == best["f1_max"]


def test_f1_max_flag_everything_threshold_lies_below_the_lowest_score():
    labels, scores = [1, 0, 1], [0.1, 0.2, 0.3]
    # top 1: 2/3; top 2: 2/4; all: TP 2 FP 1 -> 4/5
    best = f1_max(labels, scores)
    assert best["f1_max"] == pytest.approx(0.8)
    assert best["f1_max_threshold"] < 0.1
    assert operating_point(labels, scores, best["f1_max_threshold"])["f1_at_threshold"] == best["f1_max"]


def test_f1_max_ties_in_f1_take_the_highest_threshold():
    labels, scores = [1, 0, 0, 1], [0.9, 0.8, 0.7, 0.6]
    # top 1: 2/3 and all four: 4/6 = 2/3 -> the higher threshold (fewer false alarms)
    best = f1_max(labels, scores)
    assert best["f1_max"] == pytest.approx(2 / 3)
    assert best["f1_max_threshold"] == pytest.approx(0.85)


def test_f1_max_matches_sklearn_and_reproduces_on_random_float32_scores():
    from sklearn.metrics import precision_recall_curve

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    scores = (rng.normal(size=300) + labels).astype(np.float32)
    scores[:40] = np.round(scores[:40], 1)  # some ties
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.nanmax(2 * p * r / (p + r))
    best = f1_max(labels, scores)
    assert best["f1_max"] == pytest.approx(expected, abs=1e-12)
    threshold = json.loads(json.dumps(best))["f1_max_threshold"]  # survives the JSON report
    assert operating_point(labels, scores, threshold)["f1_at_threshold"] == best["f1_max"]


def test_recall_at_far_on_flat_and_vertical_roc_segments():
    # ROC: (0,0) (0,1/3) (0,2/3) (1/4,2/3) (1/4,1) (1/2,1) (3/4,1) (1,1)
    assert recall_at_far(LABELS, SCORES, 0.0)["recall"] == pytest.approx(2 / 3)
    assert recall_at_far(LABELS, SCORES, 0.1)["recall"] == pytest.approx(2 / 3)
    assert recall_at_far(LABELS, SCORES, 0.25)["recall"] == pytest.approx(1.0)  # top of the vertical step
    out = recall_at_far(LABELS, SCORES, 0.05)
    assert out["resolution"] == {"far": pytest.approx(0.25), "recall": pytest.approx(1 / 3)}
    assert out["below_resolution"] is True
    assert out["far"] == 0.05


def test_recall_at_far_interpolates_a_tied_diagonal():
    # goods 0.1, 0.5; defects 0.5, 0.9 -> ROC (0,0) (0,0.5) (0.5,1) (1,1): the tie at 0.5 is a diagonal
    labels, scores = [0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]
    assert recall_at_far(labels, scores, 0.25)["recall"] == pytest.approx(0.75)
    assert recall_at_far(labels, scores, 0.1)["recall"] == pytest.approx(0.6)
    assert recall_at_far(labels, scores, 0.5)["below_resolution"] is False


def test_recall_at_far_resolution_of_41_good_images():
    labels = [0] * 41 + [1] * 20
    scores = list(np.linspace(0.0, 0.4, 41)) + list(np.linspace(0.3, 1.0, 20))
    out = recall_at_far(labels, scores, 0.01)
    assert out["resolution"]["far"] == pytest.approx(1 / 41)
    assert out["resolution"]["recall"] == pytest.approx(1 / 20)
    assert out["below_resolution"] is True  # 0.01 is less than one of 41 images
    assert recall_at_far(labels, scores, 0.05)["below_resolution"] is False


def test_recall_at_far_needs_both_classes():
    with pytest.raises(ValueError, match="both"):
        recall_at_far([0, 0], [0.1, 0.2], 0.01)


def test_pixel_auroc_hand_computed_with_a_none_mask():
    mask = np.array([[1, 0], [0, 0]], bool)
    amap = np.array([[0.5, 0.6], [0.1, 0.2]])
    # one defect pixel (0.5) against 0.6, 0.1, 0.2: it outranks 2 of 3
    assert pixel_auroc([mask], [amap]) == pytest.approx(2 / 3)
    # a good image adds normal pixels 0.0, 0.0, 0.7, 0.3: it outranks 0.1, 0.2, 0.0, 0.0, 0.3 of 7
    good = np.array([[0.0, 0.0], [0.7, 0.3]])
    assert pixel_auroc([mask, None], [amap, good]) == pytest.approx(5 / 7)


def test_pixel_auroc_perfect_inverted_and_one_class():
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:6] = True
    assert pixel_auroc([mask], [mask.astype(float)]) == pytest.approx(1.0)
    assert pixel_auroc([mask], [1.0 - mask]) == pytest.approx(0.0)
    assert pixel_auroc([None], [np.ones((4, 4))]) is None
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc([mask], [np.zeros((8, 7))])


def _blob_masks(n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    masks = []
    for _ in range(n):
        m = np.zeros((size, size), bool)
        for _ in range(int(rng.integers(1, 4))):
            y, x = rng.integers(0, size - 8, 2)
            h, w = rng.integers(2, 8, 2)
            m[y : y + h, x : x + w] = True
        masks.append(m)
    return masks


def test_aupro_perfect_map_is_one():
    rng = np.random.default_rng(0)
    masks = [*_blob_masks(6, 48, rng), None]
    maps = [m.astype(float) for m in masks[:-1]] + [np.zeros((48, 48))]
    assert aupro(masks, maps) == pytest.approx(1.0, abs=1e-3)


def test_aupro_noise_map_is_half_max_fpr():
    rng = np.random.default_rng(1)
    masks = _blob_masks(20, 64, rng)
    maps = [rng.random((64, 64)) for _ in masks]
    assert aupro(masks, maps) == pytest.approx(0.15, abs=0.02)
    assert aupro(masks, maps, max_fpr=0.1) == pytest.approx(0.05, abs=0.01)


def test_aupro_two_regions_hand_computed():
    # Region A: one pixel at 1.0. Region B: two diagonal neighbours (one region under 8-connectivity,
    # two under 4) at 1.0 and 0.25. One normal pixel at 0.5, the other 12 + 16 (a good image) at 0.0.
    mask = np.zeros((4, 4), bool)
    amap = np.zeros((4, 4))
    mask[0, 0] = True
    amap[0, 0] = 1.0
    mask[2, 2] = mask[3, 3] = True
    amap[2, 2], amap[3, 3] = 1.0, 0.25
    amap[0, 3] = 0.5
    masks, maps = [mask, None], [amap, np.zeros((4, 4))]
    n_normal = 13 + 16
    # curve: (0,0) -> 0.5 <= t < 1: PRO (1 + 1/2) / 2 = 0.75 at FPR 0 -> 0.25 <= t < 0.5: FPR 1/29
    # -> 0 <= t < 0.25: PRO 1 -> everything: (1, 1)
    fpr1 = 1 / n_normal
    expected = (0.75 * fpr1 + 1.0 * (0.3 - fpr1)) / 0.3
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-9)
    # below FPR 1/29 the curve is flat at 0.75
    assert aupro(masks, maps, max_fpr=0.02) == pytest.approx(0.75, abs=1e-9)
    # pixel-wise the same map would score 2/3 of the defect pixels at 0.5 <= t < 1, not 0.75
    assert aupro(masks, maps, max_fpr=0.02) != pytest.approx(2 / 3, abs=1e-3)


def test_aupro_interpolates_a_diagonal_at_max_fpr():
    # 1 region pixel at 0.6 and 4 normal pixels at 0.0, 0.2, 0.4, 1.0; steps=2: thresholds 1.0 and 0.0
    # -> points (0,0), (0,0), (3/4,1), (1,1). At max_fpr 0.3 the segment (0,0)-(3/4,1) gives PRO 0.4:
    # area 0.3 * 0.4 / 2 = 0.06, normalised 0.2.
    mask = np.array([[True, False, False, False, False]])
    amap = np.array([[0.6, 0.0, 0.2, 0.4, 1.0]])
    assert aupro([mask], [amap], max_fpr=0.3, steps=2) == pytest.approx(0.2)


def test_aupro_undefined_without_regions():
    assert aupro([None], [np.random.default_rng(0).random((8, 8))]) is None


def test_metrics_adds_operating_keys_and_keeps_the_old_ones():
    from trainer.evaluate import metrics

    types = ["good"] * 4 + ["scratch"] * 3
    m = metrics(types, np.asarray(SCORES, np.float32), 0.4)
    for key in ("image_auroc", "per_defect_auroc", "threshold", "false_alarm_rate", "miss_rate", "n_good", "n_defect"):
        assert key in m
    assert m["false_alarm_rate"] == pytest.approx(0.25)
    assert m["far_at_threshold"] == pytest.approx(0.25)
    assert m["recall_at_threshold"] == pytest.approx(1.0)
    assert m["precision_at_threshold"] == pytest.approx(0.75)
    assert m["f1_at_threshold"] == pytest.approx(6 / 7)
    assert m["f1_max"] == pytest.approx(6 / 7)
    assert m["f1_max_threshold"] == pytest.approx(0.4)
    assert m["recall_at_far"] == {"0.01": pytest.approx(2 / 3), "0.05": pytest.approx(2 / 3)}
    assert m["resolution"] == {"far": pytest.approx(0.25), "recall": pytest.approx(1 / 3)}
    json.dumps(m)  # the report is JSON


def test_metrics_one_class_gives_none():
    from trainer.evaluate import metrics

    m = metrics(["good"] * 3, np.array([0.1, 0.2, 0.3]), 0.25)
    assert m["false_alarm_rate"] == pytest.approx(1 / 3)
    for key in ("recall_at_threshold", "far_at_threshold", "f1_max", "f1_max_threshold", "recall_at_far", "resolution"):
        assert m[key] is None
