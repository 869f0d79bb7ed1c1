"""A bundle is verified in full; each kind of damage is refused with its own message."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.bundle import BundleError, load_bundle, sha256_bytes
from agent.scoring import Scorer
from tests.builders import plain_part_images, scratched


@pytest.fixture()
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _rewrite_manifest(bundle: Path, edit) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_a_good_bundle_loads_and_describes_itself(tiny_bundle: Path) -> None:
    b = load_bundle(tiny_bundle)
    m = b.manifest
    assert m["format_version"] == 1
    assert m["bank"]["count"] == b.bank.shape[0] and m["bank"]["dim"] == b.embedding_dim == b.bank.shape[1]
    assert m["tflite"]["input"]["dtype"] == "int8"
    assert set(m["files"]) >= {"embedder.tflite", "bank.npz"}
    assert np.allclose(np.linalg.norm(b.bank, axis=1), 1.0, atol=1e-3)


def test_tampered_file_is_refused(bundle_copy: Path) -> None:
    model = bundle_copy / "embedder.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"embedder\.tflite: sha256 mismatch"):
        load_bundle(bundle_copy)


def test_missing_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "bank.npz").unlink()
    with pytest.raises(BundleError, match=r"bank\.npz: missing file"):
        load_bundle(bundle_copy)


def test_missing_manifest_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest\.json: missing file"):
        load_bundle(bundle_copy)


def test_unknown_format_version_is_refused(bundle_copy: Path) -> None:
    _rewrite_manifest(bundle_copy, lambda m: m.update(format_version=99))
    with pytest.raises(BundleError, match="unknown format version 99"):
        load_bundle(bundle_copy)


def test_bank_dimension_disagreeing_with_the_model_is_refused(bundle_copy: Path) -> None:
    wrong = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float16)
    buf = io.BytesIO()
    np.savez_compressed(buf, bank=wrong)
    (bundle_copy / "bank.npz").write_bytes(buf.getvalue())

    def fix_hash(m: dict) -> None:
        m["files"]["bank.npz"] = sha256_bytes(buf.getvalue())

    _rewrite_manifest(bundle_copy, fix_hash)
    with pytest.raises(BundleError, match="bank dimension 7 disagrees with the model's embedding_dim 16"):
        load_bundle(bundle_copy)


def test_manifest_embedding_dim_disagreeing_with_the_model_is_refused(bundle_copy: Path) -> None:
    _rewrite_manifest(bundle_copy, lambda m: m["tflite"]["outputs"]["embedding"].update(shape=[1, 8]))
    with pytest.raises(BundleError, match="embedding output has shape"):
        load_bundle(bundle_copy)


def test_pickled_bank_is_refused(bundle_copy: Path) -> None:
    buf = io.BytesIO()
    np.savez(buf, bank=np.array([{"evil": 1}], dtype=object))
    (bundle_copy / "bank.npz").write_bytes(buf.getvalue())
    _rewrite_manifest(bundle_copy, lambda m: m["files"].update({"bank.npz": sha256_bytes(buf.getvalue())}))
    with pytest.raises(BundleError, match=r"bank\.npz: not a readable \.npz"):
        load_bundle(bundle_copy)


def test_scorer_separates_scratched_parts(tiny_bundle: Path) -> None:
    scorer = Scorer(load_bundle(tiny_bundle, num_threads=1))
    normal = [scorer.score(img)[0].score for img in plain_part_images(8, seed=11)]
    defect = [scorer.score(scratched(img, seed=i))[0].score for i, img in enumerate(plain_part_images(8, seed=11))]
    assert np.mean(defect) > np.mean(normal)


def test_score_cli_reports_bad_images_and_scores_the_rest(tiny_bundle: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), plain_part_images(1, seed=3)[0])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", str(tiny_bundle), str(corrupt), str(good)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["image"] == str(corrupt) and "not a readable image" in lines[0]["error"]
    assert lines[1]["image"] == str(good)
    assert set(lines[1]) == {"image", "score", "threshold", "verdict", "confidence", "latency_ms"}
    assert lines[1]["verdict"] in ("ok", "anomaly") and 0.0 <= lines[1]["confidence"] <= 1.0


def test_score_cli_refuses_a_bad_bundle(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", str(tmp_path), "x.png"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "manifest.json: missing file" in proc.stderr


def test_lookup_table_input_equals_the_float_path(tiny_bundle: Path) -> None:
    """The scorer's uint8 -> int8 table must feed the model exactly what quantising the float input does."""
    from agent.preprocess import prepare_rgb, scale_to_float
    from agent.runtime import quantize
    from agent.scoring import input_lut

    b = load_bundle(tiny_bundle)
    lut = input_lut(b)
    assert lut is not None and lut.dtype == np.int8
    rgb = prepare_rgb(plain_part_images(1, seed=4)[0], b.preprocessing)
    expected = quantize(scale_to_float(rgb, b.preprocessing), b.model.input)
    assert np.array_equal(lut[rgb], expected)
    assert np.array_equal(cv2.LUT(rgb, lut), expected)  # what the scorer calls
