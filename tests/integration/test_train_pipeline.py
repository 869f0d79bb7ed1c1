"""The whole trainer path on small data made in code: train -> export -> agent load -> yugami-eval."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.bundle import load_bundle
from agent.preprocess import load_image
from agent.scoring import Scorer
from tests.builders import plain_part_images, scratched

pytestmark = pytest.mark.integration

WEIGHTS = "weights/mobilenet_v2_1.0_224_no_top.h5"


def _write(folder: Path, images: list[np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        cv2.imwrite(str(folder / f"{i:03d}.png"), img)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MVTec layout: 40 normal parts to train on; 10 good and 10 scratched to test."""
    root = tmp_path_factory.mktemp("parts")
    _write(root / "train" / "good", plain_part_images(40, seed=1))
    good = plain_part_images(10, seed=2)
    _write(root / "test" / "good", good)
    _write(root / "test" / "scratch", [scratched(img, seed=i) for i, img in enumerate(good)])
    return root


def test_train_export_load_and_evaluate(parts: Path, shared_dir: Path, tmp_path: Path, capsys):
    from trainer.cli import eval_main, train_main
    from trainer.data import find_dataset, fingerprint

    out = tmp_path / "bundle"
    from fleet.keys import generate_keypair

    sign_key, sign_pub = generate_keypair(tmp_path / "keys", "release")
    rc = train_main(
        [
            str(parts),
            "--out",
            str(out),
            "--input-size",
            "96",
            "--weights",
            str(shared_dir / WEIGHTS),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--seed",
            "3",
            "--save-float",
            str(tmp_path / "float.tflite"),
            "--model-version",
            "1.2",
            "--sign-key",
            str(sign_key),
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    # signed after export (issue 14): the agent's own check accepts it, naming the key
    from agent.trust import load_trusted_keys, verify_signature

    signer = verify_signature(out, (out / "manifest.json").read_bytes(), load_trusted_keys([sign_pub]), require=True)
    assert signer is not None and signer.signer == "release"

    bundle = load_bundle(out)
    m = bundle.manifest
    # GeM by default: the int8 model carries only the feature map and the agent pools it.
    assert m["embedding"] == {"pooling": "gem", "p": 3.0}
    assert m["model"]["version"] == "1.2" and bundle.version == "1.2"
    # fused scoring by default: the same model also gives the patch trunk's three maps
    assert bundle.embedding_output is None
    assert list(m["tflite"]["outputs"]) == ["feature_map", "patch_0", "patch_1", "patch_2"]
    assert m["gradcam"] == {
        "feature_map_output": "feature_map",
        "pooling": "gem",
        "projection": False,
        "class_names": ["normal", "line"],
    }
    assert bundle.feature_map_output is not None and bundle.feature_map_output.shape[-1] == 1280
    assert bundle.head["class_weights"].shape == (1280, 2)
    assert "proj_kernel" not in bundle.head
    assert m["int8_vs_float"]["mean_cosine"] >= 0.98
    assert m["training"]["data"]["fingerprint_sha256"] == fingerprint(find_dataset(parts).train)
    assert m["training"]["settings"]["loss"] == "l2softmax" and m["training"]["settings"]["epochs"] == 1
    # All 40 normals scored out of fold (5 folds) for the threshold; all 40 go into the bank.
    assert m["bank"]["count"] == 40 and m["threshold"]["normals"]["count"] == 40
    assert (out / "localization.png").is_file()

    # The agent's scorer gives a scratched part a higher score than the same part unscratched.
    scorer = Scorer(bundle)
    good_img = load_image(parts / "test" / "good" / "000.png")
    bad_img = load_image(parts / "test" / "scratch" / "000.png")
    good_res, emb = scorer.score(good_img)
    bad_res, _ = scorer.score(bad_img)
    assert bad_res.score > good_res.score
    assert emb.feature_map is not None and emb.feature_map.shape == (3, 3, 1280)

    report = tmp_path / "eval.json"
    plots = tmp_path / "plots"
    capsys.readouterr()
    float_args = ["--float-model", str(tmp_path / "float.tflite")]
    assert eval_main([str(out), str(parts), "--json", str(report), "--plots", str(plots), *float_args, "--quiet"]) == 0
    result = json.loads(report.read_text())
    assert result["float"]["image_auroc"] >= 0.8 and result["float"]["n_defect"] == 10
    assert result["n_good"] == 10 and result["n_defect"] == 10
    assert set(result["per_defect_auroc"]) == {"scratch"}
    assert result["image_auroc"] >= 0.8
    assert result["threshold"] == pytest.approx(bundle.threshold)
    assert 0.0 <= result["false_alarm_rate"] <= 1.0 and 0.0 <= result["miss_rate"] <= 1.0
    assert (plots / "roc.png").stat().st_size > 0 and (plots / "score_histogram.png").stat().st_size > 0

    assert eval_main([str(out), str(parts), "--scorer", "lof", "--json", str(report), "--quiet"]) == 0
    lof = json.loads(report.read_text())
    assert lof["scorer"] == "lof" and lof["image_auroc"] is not None


def test_training_is_deterministic_for_a_seed(parts: Path):
    from agent.preprocess import Preprocessing
    from trainer.anomalies import AnomalyConfig
    from trainer.data import find_dataset, load_prepared
    from trainer.localize import object_masks
    from trainer.model import ModelConfig
    from trainer.train import TrainConfig, _seed_everything, fine_tune

    spec = Preprocessing(input_size=(32, 32))
    pics = load_prepared(find_dataset(parts).train[:16], spec)
    _, masks = object_masks(pics)
    cfg = TrainConfig(
        data_dir=parts,
        out=parts / "unused",
        epochs=1,
        batch_size=8,
        seed=5,
        progress=False,
        model=ModelConfig(input_size=(32, 32), alpha=0.35, weights="none", fine_tune_layers=-1),
        anomaly=AnomalyConfig(classes=3),
        loss="adacos",
    )
    runs = []
    for _ in range(2):
        _seed_everything(cfg.seed)
        embedder, head, history = fine_tune(cfg, pics, masks, spec)
        runs.append((embedder.get_weights()[-1], head.class_weights(), history[0]["loss"]))
    assert np.array_equal(runs[0][0], runs[1][0])
    assert np.array_equal(runs[0][1], runs[1][1])
    assert runs[0][2] == runs[1][2]
