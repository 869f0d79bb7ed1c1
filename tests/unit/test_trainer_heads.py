import math

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from trainer.heads import AdaCos, ArcFace, L2Softmax, adacos_initial_scale, make_head  # noqa: E402


def _data(n: int = 8, d: int = 6, k: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), (np.arange(n) % k).astype(np.int32)


@pytest.mark.parametrize("loss", ["l2softmax", "arcface", "adacos", "adacos-fixed"])
def test_heads_give_logits_and_normalised_class_weights(loss):
    x, y = _data()
    head = make_head(loss, 3)
    logits = keras.ops.convert_to_numpy(head([x, y], training=True))
    assert logits.shape == (8, 3)
    assert np.all(np.isfinite(logits))
    w = head.class_weights()
    assert w.shape == (6, 3)
    assert np.allclose(np.linalg.norm(w, axis=0), 1.0, atol=1e-5)
    assert keras.ops.convert_to_numpy(head(x)).shape == (8, 3)


def test_arcface_margin_lowers_only_the_true_class_logit():
    x, y = _data()
    head = ArcFace(3, s=30.0, m=0.5)
    with_margin = keras.ops.convert_to_numpy(head([x, y], training=True))
    plain = keras.ops.convert_to_numpy(head(x))
    cos = plain / 30.0
    onehot = np.eye(3, dtype=bool)[y]
    expected = 30.0 * np.cos(np.minimum(np.arccos(np.clip(cos[onehot], -1, 1)) + 0.5, math.pi))
    assert np.allclose(with_margin[onehot], expected, atol=1e-3)
    assert np.all(with_margin[onehot] < plain[onehot])
    assert np.allclose(with_margin[~onehot], plain[~onehot], atol=1e-5)


def test_l2softmax_scales_normalised_features():
    x, _ = _data()
    head = L2Softmax(3, alpha=10.0)
    a = keras.ops.convert_to_numpy(head(x))
    b = keras.ops.convert_to_numpy(head(x * 7.0))
    assert np.allclose(a, b, atol=1e-4)  # only the direction of the embedding matters


def test_adacos_updates_its_scale_by_the_rule_and_fixed_does_not():
    x, y = _data(32, 6, 3)
    head = AdaCos(3, adaptive=True)
    head.build([(None, 6), (None,)])
    s0 = float(keras.ops.convert_to_numpy(head.scale))
    assert s0 == pytest.approx(adacos_initial_scale(3))
    cos = keras.ops.convert_to_numpy(head.cosine(x))
    head([x, y], training=True)
    onehot = np.eye(3)[y]
    b_avg = np.mean(np.sum((1 - onehot) * np.exp(s0 * cos), axis=1))
    theta_med = np.median(np.arccos(np.sum(onehot * cos, axis=1)))
    expected = np.log(b_avg) / np.cos(min(math.pi / 4, theta_med))
    assert float(keras.ops.convert_to_numpy(head.scale)) == pytest.approx(expected, rel=1e-4)

    fixed = AdaCos(3, adaptive=False)
    fixed([x, y], training=True)
    assert float(keras.ops.convert_to_numpy(fixed.scale)) == pytest.approx(s0)


def test_adacos_two_classes_starts_above_zero():
    assert adacos_initial_scale(2) > 0.5  # sqrt(2) * log(1) = 0 would never move
