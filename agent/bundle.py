"""The model bundle: a directory with ``manifest.json``, ``embedder.tflite``, ``bank.npz`` (and
optionally ``head.npz`` for Grad-CAM). Written by the trainer, verified in full by the agent.

Nothing here is ever pickled: arrays travel as ``.npz`` read with ``allow_pickle=False``.
A bundle that fails any check raises :class:`BundleError` naming the file and the problem; the
caller keeps whatever bundle it had.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.patches import SCORINGS, Fusion, PatchBank, PatchSpec
from agent.preprocess import Preprocessing
from agent.runtime import TensorInfo, TFLiteModel

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST = "manifest.json"
MODEL_FILE = "embedder.tflite"
BANK_FILE = "bank.npz"
HEAD_FILE = "head.npz"
PATCH_BANK_FILE = "patch_bank.npz"
REQUIRED_KEYS = ("format_version", "model", "preprocessing", "tflite", "embedding_dim", "bank", "threshold", "files")


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and what is wrong."""


POOLINGS = ("model", "gem")
GEM_P_RANGE = (0.5, 16.0)  # beyond 16 GeM is a max pool in all but float32 overflow


@dataclass(frozen=True)
class EmbeddingSpec:
    """Where a frame's embedding comes from (manifest key ``embedding``; absent: ``model``).

    * ``model``: the TFLite model's own rank-2 ``embedding`` output.
    * ``gem``: generalised mean pooling of the ``feature_map`` output, ``(mean_ij max(A_ij, eps)^p)^(1/p)``
      per channel, done here in float: the cube and the cube root do not survive int8 arithmetic inside
      the model, while the int8 feature map itself does (docs/TRAINING.md, "pooling").
    """

    pooling: str = "model"
    p: float = 3.0

    @classmethod
    def from_manifest(cls, d: dict[str, Any] | None) -> EmbeddingSpec:
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError("must be an object like {\"pooling\": \"gem\", \"p\": 3.0}")
        pooling = str(d.get("pooling", "model"))
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is not one of {list(POOLINGS)}")
        p = float(d.get("p", 3.0))
        if not GEM_P_RANGE[0] <= p <= GEM_P_RANGE[1]:
            raise ValueError(f"p {p} is outside {GEM_P_RANGE[0]}..{GEM_P_RANGE[1]:g}")
        return cls(pooling=pooling, p=p)

    def to_manifest(self) -> dict[str, Any]:
        return {"pooling": self.pooling, "p": self.p}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    preprocessing: Preprocessing
    model: TFLiteModel
    embedding_output: TensorInfo | None  # None when the embedding is pooled from the feature map
    feature_map_output: TensorInfo | None
    bank: np.ndarray  # float32 (N, D), rows L2-normalised
    threshold: float
    score_scale: float  # spread of normal scores; sets how fast confidence moves off 0.5
    manifest_sha256: str
    head: dict[str, np.ndarray] = field(default_factory=dict)
    embedding: EmbeddingSpec = field(default_factory=EmbeddingSpec)
    scoring: str = "embedding"  # "embedding": 1 - max cosine; "patch": worst cell; "fused": both (agent.patches)
    patch: PatchSpec | None = None
    patch_outputs: tuple[TensorInfo, ...] = ()
    patch_bank: PatchBank | None = None
    fusion: Fusion | None = None
    map_floor: float = 0.0  # patch distance shown as the coldest colour of the anomaly map
    map_top: float = 1.0  # patch distance shown as the hottest

    @property
    def name(self) -> str:
        return str(self.manifest["model"].get("name", "unnamed"))

    @property
    def version(self) -> str:
        return str(self.manifest["model"].get("version", "0"))

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest["embedding_dim"])


def _fail(path: Path, problem: str) -> BundleError:
    return BundleError(f"bundle {path}: {problem}")


def _read_manifest(root: Path) -> tuple[dict[str, Any], bytes]:
    mpath = root / MANIFEST
    if not root.is_dir():
        raise _fail(root, "not a directory; point 'bundle' at a folder written by yugami-train")
    if not mpath.is_file():
        raise _fail(mpath, "missing file; a bundle folder holds manifest.json, embedder.tflite and bank.npz")
    raw = mpath.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(mpath, f"not valid JSON ({exc}); the file is damaged, copy the bundle again") from exc
    if not isinstance(manifest, dict):
        raise _fail(mpath, "the manifest must be a JSON object")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise _fail(
            mpath,
            f"unknown format version {version!r}; this agent reads {list(SUPPORTED_FORMAT_VERSIONS)}. "
            "Upgrade the agent or re-export the bundle with a matching trainer",
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise _fail(mpath, f"manifest lacks {missing}")
    return manifest, raw


def _read_verified(root: Path, manifest: dict[str, Any]) -> dict[str, bytes]:
    """Every file the manifest lists, read once and checked against its sha256."""
    files = manifest["files"]
    for required in (MODEL_FILE, BANK_FILE):
        if required not in files:
            raise _fail(root / MANIFEST, f"the manifest's 'files' does not list {required}")
    contents: dict[str, bytes] = {}
    for name, expected in files.items():
        fpath = root / name
        if Path(name).name != name:
            raise _fail(root / MANIFEST, f"file entry {name!r} must be a plain file name inside the bundle")
        if not fpath.is_file():
            raise _fail(fpath, "missing file listed in the manifest; copy the whole bundle folder")
        data = fpath.read_bytes()
        actual = sha256_bytes(data)
        if actual != expected:
            raise _fail(
                fpath,
                f"sha256 mismatch (manifest {expected[:12]}..., file {actual[:12]}...): the file was changed "
                "or damaged after export; copy the bundle again or re-export it",
            )
        contents[name] = data
    return contents


def _load_npz(root: Path, name: str, data: bytes) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as exc:
        raise _fail(root / name, f"not a readable .npz of plain arrays ({exc})") from exc


def _check_bank(root: Path, manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> np.ndarray:
    bpath = root / BANK_FILE
    if "bank" not in arrays:
        raise _fail(bpath, "has no array named 'bank'")
    bank = arrays["bank"]
    dim = int(manifest["embedding_dim"])
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise _fail(bpath, f"bank must be a non-empty 2-D array, got shape {bank.shape}")
    if bank.shape[1] != dim:
        raise _fail(bpath, f"bank dimension {bank.shape[1]} disagrees with the model's embedding_dim {dim}")
    declared = manifest["bank"]
    if int(declared.get("count", bank.shape[0])) != bank.shape[0] or int(declared.get("dim", dim)) != bank.shape[1]:
        raise _fail(bpath, f"bank shape {bank.shape} disagrees with the manifest's count/dim {declared}")
    bank = bank.astype(np.float32)
    norms = np.linalg.norm(bank, axis=1, keepdims=True)
    if not np.all(np.isfinite(bank)) or np.any(norms == 0):
        raise _fail(bpath, "bank holds zero or non-finite vectors")
    return bank / norms


def _find_output(root: Path, model: TFLiteModel, spec: dict[str, Any], role: str) -> TensorInfo:
    try:
        info = model.output_by_name(spec["name"])
    except KeyError as exc:
        raise _fail(root / MODEL_FILE, f"{role} output: {exc}") from exc
    if list(info.shape[1:]) != list(spec["shape"][1:]):
        raise _fail(root / MODEL_FILE, f"{role} output has shape {info.shape}, the manifest says {spec['shape']}")
    return info


def _check_model(
    root: Path, manifest: dict[str, Any], model: TFLiteModel, pre: Preprocessing, spec: EmbeddingSpec
) -> tuple[TensorInfo | None, TensorInfo | None]:
    h, w = pre.input_size
    expected_input = (1, h, w, pre.channels)
    if model.input.shape != expected_input:
        raise _fail(
            root / MODEL_FILE,
            f"model input {model.input.shape} disagrees with the preprocessing input_size {pre.input_size}",
        )
    outputs = manifest["tflite"].get("outputs", {})
    fmap = _find_output(root, model, outputs["feature_map"], "feature_map") if "feature_map" in outputs else None
    if spec.pooling == "gem":
        if fmap is None:
            raise _fail(root / MANIFEST, "embedding.pooling is 'gem' but tflite.outputs has no 'feature_map' entry")
        source, emb = fmap, None
    else:
        if "embedding" not in outputs:
            raise _fail(root / MANIFEST, "tflite.outputs has no 'embedding' entry")
        source = emb = _find_output(root, model, outputs["embedding"], "embedding")
    if source.shape[-1] != int(manifest["embedding_dim"]):
        raise _fail(
            root / MODEL_FILE,
            f"{'feature map' if emb is None else 'embedding output'} has dimension {source.shape[-1]}, "
            f"the manifest's embedding_dim is {manifest['embedding_dim']}",
        )
    return emb, fmap


@dataclass(frozen=True)
class PatchParts:
    scoring: str = "embedding"
    spec: PatchSpec | None = None
    outputs: tuple[TensorInfo, ...] = ()
    bank: PatchBank | None = None
    fusion: Fusion | None = None
    map_floor: float = 0.0
    map_top: float = 1.0


def _finite(root: Path, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise _fail(root / MANIFEST, f"'{key}' must be a finite number, not {value!r}; re-export the bundle")
    return float(value)


def _check_patch(root: Path, manifest: dict[str, Any], model: TFLiteModel, contents: dict[str, bytes]) -> PatchParts:
    """The patch scorer of a bundle that has one (manifest keys ``scoring`` and ``patch``)."""
    scoring_entry = manifest.get("scoring")
    if scoring_entry is None:
        return PatchParts()
    if not isinstance(scoring_entry, dict) or scoring_entry.get("method") not in (*SCORINGS, "embedding"):
        raise _fail(root / MANIFEST, f"'scoring.method' must be one of {[*SCORINGS, 'embedding']}")
    method = str(scoring_entry["method"])
    if method in ("gem", "embedding"):
        return PatchParts(scoring="embedding")
    try:
        spec = PatchSpec.from_manifest(manifest.get("patch"))
        fusion = Fusion.from_manifest(scoring_entry.get("fusion")) if method == "fused" else None
    except ValueError as exc:
        raise _fail(root / MANIFEST, f"bad patch scoring entry: {exc}") from exc
    outputs_entry = manifest["tflite"].get("outputs", {})
    outputs = []
    for role in spec.outputs:
        if role not in outputs_entry:
            raise _fail(root / MANIFEST, f"patch.outputs names {role!r} but tflite.outputs has no such entry")
        info = _find_output(root, model, outputs_entry[role], role)
        if len(info.shape) != 4:
            raise _fail(root / MODEL_FILE, f"patch output {role} has shape {info.shape}; it must be (1, h, w, c)")
        outputs.append(info)
    if PATCH_BANK_FILE not in contents:
        raise _fail(root / MANIFEST, f"patch scoring needs {PATCH_BANK_FILE}, and the manifest's 'files' lacks it")
    arrays = _load_npz(root, PATCH_BANK_FILE, contents[PATCH_BANK_FILE])
    rows = arrays.get("bank")
    dim = sum(int(o.shape[-1]) for o in outputs)
    if rows is None or rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] != dim:
        shape = None if rows is None else rows.shape
        raise _fail(root / PATCH_BANK_FILE, f"'bank' must be (N > 0, {dim}) for these patch outputs, got {shape}")
    rows = rows.astype(np.float32)
    if not np.all(np.isfinite(rows)):
        raise _fail(root / PATCH_BANK_FILE, "the patch bank holds non-finite values")
    display = manifest["patch"].get("map", {})
    if not isinstance(display, dict):
        raise _fail(root / MANIFEST, "'patch.map' must be an object with 'floor' and 'top'")
    floor = _finite(root, "patch.map.floor", display.get("floor", 0.0))
    top = _finite(root, "patch.map.top", display.get("top", 1.0))
    if top <= floor:
        raise _fail(root / MANIFEST, f"'patch.map.top' {top} must be above 'patch.map.floor' {floor}")
    return PatchParts(method, spec, tuple(outputs), PatchBank.of(rows), fusion, floor, top)


def load_bundle(path: str | Path, num_threads: int | None = None) -> Bundle:
    """Read and verify a bundle; raise BundleError on any problem."""
    root = Path(path)
    manifest, raw_manifest = _read_manifest(root)
    contents = _read_verified(root, manifest)
    try:
        pre = Preprocessing.from_manifest(manifest["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _fail(root / MANIFEST, f"bad 'preprocessing' entry: {exc}") from exc
    try:
        spec = EmbeddingSpec.from_manifest(manifest.get("embedding"))
    except (TypeError, ValueError) as exc:
        raise _fail(root / MANIFEST, f"bad 'embedding' entry: {exc}") from exc
    bank = _check_bank(root, manifest, _load_npz(root, BANK_FILE, contents[BANK_FILE]))
    head = _load_npz(root, HEAD_FILE, contents[HEAD_FILE]) if HEAD_FILE in contents else {}
    try:
        model = TFLiteModel(contents[MODEL_FILE], num_threads=num_threads)
    except (ValueError, RuntimeError) as exc:
        raise _fail(root / MODEL_FILE, f"the TFLite runtime cannot load it ({exc})") from exc
    emb, fmap = _check_model(root, manifest, model, pre, spec)
    parts = _check_patch(root, manifest, model, contents)
    threshold = manifest["threshold"]
    if not isinstance(threshold, dict) or "value" not in threshold:
        raise _fail(root / MANIFEST, "'threshold' must be an object with a 'value'; re-export the bundle")
    value = _finite(root, "threshold.value", threshold["value"])
    scale = _finite(root, "threshold.scale", threshold.get("scale") or max(abs(value) * 0.1, 1e-6))
    return Bundle(
        path=root,
        manifest=manifest,
        preprocessing=pre,
        model=model,
        embedding_output=emb,
        feature_map_output=fmap,
        bank=bank,
        threshold=value,
        score_scale=scale if scale > 0 else 1e-6,
        manifest_sha256=sha256_bytes(raw_manifest),
        head=head,
        embedding=spec,
        scoring=parts.scoring,
        patch=parts.spec,
        patch_outputs=parts.outputs,
        patch_bank=parts.bank,
        fusion=parts.fusion,
        map_floor=parts.map_floor,
        map_top=parts.map_top,
    )


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def write_bundle(
    out_dir: str | Path,
    *,
    model_bytes: bytes,
    bank: np.ndarray,
    manifest: dict[str, Any],
    head: dict[str, np.ndarray] | None = None,
    extra_files: dict[str, bytes] | None = None,
    patch_bank: np.ndarray | None = None,
) -> Path:
    """Write a bundle atomically: files go into a temporary sibling folder that replaces ``out_dir``.

    ``manifest`` holds everything but ``format_version``, ``files``, ``bank.count/dim/dtype`` and
    ``model.created``, which are filled in here.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    bank16 = np.asarray(bank, dtype=np.float16)
    files: dict[str, bytes] = {MODEL_FILE: model_bytes, BANK_FILE: npz_bytes({"bank": bank16})}
    if head:
        files[HEAD_FILE] = npz_bytes({k: np.asarray(v) for k, v in head.items()})
    if patch_bank is not None:
        patch16 = np.asarray(patch_bank, dtype=np.float16)
        files[PATCH_BANK_FILE] = npz_bytes({"bank": patch16})
    files.update(extra_files or {})
    full = dict(manifest)
    if patch_bank is not None:
        full["patch"] = {
            **manifest.get("patch", {}),
            "bank": {"file": PATCH_BANK_FILE, "count": int(patch16.shape[0]), "dim": int(patch16.shape[1]),
                     "dtype": "float16"},
        }
    full["format_version"] = FORMAT_VERSION
    full["model"] = {**manifest.get("model", {}), "created": dt.datetime.now(dt.timezone.utc).isoformat()}
    full["bank"] = {
        **manifest.get("bank", {}),
        "file": BANK_FILE,
        "count": int(bank16.shape[0]),
        "dim": int(bank16.shape[1]),
        "dtype": "float16",
    }
    full["files"] = {name: sha256_bytes(data) for name, data in files.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote bundle %s (%d files)", out, len(files) + 1)
    return out
