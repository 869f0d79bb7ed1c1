from __future__ import annotations

import numpy as np

from agent.scoring import cosine_scores, decide, l2_normalize


def test_score_is_one_minus_max_cosine() -> None:
    bank = l2_normalize(np.array([[1.0, 0.0], [0.0, 1.0]], np.float32))
    scores, nearest = cosine_scores(np.array([[2.0, 0.0], [1.0, 1.0]], np.float32), bank)
    assert np.allclose(scores, [0.0, 1 - np.sqrt(0.5)], atol=1e-6)
    assert nearest[0] == 0


def test_confidence_is_one_half_exactly_at_the_threshold() -> None:
    assert decide(0.2, 0.2, 0.05) == ("ok", 0.5)


def test_confidence_grows_away_from_the_threshold_on_both_sides() -> None:
    v_far, c_far = decide(0.9, 0.2, 0.05)
    v_near, c_near = decide(0.21, 0.2, 0.05)
    assert v_far == v_near == "anomaly" and 0.5 < c_near < c_far <= 1.0
    v_ok, c_ok = decide(0.0, 0.2, 0.05)
    assert v_ok == "ok" and 0.5 < c_ok <= 1.0


def test_extreme_scores_do_not_overflow() -> None:
    assert decide(1e9, 0.0, 1e-9)[1] == 1.0
    assert decide(-1e9, 0.0, 1e-9)[1] == 1.0
