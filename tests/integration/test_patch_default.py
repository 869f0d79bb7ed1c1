"""The default training (zero-training, fused GeM + patch scoring) on colour, non-square parts made in
code: train -> int8 export -> agent scores -> the patch anomaly map peaks on a planted defect."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

pytestmark = pytest.mark.integration

WEIGHTS = "weights/mobilenet_v2_1.0_224_no_top.h5"
H, W = 128, 192  # non-square frames
DEFECT = (40, 120, 14)  # (row, column, radius) of the planted defect in frame pixels


def colour_part(rng: np.random.Generator) -> np.ndarray:
    """A teal rounded plate with a fine printed texture on a dark-red tray (BGR), jittered a little."""
    img = np.full((H, W, 3), (20, 20, 90), np.uint8)
    dx, dy = (int(v) for v in rng.integers(-3, 4, 2))
    cv2.rectangle(img, (24 + dx, 16 + dy), (W - 24 + dx, H - 16 + dy), (150, 140, 30), -1)
    for y in range(20 + dy, H - 20 + dy, 8):  # printed lines: texture the patch bank must learn as normal
        cv2.line(img, (28 + dx, y), (W - 28 + dx, y), (120, 110, 20), 1)
    return cv2.add(img, rng.integers(0, 10, img.shape, dtype=np.uint8))


def with_defect(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    r, c, rad = DEFECT
    cv2.circle(out, (c, r), rad, (230, 230, 250), -1)  # a pale stain
    return out


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("colour_parts")
    rng = np.random.default_rng(4)
    for sub, n in (("train/good", 30), ("test/good", 6)):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / sub / f"{i:03d}.png"), colour_part(rng))
    (root / "test/stain").mkdir(parents=True)
    (root / "ground_truth/stain").mkdir(parents=True)
    mask = np.zeros((H, W), np.uint8)
    cv2.circle(mask, (DEFECT[1], DEFECT[0]), DEFECT[2], 255, -1)
    for i in range(6):
        cv2.imwrite(str(root / "test/stain" / f"{i:03d}.png"), with_defect(colour_part(rng)))
        cv2.imwrite(str(root / "ground_truth/stain" / f"{i:03d}_mask.png"), mask)
    return root


def test_default_training_scores_and_maps_a_planted_defect(parts: Path, shared_dir: Path, tmp_path: Path, capsys):
    from agent.bundle import load_bundle
    from agent.gradcam import inspection_image
    from agent.preprocess import load_image
    from agent.scoring import Scorer
    from trainer.cli import eval_main, train_main

    out = tmp_path / "bundle"
    args = [str(parts), "--out", str(out), "--input-size", f"{H}x{W}", "--weights", str(shared_dir / WEIGHTS)]
    assert train_main([*args, "--quiet"]) == 0, capsys.readouterr().err

    bundle = load_bundle(out)
    m = bundle.manifest
    assert m["training"]["settings"]["epochs"] == 0  # the default is ImageNet features, measured best
    assert bundle.scoring == "fused" and bundle.fusion is not None
    assert bundle.preprocessing.input_size == (H, W)
    assert list(m["patch"]["outputs"]) == ["patch_0", "patch_1", "patch_2"]
    assert m["patch"]["grid"] == [H // 16, W // 16]  # half of block_2_add at half the input size
    assert bundle.patch_bank is not None and bundle.patch_bank.dim == 24 + 64 + 160
    # every one of the 30 normals was scored out of fold; the tail fit says what to expect
    assert m["threshold"]["normals"]["count"] == 30
    low, high = m["threshold"]["expected_false_alarm_rate"]["interval_90"]
    assert 0.0 <= low <= m["threshold"]["expected_false_alarm_rate"]["estimate"] <= high <= 1.0

    scorer = Scorer(bundle)
    good, _ = scorer.score(load_image(parts / "test/good/000.png"))
    bad, bad_emb = scorer.score(load_image(parts / "test/stain/000.png"))
    assert bad.score > good.score and bad.verdict == "anomaly"
    assert set(bad.components or {}) == {"gem", "patch"}
    # the anomaly map's hottest cell lies on the stain (within one cell)
    gh, gw = bad_emb.patch_map.shape
    peak = np.unravel_index(int(np.argmax(bad_emb.patch_map)), (gh, gw))
    centre = (DEFECT[0] * gh / H, DEFECT[1] * gw / W)
    assert abs(peak[0] + 0.5 - centre[0]) <= 1.5 and abs(peak[1] + 0.5 - centre[1]) <= 1.5, (peak, centre)
    # what cmd/gradcam publishes: the frame, Grad-CAM and the anomaly map side by side
    picture = inspection_image(bundle, bad_emb, bad.nearest)
    assert picture.shape[1] == 3 * bad_emb.rgb.shape[1] + 2 * 4
    h, w = bad_emb.rgb.shape[:2]
    assert np.array_equal(picture[:h, :w], bad_emb.rgb)  # the first panel is the frame itself

    report = tmp_path / "eval.json"
    assert eval_main([str(out), str(parts), "--json", str(report), "--plots", str(tmp_path / "plots"), "--quiet"]) == 0
    result = json.loads(report.read_text())
    assert result["image_auroc"] == 1.0 and result["recall_at_threshold"] == 1.0
    assert result["pixel_auroc_anomaly_map"] > 0.9 and result["aupro_anomaly_map"] > 0.5
    assert (tmp_path / "plots" / "anomaly_map_grid.jpg").stat().st_size > 0
