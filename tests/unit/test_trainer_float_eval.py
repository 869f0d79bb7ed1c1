"""yugami-eval --float-model: the same Scorer path with a float TFLite in place of the bundle's int8 model."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.builders import TINY_SIZE, build_tiny_bundle, plain_part_images, scratched, tiny_embedder

pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def bundle_and_float(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from trainer.export import export_float

    root = tmp_path_factory.mktemp("float_eval")
    bundle = build_tiny_bundle(root / "bundle", seed=0)
    float_path = root / "embedder_float.tflite"
    float_path.write_bytes(export_float(tiny_embedder(seed=0)))  # same seed: the bundle's own weights
    return bundle, float_path


def _test_set(root: Path, n: int = 6) -> Path:
    for sub in ("train/good", "test/good", "test/scratch"):
        (root / sub).mkdir(parents=True)
    for i, img in enumerate(plain_part_images(n, seed=7)):
        cv2.imwrite(str(root / "train" / "good" / f"{i}.png"), img)  # MVTec layout needs train/good
        cv2.imwrite(str(root / "test" / "good" / f"{i}.png"), img)
        cv2.imwrite(str(root / "test" / "scratch" / f"{i}.png"), scratched(img, seed=i))
    return root


def test_float_model_replaces_the_int8_model_in_the_scorer(bundle_and_float):
    from agent.bundle import load_bundle
    from agent.preprocess import Preprocessing, preprocess
    from agent.scoring import Scorer
    from trainer.evaluate import with_float_model

    bundle_path, float_path = bundle_and_float
    bundle = load_bundle(bundle_path)
    float_bundle = with_float_model(bundle, float_path)
    frame = plain_part_images(1, seed=3)[0]
    expected, _ = tiny_embedder(seed=0).predict(preprocess(frame, Preprocessing(input_size=TINY_SIZE))[None], verbose=0)
    got = Scorer(float_bundle).embed(frame).vector
    int8 = Scorer(bundle).embed(frame).vector
    np.testing.assert_allclose(got, expected[0], atol=1e-4)  # float TFLite == Keras; int8 would not be
    assert not np.allclose(int8, expected[0], atol=1e-4)
    assert float_bundle.bank is bundle.bank and float_bundle.threshold == bundle.threshold
    assert Scorer(float_bundle).embed(frame).feature_map.shape[-1] == 16


def test_eval_json_holds_int8_and_float_figures(bundle_and_float, tmp_path: Path, capsys):
    from trainer.cli import eval_main

    bundle_path, float_path = bundle_and_float
    data = _test_set(tmp_path / "data")
    report = tmp_path / "eval.json"
    argv = [str(bundle_path), str(data), "--float-model", str(float_path), "--json", str(report), "--quiet"]
    assert eval_main(argv) == 0
    result = json.loads(report.read_text())
    assert 0.0 <= result["image_auroc"] <= 1.0
    assert 0.0 <= result["float"]["image_auroc"] <= 1.0
    assert set(result["float"]["per_defect_auroc"]) == {"scratch"}
    assert (result["float"]["n_good"], result["float"]["n_defect"]) == (6, 6)
    # Float bank and threshold are the float model's own: the int8 ones would measure the int8 offset.
    assert result["float"]["bank"].startswith("float embeddings of train/good")
    assert result["float"]["threshold"] != result["threshold"]


def test_eval_refuses_a_float_model_of_another_input_size(bundle_and_float, tmp_path: Path, capsys):
    from trainer.cli import eval_main
    from trainer.export import export_float

    bundle_path, _ = bundle_and_float
    other = tmp_path / "other.tflite"
    other.write_bytes(export_float(tiny_embedder(input_size=(32, 32), seed=0)))
    data = _test_set(tmp_path / "data", n=2)
    assert eval_main([str(bundle_path), str(data), "--float-model", str(other), "--quiet"]) == 2
    assert "--float-model" in capsys.readouterr().err
