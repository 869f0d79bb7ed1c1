"""Generalised mean (GeM) pooling: the agent's numpy pooling against the trainer's Keras layer, a GeM
bundle scored through the Scorer, its heat map against GradientTape, and bad GeM manifests refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.bundle import BundleError, load_bundle, write_bundle
from agent.gradcam import anomaly_cam
from agent.preprocess import Preprocessing, preprocess
from agent.scoring import Scorer, gem_pool
from tests.builders import TINY_SIZE, plain_part_images, scratched

pytest.importorskip("tensorflow")


def test_gem_pool_is_the_mean_at_p1_and_tends_to_the_max() -> None:
    fmap = np.random.default_rng(0).uniform(0, 6, (7, 7, 5)).astype(np.float32)
    assert np.allclose(gem_pool(fmap, 1.0), fmap.reshape(-1, 5).mean(0), rtol=1e-5)
    big = gem_pool(fmap, 16.0)
    assert np.all(big <= fmap.reshape(-1, 5).max(0) + 1e-5) and np.all(big > gem_pool(fmap, 3.0))
    assert np.allclose(gem_pool(fmap, 3.0), (fmap.reshape(-1, 5) ** 3).mean(0) ** (1 / 3), rtol=1e-5)


@pytest.mark.parametrize("p", [3.0, 2.5])
def test_numpy_gem_equals_the_keras_layer(p: float) -> None:
    from trainer.model import GeMPooling

    fmap = np.random.default_rng(1).uniform(-1, 6, (2, 5, 4, 8)).astype(np.float32)  # negatives are floored
    keras_out = np.asarray(GeMPooling(p)(fmap))
    ours = np.stack([gem_pool(f, p) for f in fmap])
    assert np.allclose(ours, keras_out, rtol=1e-5, atol=1e-6)


def gem_model(seed: int = 0):
    import keras

    from trainer.model import GeMPooling

    keras.utils.set_random_seed(seed)
    inp = keras.Input((*TINY_SIZE, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inp)
    fmap = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    emb = keras.layers.UnitNormalization()(GeMPooling(3.0)(fmap))
    return keras.Model(inp, [emb, fmap]), keras.Model(inp, fmap)


@pytest.fixture(scope="module")
def gem_bundle(tmp_path_factory: pytest.TempPathFactory):
    from trainer.export import export_float, tflite_manifest

    pre = Preprocessing(input_size=TINY_SIZE)
    model, fmap_only = gem_model()
    normals = np.stack([preprocess(img, pre) for img in plain_part_images(30, seed=0)])
    bank, _ = model.predict(normals, verbose=0)
    model_bytes = export_float(fmap_only)
    manifest = {
        "model": {"name": "gem-test"},
        "preprocessing": pre.to_manifest(),
        "tflite": tflite_manifest(model_bytes),
        "embedding_dim": 16,
        "embedding": {"pooling": "gem", "p": 3.0},
        "gradcam": {"feature_map_output": "feature_map", "pooling": "gem", "projection": False},
        "bank": {},
        "threshold": {"value": 0.01, "scale": 0.001},
    }
    root = write_bundle(tmp_path_factory.mktemp("gem") / "b", model_bytes=model_bytes, bank=bank, manifest=manifest)
    return {"bundle": load_bundle(root), "model": model, "pre": pre, "manifest": manifest, "bytes": model_bytes}


def test_scorer_pools_the_feature_map_like_the_keras_model(gem_bundle) -> None:
    bundle, pre = gem_bundle["bundle"], gem_bundle["pre"]
    assert bundle.embedding_output is None and bundle.embedding.pooling == "gem"
    scorer = Scorer(bundle)
    for img in [scratched(i, seed=k) for k, i in enumerate(plain_part_images(3, seed=5))]:
        want, _ = gem_bundle["model"].predict(preprocess(img, pre)[None], verbose=0)
        _, emb = scorer.score(img)
        assert np.abs(emb.vector - want[0]).max() < 1e-4


def test_gem_heat_map_is_gradient_times_activation(gem_bundle) -> None:
    import tensorflow as tf

    from trainer.model import GeMPooling

    bundle, model = gem_bundle["bundle"], gem_bundle["model"]
    pool = next(layer for layer in model.layers if isinstance(layer, GeMPooling))
    img = scratched(plain_part_images(1, seed=9)[0], seed=3)
    result, emb = Scorer(bundle).score(img)
    ours = anomaly_cam(bundle, emb, result.nearest)
    fmap = model(preprocess(img, gem_bundle["pre"])[None])[1]
    with tf.GradientTape() as tape:
        tape.watch(fmap)
        e = tf.math.l2_normalize(pool(fmap), axis=-1)
        s = 1.0 - tf.reduce_sum(e * bundle.bank[result.nearest])
    grads = tape.gradient(s, fmap)[0].numpy()
    theirs = np.maximum((grads * fmap[0].numpy()).sum(-1), 0.0)
    assert theirs.max() > 0 and ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < 1e-4 * max(theirs.max(), 1e-6) + 1e-7


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"pooling": "median"}, "pooling 'median'"),
        ({"pooling": "gem", "p": 100}, "outside"),
        ("gem", "must be an object"),
    ],
)
def test_bad_embedding_entry_is_refused(gem_bundle, tmp_path: Path, entry, message: str) -> None:
    manifest = {**gem_bundle["manifest"], "embedding": entry}
    root = write_bundle(tmp_path / "b", model_bytes=gem_bundle["bytes"], bank=gem_bundle["bundle"].bank,
                        manifest=manifest)
    with pytest.raises(BundleError, match="bad 'embedding' entry"):
        load_bundle(root)
    with pytest.raises(BundleError, match=message):
        load_bundle(root)


def test_gem_without_a_feature_map_is_refused(tmp_path: Path) -> None:
    from tests.builders import build_tiny_bundle

    root = build_tiny_bundle(tmp_path / "tiny", quantize=False)
    bundle = load_bundle(root)
    manifest = {**bundle.manifest, "embedding": {"pooling": "gem", "p": 3.0}}
    manifest["tflite"] = {**manifest["tflite"], "outputs": {"embedding": manifest["tflite"]["outputs"]["embedding"]}}
    manifest.pop("files", None)
    root2 = write_bundle(tmp_path / "b", model_bytes=(root / "embedder.tflite").read_bytes(), bank=bundle.bank,
                         manifest=manifest)
    with pytest.raises(BundleError, match="no 'feature_map' entry"):
        load_bundle(root2)


def test_trainer_refuses_gem_settings_the_device_cannot_follow() -> None:
    from trainer.model import ModelConfig, ModelError

    with pytest.raises(ModelError, match="--pooling avg"):
        ModelConfig(projection=128)  # GeM is the default; the device has no projection after it
    with pytest.raises(ModelError, match="--gem-p"):
        ModelConfig(gem_p=40.0)
    assert ModelConfig(pooling="avg", projection=128).projection == 128
