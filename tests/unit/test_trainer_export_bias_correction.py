"""int8 bias correction in trainer.export: the offsets it moves into the biases are exactly the
mean error that int8 kernel rounding adds, and the model handed in is left as it was."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from trainer.export import _conv_pairs, _folded_kernel, _int8_per_channel, bias_corrected  # noqa: E402


def _conv_bn(depthwise: bool, seed: int = 0) -> keras.Model:
    """conv (no bias, 'valid' so a flat picture gives a flat output) -> BatchNorm with large,
    uneven gains like MobileNetV2's first depthwise block."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((9, 9, 4))
    conv = (
        keras.layers.DepthwiseConv2D(3, use_bias=False, name="conv")
        if depthwise
        else keras.layers.Conv2D(6, 3, use_bias=False, name="conv")
    )
    bn = keras.layers.BatchNormalization(name="bn")
    model = keras.Model(inp, bn(conv(inp)))
    rng = np.random.default_rng(seed)
    c = bn.gamma.shape[0]
    bn.set_weights([rng.uniform(0.5, 20, c), rng.normal(0, 1, c), rng.normal(0, 1, c), rng.uniform(0.01, 1, c)])
    return model


def _with_int8_kernel(model: keras.Model) -> keras.Model:
    """A copy whose folded kernel is exactly what the converter stores (int8 per channel)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    conv, bn = copy.get_layer("conv"), copy.get_layer("bn")
    folded, axes = _folded_kernel(conv, bn)
    k = folded / np.where(conv.kernel.numpy() == 0, 1, conv.kernel.numpy())
    conv.kernel.assign(_int8_per_channel(folded, axes) / np.where(k == 0, 1, k))
    return copy


@pytest.mark.parametrize("depthwise", [False, True])
def test_correction_cancels_the_kernel_rounding_offset_on_flat_pictures(depthwise: bool) -> None:
    model = _conv_bn(depthwise)
    flat = np.ones((4, 9, 9, 4), np.float32) * np.linspace(1.6, 1.9, 4, dtype=np.float32)[:, None, None, None]
    want = model.predict(flat, verbose=0)

    corrected = bias_corrected(model, flat)
    rounded_plain = _with_int8_kernel(model).predict(flat, verbose=0)
    rounded_corrected = _with_int8_kernel(corrected).predict(flat, verbose=0)

    before = np.abs(rounded_plain - want).max()
    after = np.abs(rounded_corrected - want).max()
    assert before > 1e-3  # the rounding offset is real here, so the check below can fail
    # The offset grows with the input level; one correction for levels 1.6-1.9 leaves at most
    # 0.15 / 1.9 of it (the distance to their mean level).
    assert after < 0.1 * before


def test_correction_is_exact_for_one_flat_level() -> None:
    model = _conv_bn(depthwise=True)
    flat = np.full((2, 9, 9, 4), 1.7, np.float32)
    corrected = bias_corrected(model, flat)
    got = _with_int8_kernel(corrected).predict(flat, verbose=0)
    np.testing.assert_allclose(got, model.predict(flat, verbose=0), atol=1e-4)


def test_only_biases_move_and_the_original_is_untouched() -> None:
    model = _conv_bn(depthwise=False)
    before = [w.copy() for w in model.get_weights()]
    x = np.random.default_rng(1).uniform(-1, 1, (3, 9, 9, 4)).astype(np.float32)
    corrected = bias_corrected(model, x)
    for w, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, b)
    names = [v.path for v in corrected.weights]
    changed = [n for n, a, b in zip(names, corrected.get_weights(), before, strict=True) if not np.array_equal(a, b)]
    assert changed == ["bn/beta"]


def test_tiny_mobilenet_pairs_every_conv_with_its_batchnorm() -> None:
    net = keras.applications.MobileNetV2(input_shape=(64, 64, 3), alpha=0.35, include_top=False, weights=None)
    pairs = _conv_pairs(net)
    convs = [lay for lay in net.layers if isinstance(lay, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))]
    assert len(pairs) == len(convs) == 52
    assert all(bn is not None and isinstance(bn, keras.layers.BatchNormalization) for _, bn in pairs)
