"""Property: whatever the manifest holds, load_bundle returns a Bundle or raises BundleError, nothing else
(issue 13, item 1). Hypothesis mutates the manifests of two real small bundles (an embedding bundle with a
Grad-CAM head, a fused GeM + patch bundle): a value anywhere replaced by random JSON (NaN, infinities, huge
integers, wrong types, nested objects), a key deleted, an optional key added. Each mutated manifest is loaded
twice: with the sha256 of the listed files recomputed (so the checks after the hash check are reached) and as it
is (so the hash check itself is). A bundle that loads must score a frame into a verdict that serialises as
strict JSON (issue 13, item 2) and give Grad-CAM maps or a GradCamError.

Examples: 300 per test, 3 tests (900 mutated manifests; about 25 s on a 2-core CPU).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent.bundle import BundleError, load_bundle, sha256_bytes
from tests.builders import plain_part_images
from tests.unit.test_bundle_checks import build_fused_bundle

pytest.importorskip("tensorflow")

EXAMPLES = 300
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the checkout
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Keys the loader reads, so that added keys reach optional branches (scoring, patch, embedding, ...).
KNOWN_KEYS = [
    "format_version", "model", "name", "version", "preprocessing", "input_size", "channels", "color_order",
    "resize", "roi", "scale", "offset", "tflite", "input", "outputs", "embedding", "feature_map", "patch_0",
    "shape", "dtype", "quantization", "zero_point", "embedding_dim", "pooling", "p", "gradcam", "projection",
    "class_names", "cam_scale", "feature_map_output", "bank", "count", "dim", "file", "threshold", "value",
    "scoring", "method", "fusion", "gem_mean", "gem_std", "patch_mean", "patch_std", "patch", "grid",
    "smoothing", "map", "floor", "top", "files", "bank.npz", "head.npz", "embedder.tflite", "patch_bank.npz",
]
WORDS = ["gem", "fused", "patch", "embedding", "model", "avg", "int8", "uint8", "float32", "float16", "RGB",
         "area", "feature_map", "patch_0", "patch_1", "StatefulPartitionedCall_1:0", "0" * 64]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.sampled_from([0, 1, -1, 2, 3, 16, 32, 64, 255, 2**31, 2**63, 10**30])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0.0, -0.0, 0.5, 1e-9, 2.0000001, 1e308, -1e308])
    | st.text(max_size=12)
    | st.sampled_from(WORDS + KNOWN_KEYS)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=6),
                                                                inner, max_size=5),
    max_leaves=12,
)


def key_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside ``node`` (dict keys and list indices), the root excluded."""
    paths = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            paths += key_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            paths += key_paths(v, (*prefix, i))
    return paths


def containers(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to an object inside ``node``, the root included."""
    found = [prefix] if isinstance(node, dict) else []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in children:
        found += containers(v, (*prefix, k))
    return found


def at(node: Any, path: tuple) -> Any:
    for k in path:
        node = node[k]
    return node


@st.composite
def mutated(draw, manifest: dict) -> dict:
    """``manifest`` after 1 to 3 random edits: replace a value, delete a key or list item, add a key."""
    m = json.loads(json.dumps(manifest))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "add":
            path = draw(st.sampled_from(containers(m)))
            at(m, path)[draw(st.sampled_from(KNOWN_KEYS))] = draw(json_values)
            continue
        paths = key_paths(m)
        if not paths:
            break
        *parent, last = draw(st.sampled_from(paths))
        if op == "delete":
            del at(m, tuple(parent))[last]
        else:
            at(m, tuple(parent))[last] = draw(json_values)
    return m


def write_manifest(folder: Path, manifest: dict, rehash: bool) -> None:
    files = manifest.get("files")
    if rehash and isinstance(files, dict):
        for name in files:
            if Path(name).name == name and name not in ("", ".", "..") and (folder / name).is_file():
                files[name] = sha256_bytes((folder / name).read_bytes())
    (folder / "manifest.json").write_text(json.dumps(manifest))  # NaN and Infinity as Python writes them


def load_or_refuse(folder: Path) -> None:
    """Load: a Bundle that works, or a BundleError an explicit check raised (never only the final guard)."""
    from agent.gradcam import GradCamError, anomaly_cam, class_cams
    from agent.preprocess import ImageError
    from agent.scoring import Scorer

    try:
        bundle = load_bundle(folder, num_threads=1)
    except BundleError as exc:
        message = str(exc)
        assert f"bundle {folder}" in message
        assert "unexpectedly" not in message, f"only the last-line guard caught it: {message}"
        event(f"refused, naming {Path(message.split(': ', 1)[0]).name}")  # --hypothesis-show-statistics
        return
    event("loaded")
    try:
        result, emb = Scorer(bundle).score(FRAME)
    except ImageError:  # e.g. an ROI outside this frame: a bad frame, not a bad bundle
        return
    json.dumps(result.as_dict(), allow_nan=False)
    try:
        anomaly_cam(bundle, emb, result.nearest)
        class_cams(bundle, emb)
    except GradCamError:
        pass


FRAME = plain_part_images(1, seed=3)[0]


@pytest.fixture(scope="module")
def bundles(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """name -> (a work folder whose manifest the tests rewrite, the original manifest)."""
    work = tmp_path_factory.mktemp("fuzz")
    fused = build_fused_bundle(work / "fused_src")
    out = {}
    for name, src in (("tiny", tiny_bundle), ("fused", fused)):
        dst = shutil.copytree(src, work / name)
        out[name] = (dst, json.loads((dst / "manifest.json").read_text()))
        load_bundle(dst)  # both load unchanged
    return out


@FUZZ
@given(data=st.data())
def test_any_manifest_mutation_loads_or_is_a_bundle_error(bundles, data) -> None:
    folder, manifest = bundles[data.draw(st.sampled_from(sorted(bundles)))]
    m = data.draw(mutated(manifest))
    write_manifest(folder, m, rehash=True)
    load_or_refuse(folder)
    write_manifest(folder, m, rehash=False)
    load_or_refuse(folder)


@FUZZ
@given(data=st.data())
def test_a_wrong_value_at_a_known_key_path_is_a_bundle_error(bundles, data) -> None:
    """Every edit lands on a key the loader reads, and the hashes are right: the type and range checks decide."""
    folder, manifest = bundles[data.draw(st.sampled_from(sorted(bundles)))]
    m = json.loads(json.dumps(manifest))
    paths = [p for p in key_paths(m) if p[0] not in ("training", "files") and all(isinstance(k, str) for k in p)]
    *parent, last = data.draw(st.sampled_from(paths))
    at(m, tuple(parent))[last] = data.draw(json_values)
    write_manifest(folder, m, rehash=True)
    load_or_refuse(folder)


@FUZZ
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_any_manifest_bytes_load_or_are_a_bundle_error(bundles, raw: bytes) -> None:
    folder, _ = bundles["tiny"]
    (folder / "manifest.json").write_bytes(raw)
    with pytest.raises(BundleError):
        load_bundle(folder)
