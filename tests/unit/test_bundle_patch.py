"""Bundles that score patches: they load, score with components and a map, and bad entries are refused
with a BundleError naming the key (never another exception)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import BundleError, load_bundle, sha256_bytes, write_bundle
from agent.preprocess import Preprocessing, preprocess
from tests.builders import plain_part_images

pytest.importorskip("tensorflow")

SIZE = (32, 48)  # non-square on purpose


def _tiny_patch_model():
    """feature map (16 ch) + two patch maps (8 and 4 ch): the output roles the trainer's export gives."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((*SIZE, 3))
    p0 = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inp)
    p1 = keras.layers.Conv2D(4, 3, strides=4, padding="same", activation="relu")(p0)
    fmap = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(p0)
    return keras.Model(inp, [fmap, p0, p1])


def write_tiny_patch_bundle(out: Path, map_floor: float = 1.0, bank_rows: int = 100) -> Path:
    """A fused bundle of the tiny patch model, calibrated on 20 plain parts (test_feedback uses it too)."""
    from agent.bundle import EmbeddingSpec
    from agent.patches import Fusion
    from trainer.export import export_int8, tflite_features, tflite_manifest
    from trainer.train import _patch_spec

    pre = Preprocessing(input_size=SIZE)
    normals = np.stack([preprocess(img, pre) for img in plain_part_images(20, seed=1)])
    model_bytes = export_int8(_tiny_patch_model(), list(normals))
    emb, patches = tflite_features(model_bytes, normals, spec=EmbeddingSpec("gem", 3.0))
    patch_rows = patches.reshape(-1, patches.shape[-1])
    manifest = {
        "model": {"name": "tiny-patch", "version": "0"},
        "preprocessing": pre.to_manifest(),
        "tflite": tflite_manifest(model_bytes),
        "embedding_dim": 16,
        "embedding": {"pooling": "gem", "p": 3.0},
        "bank": {"reduction": {"method": "none"}},
        "scoring": {"method": "fused", "fusion": Fusion(0.05, 0.01, 1.0, 0.2).to_manifest()},
        "patch": {**_patch_spec(model_bytes), "map": {"floor": map_floor, "top": 2.0}},
        "threshold": {"value": 2.0, "scale": 0.5},
    }
    return write_bundle(out, model_bytes=model_bytes, bank=emb, manifest=manifest, patch_bank=patch_rows[:bank_rows])


@pytest.fixture(scope="module")
def patch_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_patch_bundle(tmp_path_factory.mktemp("patch_bundle") / "b")


def test_a_patch_bundle_loads_and_scores_with_components_and_a_map(patch_bundle: Path):
    from agent.scoring import Scorer

    b = load_bundle(patch_bundle)
    assert b.scoring == "fused" and b.patch is not None and b.patch.grid == (8, 12)
    assert b.patch_bank is not None and b.patch_bank.rows.shape == (100, 12)
    result, emb = Scorer(b).score(plain_part_images(1, seed=9)[0])
    assert emb.patch_map is not None and emb.patch_map.shape == (8, 12)
    assert set(result.components) == {"gem", "patch"}
    assert result.score == pytest.approx(b.fusion.fuse(result.components["gem"], result.components["patch"]))
    assert result.components["patch"] == pytest.approx(float(emb.patch_map.max()))
    assert "components" in result.as_dict()


def _rewrite(src: Path, dst: Path, change) -> Path:
    import shutil

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    change(manifest, dst)
    for name in list(manifest["files"]):
        manifest["files"][name] = sha256_bytes((dst / name).read_bytes())
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _set(path: list[str], value):
    def change(m, _dst):
        d = m
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "names"),
    [
        (_set(["threshold", "value"], float("nan")), "threshold.value"),
        (_set(["threshold", "value"], "high"), "threshold.value"),
        (_set(["threshold"], [1, 2]), "threshold"),
        (_set(["scoring", "method"], "magic"), "scoring.method"),
        (_set(["scoring", "fusion"], None), "fusion"),
        (_set(["patch", "outputs"], ["patch_0", "patch_9"]), "patch_9"),
        (_set(["patch", "grid"], [8]), "grid"),
        (_set(["patch", "map"], {"floor": 3.0, "top": 2.0}), "patch.map.top"),
    ],
)
def test_bad_patch_entries_are_refused_naming_the_key(patch_bundle: Path, tmp_path: Path, change, names):
    bad = _rewrite(patch_bundle, tmp_path / "bad", change)
    with pytest.raises(BundleError, match=names.replace(".", r"\.")):
        load_bundle(bad)


def test_a_patch_bank_of_the_wrong_width_is_refused(patch_bundle: Path, tmp_path: Path):
    from agent.bundle import npz_bytes

    def narrower(_m, dst: Path):
        (dst / "patch_bank.npz").write_bytes(npz_bytes({"bank": np.zeros((5, 11), np.float16)}))

    with pytest.raises(BundleError, match=r"patch_bank\.npz"):
        load_bundle(_rewrite(patch_bundle, tmp_path / "narrow", narrower))
