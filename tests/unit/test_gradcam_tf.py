"""The closed-form Grad-CAM (numpy, from TFLite outputs) against TensorFlow's GradientTape on the same
Keras model, and the int8 bundle's heat map against the float one."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.bundle import Bundle, load_bundle, write_bundle
from agent.gradcam import GradCamError, anomaly_cam, class_cam, class_cams, class_names
from agent.preprocess import Preprocessing, preprocess
from agent.scoring import Scorer
from tests.builders import TINY_SIZE, plain_part_images, tiny_embedder

CLASSES = ["normal", "line", "distortion"]


def dark_spot(img: np.ndarray, seed: int) -> tuple[np.ndarray, tuple[float, float]]:
    """A clear local defect (a dark spot of radius 10 px) and its centre as (row, col) in the 96 px frame.

    Dark, not white: a white spot lies outside the activation ranges the int8 model was calibrated on
    (the parts are grey), so int8 clips it; that is a property of calibration, not of Grad-CAM.
    """
    rng = np.random.default_rng(seed)
    x, y = int(rng.integers(20, 76)), int(rng.integers(20, 76))
    out = img.copy()
    cv2.circle(out, (x, y), 10, (0, 0, 0), -1)
    return out, (y, x)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("tensorflow")
    from trainer.export import export_float, export_int8, tflite_manifest

    pre = Preprocessing(input_size=TINY_SIZE)
    model = tiny_embedder(seed=0)
    normals = [preprocess(img, pre) for img in plain_part_images(40, seed=0)]
    bank, _ = model.predict(np.stack(normals[:30]), verbose=0)
    kernel, bias = model.get_layer("projection").get_weights()
    centres = np.random.default_rng(5).normal(size=(bank.shape[1], len(CLASSES))).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=0, keepdims=True)
    head = {"proj_kernel": kernel, "proj_bias": bias, "class_weights": centres}

    def bundle(name: str, model_bytes: bytes) -> Bundle:
        manifest = {
            "model": {"name": name},
            "preprocessing": pre.to_manifest(),
            "tflite": tflite_manifest(model_bytes),
            "embedding_dim": int(bank.shape[1]),
            "gradcam": {
                "feature_map_output": "feature_map",
                "pooling": "avg",
                "projection": True,
                "class_names": CLASSES,
            },
            "bank": {},
            "threshold": {"value": 0.01, "scale": 0.001},
        }
        root = tmp_path_factory.mktemp("gradcam") / name
        return load_bundle(write_bundle(root, model_bytes=model_bytes, bank=bank, manifest=manifest, head=head))

    return {
        "model": model,
        "pre": pre,
        "float": bundle("float", export_float(model)),
        "int8": bundle("int8", export_int8(model, normals)),
        "defects": [dark_spot(img, seed=i) for i, img in enumerate(plain_part_images(4, seed=7))],
    }


def tape_cam(model, x: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Textbook Grad-CAM with GradientTape for S = e . direction on the Keras model's own layers."""
    import keras
    import tensorflow as tf

    # By type, not by name: Keras numbers a second model's layer names in the same process.
    pool = next(layer for layer in model.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D))
    fmap = model(x[None])[1]
    with tf.GradientTape() as tape:
        tape.watch(fmap)
        pooled = pool(fmap)
        emb = model.get_layer("embedding")(model.get_layer("projection")(pooled))
        s = tf.reduce_sum(emb * direction.astype(np.float32))
    grads = tape.gradient(s, fmap)[0].numpy()
    alpha = grads.mean(axis=(0, 1))
    return np.maximum((fmap[0].numpy() * alpha).sum(axis=-1), 0.0)


def to_max_one(cam: np.ndarray) -> np.ndarray:
    assert cam.max() > 0, "the heat map is all zero; the test image has no signal"
    return cam / cam.max()


def assert_not_flat(cam: np.ndarray) -> None:
    """A map worth comparing: a clear peak and cold cells, not a constant."""
    assert cam.max() > 2 * cam.mean() and (cam == 0).mean() > 0.1


def test_anomaly_cam_equals_gradient_tape(setup: dict) -> None:
    bundle, scorer = setup["float"], Scorer(setup["float"])
    near_spot = 0
    for img, (row, col) in setup["defects"]:
        result, emb = scorer.score(img)
        ours = anomaly_cam(bundle, emb, result.nearest)
        # S = 1 - e . b_k has the gradient of e . (-b_k): same map.
        theirs = tape_cam(setup["model"], preprocess(img, setup["pre"]), -bundle.bank[result.nearest])
        assert ours.shape == theirs.shape == tuple(bundle.feature_map_output.shape[1:3])
        assert_not_flat(theirs)
        assert np.abs(to_max_one(ours) - to_max_one(theirs)).max() < 1e-4
        peak = np.unravel_index(np.argmax(ours), ours.shape)
        cell = img.shape[0] / ours.shape[0]  # frame pixels per feature-map cell
        near_spot += bool(np.hypot(peak[0] - row / cell, peak[1] - col / cell) < 2.5)
    # Even this untrained model's map points at the spot on most images: the test images carry signal.
    assert near_spot >= len(setup["defects"]) - 1


def test_class_cam_equals_gradient_tape(setup: dict) -> None:
    bundle, scorer = setup["float"], Scorer(setup["float"])
    assert class_names(bundle) == CLASSES
    img = setup["defects"][0][0]
    _, emb = scorer.score(img)
    maps = class_cams(bundle, emb)
    assert list(maps) == CLASSES
    for k, name in enumerate(CLASSES):
        theirs = tape_cam(setup["model"], preprocess(img, setup["pre"]), bundle.head["class_weights"][:, k])
        if theirs.max() == 0:  # this logit has no positive evidence anywhere; ours must agree
            assert maps[name].max() < 1e-6
            continue
        assert np.abs(to_max_one(maps[name]) - to_max_one(theirs)).max() < 1e-4
    with pytest.raises(GradCamError, match="outside"):
        class_cam(bundle, emb, len(CLASSES))


def test_int8_heat_map_correlates_with_the_float_one(setup: dict) -> None:
    fscorer, iscorer = Scorer(setup["float"]), Scorer(setup["int8"])
    for img, _ in setup["defects"]:
        fres, femb = fscorer.score(img)
        ires, iemb = iscorer.score(img)
        fcam = anomaly_cam(setup["float"], femb, fres.nearest)
        icam = anomaly_cam(setup["int8"], iemb, ires.nearest)  # each bundle's own nearest, as on the device
        assert_not_flat(fcam)
        r = np.corrcoef(fcam.ravel(), icam.ravel())[0, 1]
        assert r > 0.9, f"Pearson r {r:.3f} between the int8 and float heat maps"


def test_missing_feature_map_or_head_is_refused(setup: dict, tmp_path: Path) -> None:
    bundle = setup["float"]
    _, emb = Scorer(bundle).score(setup["defects"][0][0])
    no_fmap = type(emb)(vector=emb.vector, feature_map=None, rgb=emb.rgb)
    with pytest.raises(GradCamError, match="feature_map"):
        anomaly_cam(bundle, no_fmap, 0)
    saved = bundle.head
    bundle.head = {}
    try:
        with pytest.raises(GradCamError, match="proj_kernel"):
            anomaly_cam(bundle, emb, 0)
        with pytest.raises(GradCamError, match="class_weights"):
            class_cam(bundle, emb, 0)
    finally:
        bundle.head = saved
