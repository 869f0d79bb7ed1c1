"""load_bundle refuses every malformed manifest and file with a BundleError that names the file, the key and
the fix (issue 13, items 1 and 2): wrong types, non-finite numbers, thresholds outside the score's range, a
tflite entry that is not the model's, banks and head arrays that do not fit the model. Valid bundles still load.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bundle import BundleError, load_bundle, npz_bytes, sha256_bytes, write_bundle
from agent.preprocess import Preprocessing, preprocess
from tests.builders import plain_part_images

pytest.importorskip("tensorflow")

ROOT = Path(__file__).resolve().parents[2]
PATCH_SIZE = (32, 48)
NAN, INF = float("nan"), float("inf")
HUGE = 10**400  # a JSON integer beyond float range
FIX = "re-export the bundle"


def build_fused_bundle(out: Path) -> Path:
    """A small int8 bundle with GeM pooling and fused (GeM + patch) scoring, as yugami-train writes one."""
    import keras

    from agent.bundle import EmbeddingSpec
    from agent.patches import Fusion
    from trainer.export import export_int8, tflite_features, tflite_manifest
    from trainer.train import _patch_spec

    keras.utils.set_random_seed(0)
    inp = keras.Input((*PATCH_SIZE, 3))
    p0 = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inp)
    p1 = keras.layers.Conv2D(4, 3, strides=4, padding="same", activation="relu")(p0)
    fmap = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(p0)
    pre = Preprocessing(input_size=PATCH_SIZE)
    normals = np.stack([preprocess(img, pre) for img in plain_part_images(20, seed=1)])
    model_bytes = export_int8(keras.Model(inp, [fmap, p0, p1]), list(normals))
    emb, patches = tflite_features(model_bytes, normals, spec=EmbeddingSpec("gem", 3.0))
    manifest = {
        "model": {"name": "tiny-fused", "version": "0"},
        "preprocessing": pre.to_manifest(),
        "tflite": tflite_manifest(model_bytes),
        "embedding_dim": 16,
        "embedding": {"pooling": "gem", "p": 3.0},
        "gradcam": {"feature_map_output": "feature_map", "pooling": "gem", "projection": False},
        "bank": {"reduction": {"method": "none"}},
        "scoring": {"method": "fused", "fusion": Fusion(0.05, 0.01, 1.0, 0.2).to_manifest()},
        "patch": {**_patch_spec(model_bytes), "map": {"floor": 1.0, "top": 2.0}},
        "threshold": {"value": 2.0, "scale": 0.5},
    }
    rows = patches.reshape(-1, patches.shape[-1])[:100]
    return write_bundle(out, model_bytes=model_bytes, bank=emb, manifest=manifest, patch_bank=rows)


@pytest.fixture(scope="module")
def fused_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fused_bundle(tmp_path_factory.mktemp("fused") / "b")


def rewrite(src: Path, dst: Path, change: Callable[[dict, Path], None], rehash: bool = True) -> Path:
    """A copy of ``src`` with ``change(manifest, folder)`` applied; the sha256 of every listed file is
    recomputed (when 'files' is still an object of plain names) so the check under test is reached."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    change(manifest, dst)
    files = manifest.get("files")
    if rehash and isinstance(files, dict):
        for name in files:
            if Path(name).name == name and name not in ("", ".", "..") and (dst / name).is_file():
                files[name] = sha256_bytes((dst / name).read_bytes())
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def put(path: str, value: Any) -> Callable[[dict, Path], None]:
    """Set the dotted key ``path`` (creating nothing: every parent must exist) to ``value``."""

    def change(m: dict, _dst: Path) -> None:
        *parents, last = path.split("/")
        node = m
        for k in parents:
            node = node[k]
        node[last] = value

    return change


def drop(path: str) -> Callable[[dict, Path], None]:
    def change(m: dict, _dst: Path) -> None:
        *parents, last = path.split("/")
        node = m
        for k in parents:
            node = node[k]
        del node[last]

    return change


def refused(bundle: Path, tmp_path: Path, change, key: str, file: str = "manifest.json", rehash: bool = True) -> str:
    """Load a changed copy; it must be a BundleError naming ``file`` and ``key``. Returns the message."""
    bad = rewrite(bundle, tmp_path / "bad", change, rehash=rehash)
    with pytest.raises(BundleError) as info:
        load_bundle(bad)
    message = str(info.value)
    assert f"{bad / file}" in message, message
    assert key in message, message
    assert "unexpectedly" not in message, f"only the last-line guard caught it: {message}"
    return message


# -- manifest fields of wrong type, non-finite or out of range (the tiny embedding bundle) -------------------

MANIFEST_CASES = [
    # the examples
    ("bank", [1, 2], "'bank' must be an object, not a list"),
    ("embedding_dim", "abc", "'embedding_dim' must be an integer"),
    ("files", ["embedder.tflite", "bank.npz"], "'files' must be an object"),
    ("preprocessing/input_size", [224], "'preprocessing.input_size' must be a list of 2 integers"),
    ("tflite", 3, "'tflite' must be an object, not a number"),
    ("preprocessing", None, "'preprocessing' must not be null"),
    ("model", "x", "'model' must be an object, not a string"),
    ("threshold/value", NAN, "'threshold.value' must be a finite number"),
    ("threshold/value", INF, "'threshold.value' must be a finite number"),
    ("threshold/value", -INF, "'threshold.value' must be a finite number"),
    ("threshold/value", HUGE, "'threshold.value' must be a finite number, not an integer of 401 digits"),
    ("threshold/value", True, "'threshold.value' must be a finite number, not true"),
    ("threshold/value", "0.1", "'threshold.value' must be a finite number, not a string '0.1'"),
    # the threshold inside the range of 1 - max cosine
    ("threshold/value", 2.5, "'threshold.value' is 2.5, outside 0..2"),
    ("threshold/value", -0.01, "'threshold.value' is -0.01, outside 0..2"),
    ("threshold/scale", -1.0, "'threshold.scale' is -1; it must be at least 0"),
    ("threshold/scale", NAN, "'threshold.scale' must be a finite number"),
    ("threshold", [0.1], "'threshold' must be an object"),
    # nested objects replaced by other JSON types
    ("tflite/input", "int8", "'tflite.input' must be an object"),
    ("tflite/outputs", None, "'tflite.outputs' must not be null"),
    ("tflite/outputs/embedding", [1, 16], "'tflite.outputs.embedding' must be an object, not a list"),
    ("tflite/outputs/embedding/name", None, "'tflite.outputs.embedding.name' must not be null"),
    ("tflite/outputs/embedding/shape", "1x16", "'tflite.outputs.embedding.shape' must be a list"),
    ("tflite/outputs/feature_map/quantization/scale", NAN, "'tflite.outputs.feature_map.quantization.scale'"),
    ("tflite/input/quantization", False, "'tflite.input.quantization' must be an object"),
    ("tflite/input/quantization/zero_point", 1.5, "'tflite.input.quantization.zero_point' must be an integer"),
    ("preprocessing/scale", INF, "'preprocessing.scale' must be a finite number"),
    ("preprocessing/scale", 0, "'preprocessing.scale' is 0; it must be above 0"),
    ("preprocessing/offset", None, "'preprocessing.offset' must not be null"),
    ("preprocessing/roi", [1, 2], "'preprocessing.roi' must be a list of 4 integers"),
    ("preprocessing/input_size", [64.0, 64.0], "'preprocessing.input_size' must be a list of 2 integers"),
    ("preprocessing/input_size", [HUGE, 64], "is larger than 16384 pixels a side"),
    ("preprocessing/input_size", [32, 32], "'preprocessing.input_size' [32, 32] disagrees with embedder.tflite's"),
    ("preprocessing/scale", 1e300, "'preprocessing.scale' and 'preprocessing.offset' take pixel values beyond float32"),
    ("preprocessing/resize", "bogus", "bad 'preprocessing' entry: unknown resize method 'bogus'"),
    ("preprocessing/resize", 3, "'preprocessing.resize' must be a string"),
    ("embedding_dim", 16.0, "'embedding_dim' must be an integer"),
    ("embedding_dim", 0, "'embedding_dim' is 0; it must be at least 1"),
    ("embedding", {"pooling": "gem", "p": INF}, "embedding.p must be a finite number"),
    ("embedding", {"pooling": ["gem"]}, "embedding.pooling ['gem'] is not one of"),
    ("embedding", 3, "bad 'embedding' entry: must be an object"),
    ("bank/count", INF, "'bank.count' must be an integer"),
    ("bank/dtype", "float32", "'bank.dtype' is 'float32' but bank.npz holds float16"),
    ("bank/file", "other.npz", "'bank.file' is 'other.npz'"),
    ("gradcam", [1], "'gradcam' must be an object"),
    ("gradcam/pooling", "max", "'gradcam.pooling' is 'max', not one of ['avg', 'gem']"),
    ("gradcam/cam_scale", -1, "'gradcam.cam_scale' is -1; it must be above 0"),
    ("gradcam/class_names", "normal,line", "'gradcam.class_names' must be a list of strings"),
    ("gradcam/projection", "yes", "'gradcam.projection' must be true or false"),
    ("model/name", 5, "'model.name' must be a string"),
    ("model/version", [1], "'model.version' must be a string or an integer"),
    ("scoring", "fused", "'scoring' must be an object"),
    ("scoring", {"method": "magic"}, "'scoring.method' is 'magic', not one of"),
    ("scoring", {"method": "patch"}, "bad patch scoring entry: 'patch' must be an object"),
    ("files/..", "0" * 64, "'files...' must be a plain file name"),
    ("files/sub\\x", "0" * 64, "must be a plain file name"),
]


CASE_IDS = [f"{path}={value!r:.12}" for path, value, _ in MANIFEST_CASES]


@pytest.mark.parametrize(("path", "value", "message"), MANIFEST_CASES, ids=CASE_IDS)
def test_a_bad_manifest_field_is_a_bundle_error_naming_the_key(tiny_bundle: Path, tmp_path: Path, path, value, message):
    text = refused(tiny_bundle, tmp_path, put(path, value), message)
    assert FIX in text, text


@pytest.mark.parametrize(
    ("path", "value", "file", "message"),
    [
        ("embedding_dim", 10**30, "bank.npz", "disagrees with the model's embedding_dim 1" + "0" * 30),
        ("bank/count", 3, "bank.npz", "bank shape (30, 16) disagrees with 'bank' count 3, dim 16"),
        ("bank/dim", 8, "bank.npz", "bank shape (30, 16) disagrees with 'bank' count 30, dim 8"),
        ("embedding_dim", 8, "bank.npz", "bank dimension 16 disagrees with the model's embedding_dim 8"),
    ],
)
def test_manifest_sizes_are_checked_against_the_files(tiny_bundle: Path, tmp_path: Path, path, value, file, message):
    text = refused(tiny_bundle, tmp_path, put(path, value), message, file=file)
    assert FIX in text


@pytest.mark.parametrize("key", ["preprocessing", "tflite", "threshold", "files", "embedding_dim", "model", "bank"])
def test_a_missing_required_key_is_named(tiny_bundle: Path, tmp_path: Path, key: str):
    refused(tiny_bundle, tmp_path, drop(key), f"manifest lacks ['{key}']")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("threshold/value", "'threshold.value' is missing"),
        ("preprocessing/input_size", "'preprocessing.input_size' is missing"),
        ("tflite/input", "'tflite.input' is missing"),
        ("tflite/outputs/embedding/shape", "'tflite.outputs.embedding.shape' is missing"),
        ("files/bank.npz", "'files' does not list bank.npz"),
    ],
)
def test_a_missing_nested_key_is_named(tiny_bundle: Path, tmp_path: Path, path: str, message: str):
    refused(tiny_bundle, tmp_path, drop(path), message)


@pytest.mark.parametrize("version", [True, 1.0, "1", [1], None, HUGE])
def test_format_version_must_be_the_integer_1(tiny_bundle: Path, tmp_path: Path, version):
    refused(tiny_bundle, tmp_path, put("format_version", version), "unknown format version")


def test_json_that_python_cannot_hold_is_refused(tiny_bundle: Path, tmp_path: Path):
    """Nesting deeper than the recursion limit and a 5000-digit integer: json.loads raises
    RecursionError / ValueError, not JSONDecodeError."""
    for n, text in enumerate(["[" * 100_000 + "]" * 100_000, '{"format_version": 1' + "1" * 5000 + "}"]):
        bad = tmp_path / f"b{n}"
        shutil.copytree(tiny_bundle, bad)
        (bad / "manifest.json").write_text(text)
        with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON"):
            load_bundle(bad)


def test_file_hashes_are_checked(tiny_bundle: Path, tmp_path: Path):
    refused(tiny_bundle, tmp_path / "a", put("files/bank.npz", "0" * 64), "sha256 mismatch", file="bank.npz",
            rehash=False)
    refused(tiny_bundle, tmp_path / "b", put("files/bank.npz", 42), "'files.bank.npz' must be a sha256 of 64 "
            "lowercase hex digits, not 42", rehash=False)


# -- the tflite entry against the model's real input tensor ------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("tflite/input/dtype", "uint8", "'tflite.input.dtype' is 'uint8' but embedder.tflite's tensor"),
        ("tflite/input/dtype", "float32", "has 'int8': the manifest does not describe this model"),
        ("tflite/input/quantization/scale", 0.5, "'tflite.input.quantization.scale' is 0.5"),
        ("tflite/input/quantization/zero_point", 7, "'tflite.input.quantization.zero_point' is 7"),
        ("tflite/input/shape", [1, 32, 32, 3], "'tflite.input.shape' [1, 32, 32, 3] is not the model's"),
        ("tflite/outputs/feature_map/dtype", "float32", "'tflite.outputs.feature_map.dtype' is 'float32'"),
    ],
)
def test_input_dtype_and_quantisation_must_be_the_models(tiny_bundle: Path, tmp_path: Path, path, value, message):
    text = refused(tiny_bundle, tmp_path, put(path, value), message)
    assert FIX in text


def test_a_float_model_described_as_int8_is_refused(tmp_path: Path):
    from tests.builders import build_tiny_bundle

    float_bundle = build_tiny_bundle(tmp_path / "float", quantize=False)
    assert load_bundle(float_bundle).model.input.dtype == "float32"
    refused(float_bundle, tmp_path, put("tflite/input/dtype", "int8"), "'tflite.input.dtype' is 'int8'")


def test_an_output_name_the_model_lacks_is_named(tiny_bundle: Path, tmp_path: Path):
    refused(tiny_bundle, tmp_path, put("tflite/outputs/embedding/name", "nope"), "'tflite.outputs.embedding.name'",
            file="embedder.tflite")


# -- thresholds for patch and fused scoring -----------------------------------------------------------------


def test_a_patch_threshold_must_be_a_distance(fused_bundle: Path, tmp_path: Path):
    def to_patch(m: dict, _dst: Path) -> None:
        m["scoring"] = {"method": "patch"}
        m["threshold"]["value"] = -0.5

    refused(fused_bundle, tmp_path, to_patch, "'threshold.value' is -0.5; a patch score is a distance")


def test_a_fused_threshold_may_be_any_finite_number(fused_bundle: Path, tmp_path: Path):
    b = load_bundle(rewrite(fused_bundle, tmp_path / "neg", put("threshold/value", -3.0)))
    assert b.scoring == "fused" and b.threshold == -3.0
    refused(fused_bundle, tmp_path, put("threshold/value", INF), "'threshold.value' must be a finite number")


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("patch/grid", [True, True], "'patch.grid' must be [height, width]"),
        ("patch/grid", [10**6, 10**6], "'patch.grid' [1000000, 1000000] is finer than the model input"),
        ("patch/smoothing", True, "'patch.smoothing' must be a positive odd integer"),
        ("patch/outputs", ["patch_0", "patch_0"], "'patch.outputs' names an output twice"),
        ("patch/map", [1.0, 2.0], "'patch.map' must be an object"),
        ("patch/map/floor", NAN, "'patch.map.floor' must be a finite number"),
        ("patch/bank/count", 99, "disagrees with 'patch.bank' count 99"),
        ("patch/bank/dtype", "float32", "'patch.bank.dtype' is 'float32' but patch_bank.npz holds float16"),
        ("scoring/fusion/gem_std", HUGE, "'scoring.fusion.gem_std' must be a finite number, not an integer beyond"),
        ("scoring/fusion/patch_std", 0, "'scoring.fusion.gem_std' and 'scoring.fusion.patch_std' must be positive"),
        ("scoring/fusion", None, "'scoring.fusion' must be an object"),
        ("scoring/method", ["fused"], "'scoring.method' must be a string"),
        ("embedding/p", "3", "embedding.p must be a finite number"),
    ],
)
def test_bad_patch_and_fusion_entries_name_the_key(fused_bundle: Path, tmp_path: Path, path, value, message):
    file = "patch_bank.npz" if "bank/count" in path else "manifest.json"
    refused(fused_bundle, tmp_path, put(path, value), message, file=file)


# -- arrays: bank and head ------------------------------------------------------------------------------------


def _replace_npz(name: str, data: bytes) -> Callable[[dict, Path], None]:
    def change(m: dict, dst: Path) -> None:
        (dst / name).write_bytes(data)
        m["files"][name] = ""  # rehashed by rewrite()

    return change


def _head(**arrays: np.ndarray) -> Callable[[dict, Path], None]:
    return _replace_npz("head.npz", npz_bytes(arrays))


K16 = np.zeros((16, 16), np.float32)
B16 = np.zeros(16, np.float32)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_head(proj_kernel=np.zeros((15, 16), np.float32)), "'proj_kernel' is float32 (15, 16); Grad-CAM needs floats "
         "of shape (16, 16)"),
        (_head(proj_kernel=np.zeros((16, 8), np.float32)), "'proj_kernel' is float32 (16, 8)"),
        (_head(proj_kernel=np.zeros((16, 16), np.int32)), "'proj_kernel' is int32"),
        (_head(proj_kernel=K16, proj_bias=np.zeros(3, np.float32)), "'proj_bias' is float32 (3,); Grad-CAM needs "
         "floats of shape (16,)"),
        (_head(proj_kernel=K16, proj_bias=B16, class_weights=np.zeros((8, 2), np.float32)), "'class_weights' is "
         "float32 (8, 2); Grad-CAM needs floats of shape (16, K)"),
        (_head(proj_kernel=K16, class_weights=np.full((16, 2), np.nan, np.float32)), "'class_weights' holds non-fin"),
        (_head(proj_bias=B16), "'proj_bias' without 'proj_kernel'"),
        (_head(class_weights=np.ones((16, 2), np.float32)), "has no 'proj_kernel', and the manifest's "
         "'gradcam.projection' is true"),
    ],
)
def test_head_arrays_are_checked_at_load(tiny_bundle: Path, tmp_path: Path, change, message: str):
    refused(tiny_bundle, tmp_path, change, message, file="head.npz")


def test_projection_without_a_head_file_is_refused(tiny_bundle: Path, tmp_path: Path):
    def no_head(m: dict, dst: Path) -> None:
        (dst / "head.npz").unlink()
        del m["files"]["head.npz"]

    refused(tiny_bundle, tmp_path, no_head, "'gradcam.projection' is true but 'files' lists no head.npz")


def _zip(**members: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("bank.npz", npz_bytes({"bank": np.array([["a", "b"]])}), "'bank' is <U1, not numbers"),
        ("bank.npz", npz_bytes({"bank": np.ones((5, 16), np.int8)}), "'bank' holds int8, not floats"),
        ("bank.npz", npz_bytes({"rows": np.ones((5, 16), np.float16)}), "has no array named 'bank'"),
        ("bank.npz", npz_bytes({"bank": np.full((30, 16), np.inf, np.float16)}), "non-finite"),
        ("bank.npz", b"PK\x03\x04 not really a zip", "not a readable .npz"),
        ("head.npz", _zip(**{"proj_kernel.txt": b"hello"}), "'proj_kernel.txt' is bytes, not numbers"),
    ],
)
def test_unreadable_or_wrong_arrays_are_refused(tiny_bundle: Path, tmp_path: Path, name: str, data: bytes, message):
    refused(tiny_bundle, tmp_path, _replace_npz(name, data), message, file=name)


# -- valid bundles keep loading -------------------------------------------------------------------------------


def test_valid_bundles_still_load(tiny_bundle: Path, fused_bundle: Path, tmp_path: Path):
    demo = load_bundle(ROOT / "models" / "demo")
    assert demo.scoring == "embedding" and set(demo.head) == {"proj_kernel", "proj_bias", "class_weights"}
    assert load_bundle(tiny_bundle).threshold > 0
    fused = load_bundle(fused_bundle)
    assert fused.scoring == "fused" and fused.patch_bank is not None
    # optional keys absent or null read as their defaults
    for path in ("gradcam", "embedding", "threshold/scale", "preprocessing/roi", "model/version"):
        copy = rewrite(tiny_bundle, tmp_path / path.replace("/", "_"), put(path, None))
        assert load_bundle(copy).name == "tiny-test"
    gem = rewrite(fused_bundle, tmp_path / "gem", put("scoring", {"method": "gem"}))
    assert load_bundle(gem).scoring == "embedding"
