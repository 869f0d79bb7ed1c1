"""The model bundle: a directory with ``manifest.json``, ``embedder.tflite``, ``bank.npz`` (and
optionally ``head.npz`` for Grad-CAM). Written by the trainer, verified in full by the agent.

Nothing here is ever pickled: arrays travel as ``.npz`` read with ``allow_pickle=False``.
A bundle that fails any check raises :class:`BundleError` naming the file and the problem; the
caller keeps whatever bundle it had.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.patches import SCORINGS, Fusion, PatchBank, PatchSpec, finite_number
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
    def from_manifest(cls, d: Any) -> EmbeddingSpec:
        """The manifest's ``embedding`` entry (absent or null: the model's own embedding output)."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError("must be an object like {\"pooling\": \"gem\", \"p\": 3.0}")
        pooling = d.get("pooling")
        pooling = "model" if pooling is None else pooling
        if not isinstance(pooling, str) or pooling not in POOLINGS:
            raise ValueError(f"embedding.pooling {_short(pooling)} is not one of {list(POOLINGS)}")
        p = finite_number(3.0 if d.get("p") is None else d["p"])
        if p is None:
            raise ValueError(f"embedding.p must be a finite number, not {_short(d['p'])}")
        if not GEM_P_RANGE[0] <= p <= GEM_P_RANGE[1]:
            raise ValueError(f"embedding.p {p} is outside {GEM_P_RANGE[0]}..{GEM_P_RANGE[1]:g}")
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
    # {"key_id", "name", "signed_at"} of a verified signature (agent.trust), set by
    # agent.service.load_agent_bundle; None: unsigned, or not checked (no bundle_trust keys)
    signer: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return str(self.manifest["model"].get("name") or "unnamed")

    @property
    def version(self) -> str:
        version = self.manifest["model"].get("version")
        return "0" if version is None else str(version)

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest["embedding_dim"])


def model_info(bundle: Bundle | None) -> dict[str, Any]:
    """The model as stats, command results and events name it: name, version, sha256, signer."""
    if bundle is None:
        return {"name": None, "version": None, "sha256": None, "signer": None}
    signer = {"key_id": bundle.signer["key_id"], "name": bundle.signer["name"]} if bundle.signer else None
    return {"name": bundle.name, "version": bundle.version, "sha256": bundle.manifest_sha256, "signer": signer}


def _fail(path: Path, problem: str) -> BundleError:
    return BundleError(f"bundle {path}: {problem}")


# --- reading manifest entries with their types checked ---------------------------------------------------

REEXPORT = "re-export the bundle with yugami-train (or copy it again if it was damaged)"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # a real manifest is a few kB; this only keeps a wrong file from filling memory
INPUT_DTYPES = ("int8", "uint8", "float32")  # what agent.runtime.quantize can feed
EMBEDDING_SCORE_RANGE = (0.0, 2.0)  # 1 - max cosine similarity
MAX_INPUT_SIDE = 16384  # pixels; a bigger model input is a damaged manifest, not a model
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the model's float input must stay finite
RANGE_SLACK = 1e-6  # float rounding of a threshold calibrated at the edge of its score's range
_REQUIRED = object()


def _kind(value: Any) -> str:
    """The JSON type of ``value`` in words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(value: Any) -> str:
    """``value`` for a message: JSON spelling for scalars, cut short, big integers by their size."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int) and abs(value) > 10**18:
        return f"an integer of {len(str(abs(value))) if value.bit_length() < 14000 else 'thousands of'} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _what(value: Any) -> str:
    """``value`` described for 'must be X, not ...'."""
    if value is None or isinstance(value, (bool, int, float)):
        return _short(value)
    return f"{_kind(value)} {_short(value)}"


def _as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class _Entry:
    """One JSON object of the manifest, read key by key with type and range checked.

    Every problem is a :class:`BundleError` naming the manifest file and the dotted key. An optional key
    (one given a ``default``) that is absent or null reads as its default; a required one must be there.
    """

    file: Path
    data: dict[str, Any]
    prefix: str = ""

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, problem: str, fix: str = REEXPORT) -> BundleError:
        return _fail(self.file, f"'{self.key(name)}' {problem}; {fix}")

    def _raw(self, name: str, default: Any) -> tuple[bool, Any]:
        """(present, value): absent or null optional keys give (False, default)."""
        value = self.data.get(name)
        if value is None:
            if default is _REQUIRED:
                raise self.fail(name, "is missing" if name not in self.data else "must not be null")
            return False, default
        return True, value

    def obj(self, name: str, optional: bool = False) -> _Entry | None:
        present, value = self._raw(name, None if optional else _REQUIRED)
        if not present:
            return None
        if not isinstance(value, dict):
            raise self.fail(name, f"must be an object, not {_kind(value)}")
        return _Entry(self.file, value, self.key(name))

    def req(self, name: str) -> _Entry:
        """A required object."""
        _, value = self._raw(name, _REQUIRED)
        if not isinstance(value, dict):
            raise self.fail(name, f"must be an object, not {_kind(value)}")
        return _Entry(self.file, value, self.key(name))

    def string(self, name: str, default: Any = _REQUIRED, choices: tuple[str, ...] | None = None) -> Any:
        present, value = self._raw(name, default)
        if not present:
            return value
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, not {_kind(value)}")
        if choices is not None and value not in choices:
            raise self.fail(name, f"is {_short(value)}, not one of {list(choices)}")
        return value

    def integer(self, name: str, default: Any = _REQUIRED, lo: int | None = None) -> Any:
        present, value = self._raw(name, default)
        if not present:
            return value
        if _as_int(value) is None:
            raise self.fail(name, f"must be an integer, not {_what(value)}")
        if lo is not None and value < lo:
            raise self.fail(name, f"is {_short(value)}; it must be at least {lo}")
        return value

    def number(self, name: str, default: Any = _REQUIRED, lo: float | None = None, positive: bool = False) -> Any:
        present, value = self._raw(name, default)
        if not present:
            return value
        f = finite_number(value)
        if f is None:
            raise self.fail(name, f"must be a finite number, not {_what(value)}")
        if positive and f <= 0:
            raise self.fail(name, f"is {f:g}; it must be above 0")
        if lo is not None and f < lo:
            raise self.fail(name, f"is {f:g}; it must be at least {lo:g}")
        return f

    def boolean(self, name: str, default: Any = _REQUIRED) -> Any:
        present, value = self._raw(name, default)
        if present and not isinstance(value, bool):
            raise self.fail(name, f"must be true or false, not {_kind(value)}")
        return value

    def ints(self, name: str, length: int | None = None, lo: int = 0, default: Any = _REQUIRED) -> Any:
        present, value = self._raw(name, default)
        if not present:
            return value
        if (
            not isinstance(value, list)
            or (length is not None and len(value) != length)
            or not all(_as_int(v) is not None and v >= lo for v in value)
        ):
            size = f"{length} " if length is not None else ""
            raise self.fail(name, f"must be a list of {size}integers >= {lo}, not {_short(value)}")
        return [int(v) for v in value]

    def strings(self, name: str, default: Any = _REQUIRED) -> Any:
        present, value = self._raw(name, default)
        if present and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise self.fail(name, f"must be a list of strings, not {_short(value)}")
        return value

    def objects(self, name: str) -> dict[str, _Entry]:
        """A required object whose every value is an object (e.g. ``tflite.outputs``), by key."""
        entry = self.req(name)
        return {k: entry.req(k) for k in entry.data}


@contextlib.contextmanager
def _guard(path: Path, stage: str) -> Iterator[None]:
    """The last line of defence: a malformed value the explicit checks missed is still a BundleError."""
    try:
        yield
    except BundleError:
        raise
    except (TypeError, KeyError, ValueError, AttributeError, IndexError, OverflowError) as exc:
        logger.debug("unchecked bundle problem while %s", stage, exc_info=True)
        raise _fail(path, f"{stage} failed unexpectedly ({type(exc).__name__}: {exc}); {REEXPORT}") from exc


# --- the manifest on its own ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    """A tensor as the manifest's ``tflite`` entry describes it."""

    key: str
    name: str | None
    shape: list[int]
    dtype: str | None
    scale: float | None
    zero_point: int | None

    @classmethod
    def read(cls, e: _Entry, name_required: bool) -> _Tensor:
        name = e.string("name") if name_required else e.string("name", None)
        q = e.obj("quantization", optional=True)
        return cls(
            key=e.prefix,
            name=name,
            shape=e.ints("shape"),
            dtype=e.string("dtype", None),
            scale=q.number("scale", lo=0.0) if q else None,
            zero_point=q.integer("zero_point") if q else None,
        )


@dataclass(frozen=True)
class _Manifest:
    """Every manifest field the agent uses, type- and range-checked (nothing here has seen the files yet)."""

    files: dict[str, str]
    preprocessing: Preprocessing
    embedding: EmbeddingSpec
    embedding_dim: int
    bank: _Entry
    tflite_input: _Tensor
    outputs: dict[str, _Tensor]
    threshold: float
    score_scale: float
    scoring: str
    patch: PatchSpec | None
    patch_bank: _Entry | None
    fusion: Fusion | None
    map_floor: float
    map_top: float
    gradcam_projection: bool | None


def _read_manifest(root: Path) -> tuple[dict[str, Any], bytes]:
    mpath = root / MANIFEST
    if not root.is_dir():
        raise _fail(root, "not a directory; point 'bundle' at a folder written by yugami-train")
    if not mpath.is_file():
        raise _fail(mpath, "missing file; a bundle folder holds manifest.json, embedder.tflite and bank.npz")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise _fail(mpath, f"{mpath.stat().st_size} bytes is not a manifest (at most {MAX_MANIFEST_BYTES}); {REEXPORT}")
    raw = mpath.read_bytes()
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, a 5000-digit integer, deep nesting
        raise _fail(mpath, f"not valid JSON ({_short(str(exc))}); the file is damaged, copy the bundle again") from exc
    if not isinstance(manifest, dict):
        raise _fail(mpath, f"the manifest must be a JSON object; {REEXPORT}")
    version = manifest.get("format_version")
    if _as_int(version) is None or version not in SUPPORTED_FORMAT_VERSIONS:
        raise _fail(
            mpath,
            f"unknown format version {_short(version)}; this agent reads {list(SUPPORTED_FORMAT_VERSIONS)}. "
            "Upgrade the agent or re-export the bundle with a matching trainer",
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise _fail(mpath, f"manifest lacks {missing}; {REEXPORT}")
    return manifest, raw


def _files(m: _Entry) -> dict[str, str]:
    entry = m.req("files")
    files: dict[str, str] = {}
    for name, digest in entry.data.items():
        if not name or name in (".", "..") or Path(name).name != name or "\\" in name or "\x00" in name:
            raise entry.fail(name, "must be a plain file name inside the bundle")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise entry.fail(name, f"must be a sha256 of 64 lowercase hex digits, not {_short(digest)}")
        files[name] = digest
    for required in (MODEL_FILE, BANK_FILE):
        if required not in files:
            raise m.fail("files", f"does not list {required}")
    return files


def _preprocessing(m: _Entry) -> Preprocessing:
    e = m.req("preprocessing")
    roi = e.ints("roi", length=4, default=None)
    size = e.ints("input_size", length=2, lo=1)
    if max(size) > MAX_INPUT_SIDE:
        raise e.fail("input_size", f"{_short(size)} is larger than {MAX_INPUT_SIDE} pixels a side")
    fields: dict[str, Any] = {
        "input_size": tuple(size),
        "channels": e.integer("channels", 3),
        "color_order": e.string("color_order", "RGB"),
        "resize": e.string("resize", "area"),
        "roi": tuple(roi) if roi is not None else None,
        "scale": e.number("scale", positive=True),
        "offset": e.number("offset"),
    }
    if abs(fields["scale"]) * 255.0 + abs(fields["offset"]) > FLOAT32_MAX:
        raise e.fail("scale", "and 'preprocessing.offset' take pixel values beyond float32")
    try:
        return Preprocessing(**fields)  # its own checks: resize method, RGB, size >= 32, ROI
    except ValueError as exc:
        raise _fail(e.file, f"bad 'preprocessing' entry: {exc}; {REEXPORT}") from exc


def _embedding(m: _Entry) -> EmbeddingSpec:
    try:
        return EmbeddingSpec.from_manifest(m.data.get("embedding"))
    except ValueError as exc:
        raise _fail(m.file, f"bad 'embedding' entry: {exc}; {REEXPORT}") from exc


def _threshold(m: _Entry, scoring: str) -> tuple[float, float]:
    """The threshold and the score scale; the threshold must lie in the range the score can take."""
    e = m.req("threshold")
    value = e.number("value")
    if scoring == "embedding":
        lo, hi = EMBEDDING_SCORE_RANGE
        if not lo - RANGE_SLACK <= value <= hi + RANGE_SLACK:
            raise e.fail("value", f"is {value:g}, outside {lo:g}..{hi:g}, the range of the score 1 - max cosine")
    elif scoring == "patch" and value < -RANGE_SLACK:
        raise e.fail("value", f"is {value:g}; a patch score is a distance, so the threshold must be at least 0")
    scale = e.number("scale", 0.0, lo=0.0)  # absent, null or 0: derived from the threshold
    return value, scale if scale > 0 else max(abs(value) * 0.1, 1e-6)


def _scoring(m: _Entry, pre: Preprocessing) -> tuple[str, PatchSpec | None, _Entry | None, Fusion | None, float, float]:
    """(scoring, patch spec, patch bank entry, fusion, map floor, map top) from ``scoring`` and ``patch``."""
    s = m.obj("scoring", optional=True)
    if s is None:
        return "embedding", None, None, None, 0.0, 1.0
    method = s.string("method", choices=(*SCORINGS, "embedding"))
    if method in ("gem", "embedding"):
        return "embedding", None, None, None, 0.0, 1.0
    try:
        spec = PatchSpec.from_manifest(m.data.get("patch"))
        fusion = Fusion.from_manifest(s.data.get("fusion")) if method == "fused" else None
    except ValueError as exc:
        raise _fail(m.file, f"bad patch scoring entry: {exc}; {REEXPORT}") from exc
    if spec.grid[0] > pre.input_size[0] or spec.grid[1] > pre.input_size[1]:
        raise m.fail("patch.grid", f"{_short(list(spec.grid))} is finer than the model input {list(pre.input_size)}")
    p = m.req("patch")
    display = p.obj("map", optional=True) or _Entry(m.file, {}, "patch.map")
    floor = display.number("floor", 0.0)
    top = display.number("top", 1.0)
    if top <= floor:
        raise display.fail("top", f"{top:g} must be above 'patch.map.floor' {floor:g}")
    return method, spec, p.obj("bank", optional=True), fusion, floor, top


def _gradcam(m: _Entry) -> bool | None:
    """The ``gradcam`` entry checked; returns its ``projection`` flag (None when not said)."""
    g = m.obj("gradcam", optional=True)
    if g is None:
        return None
    g.string("feature_map_output", None)
    g.string("pooling", None, choices=("avg", "gem"))
    g.strings("class_names", None)
    g.number("cam_scale", None, positive=True)
    return g.boolean("projection", None)


def _model_entry(m: _Entry) -> None:
    e = m.req("model")
    e.string("name", None)
    version = e.data.get("version")
    if version is not None and not isinstance(version, str) and _as_int(version) is None:
        raise e.fail("version", f"must be a string or an integer, not {_kind(version)}")


def _parse_manifest(m: _Entry) -> _Manifest:
    pre = _preprocessing(m)
    tfl = m.req("tflite")
    outputs = {role: _Tensor.read(e, name_required=True) for role, e in tfl.objects("outputs").items()}
    scoring, patch, patch_bank, fusion, floor, top = _scoring(m, pre)
    value, scale = _threshold(m, scoring)
    _model_entry(m)
    return _Manifest(
        files=_files(m),
        preprocessing=pre,
        embedding=_embedding(m),
        embedding_dim=m.integer("embedding_dim", lo=1),
        bank=m.req("bank"),
        tflite_input=_Tensor.read(tfl.req("input"), name_required=False),
        outputs=outputs,
        threshold=value,
        score_scale=scale,
        scoring=scoring,
        patch=patch,
        patch_bank=patch_bank,
        fusion=fusion,
        map_floor=floor,
        map_top=top,
        gradcam_projection=_gradcam(m),
    )


# --- the files, against the manifest --------------------------------------------------------------------


def _read_verified(root: Path, files: dict[str, str]) -> dict[str, bytes]:
    """Every file the manifest lists, read once and checked against its sha256."""
    contents: dict[str, bytes] = {}
    for name, expected in files.items():
        fpath = root / name
        if not fpath.is_file():
            raise _fail(fpath, "missing file listed in the manifest; copy the whole bundle folder")
        data = fpath.read_bytes()
        actual = sha256_bytes(data)
        if actual != expected:
            raise _fail(
                fpath,
                f"sha256 mismatch (manifest {expected[:12]}..., file {actual[:12]}...): the file was changed "
                "or damaged after export (or after signing); copy the bundle again or re-export it",
            )
        contents[name] = data
    return contents


def _load_npz(root: Path, name: str, data: bytes) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz``: plain numeric arrays only (no pickles, no raw members)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise _fail(root / name, f"not a readable .npz of plain arrays ({exc}); {REEXPORT}") from exc
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
            raise _fail(
                root / name, f"not a readable .npz of plain arrays ('{key}' is {kind}, not numbers); {REEXPORT}"
            )
    return arrays


def _float_rows(root: Path, name: str, arrays: dict[str, np.ndarray], declared: _Entry | None, dim: int) -> np.ndarray:
    """The (N > 0, dim) float array ``bank`` of ``name``, as the manifest declares it, in float32."""
    path = root / name
    rows = arrays.get("bank")
    if rows is None:
        raise _fail(path, f"has no array named 'bank'; {REEXPORT}")
    if rows.dtype.kind != "f":
        raise _fail(path, f"'bank' holds {rows.dtype}, not floats; {REEXPORT}")
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise _fail(path, f"bank must be a non-empty 2-D array, got shape {rows.shape}; {REEXPORT}")
    if rows.shape[1] != dim:
        what = "the model's embedding_dim" if name == BANK_FILE else "the patch outputs' channels"
        raise _fail(path, f"bank dimension {rows.shape[1]} disagrees with {what} {dim}; {REEXPORT}")
    if declared is not None:
        count, ddim = declared.integer("count", rows.shape[0]), declared.integer("dim", rows.shape[1])
        if (count, ddim) != rows.shape:
            raise _fail(
                path,
                f"bank shape {rows.shape} disagrees with '{declared.prefix}' count {count}, dim {ddim}; {REEXPORT}"
            )
        dtype = declared.string("dtype", rows.dtype.name)
        if dtype != rows.dtype.name:
            raise declared.fail("dtype", f"is {_short(dtype)} but {name} holds {rows.dtype.name}")
        file = declared.string("file", name)
        if file != name:
            raise declared.fail("file", f"is {_short(file)}; this agent reads the bank from {name}")
    rows = rows.astype(np.float32)
    if not np.all(np.isfinite(rows)):
        raise _fail(path, f"the bank holds non-finite values; {REEXPORT}")
    return rows


def _check_bank(root: Path, m: _Manifest, arrays: dict[str, np.ndarray]) -> np.ndarray:
    bank = _float_rows(root, BANK_FILE, arrays, m.bank, m.embedding_dim)
    norms = np.linalg.norm(bank, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise _fail(root / BANK_FILE, f"bank holds zero vectors; {REEXPORT}")
    return bank / norms


def _load_model(root: Path, data: bytes, num_threads: int | None) -> TFLiteModel:
    try:
        model = TFLiteModel(data, num_threads=num_threads)
    except (ValueError, RuntimeError) as exc:
        raise _fail(root / MODEL_FILE, f"the TFLite runtime cannot load it ({exc}); {REEXPORT}") from exc
    if len(model.inputs) != 1:
        raise _fail(
            root / MODEL_FILE, f"the model has {len(model.inputs)} inputs; an embedder has one image input; {REEXPORT}"
        )
    return model


def _same_tensor(root: Path, m: _Manifest, t: _Tensor, info: TensorInfo) -> None:
    """The manifest's dtype and quantisation of a tensor are the model's own."""
    def mismatch(field: str, said: Any, actual: Any) -> BundleError:
        return _fail(
            root / MANIFEST,
            f"'{t.key}.{field}' is {_short(said)} but {MODEL_FILE}'s tensor {info.name!r} has {actual!r}: "
            f"the manifest does not describe this model; {REEXPORT}",
        )

    if t.dtype is not None and t.dtype != info.dtype:
        raise mismatch("dtype", t.dtype, info.dtype)
    if t.scale is not None and not math.isclose(t.scale, info.scale, rel_tol=1e-6, abs_tol=1e-12):
        raise mismatch("quantization.scale", t.scale, info.scale)
    if t.zero_point is not None and t.zero_point != info.zero_point:
        raise mismatch("quantization.zero_point", t.zero_point, info.zero_point)


def _check_input(root: Path, m: _Manifest, model: TFLiteModel) -> None:
    info = model.input
    h, w = m.preprocessing.input_size
    if info.shape != (1, h, w, m.preprocessing.channels):
        raise _fail(
            root / MANIFEST,
            f"'preprocessing.input_size' {[h, w]} disagrees with {MODEL_FILE}'s input {info.shape}; {REEXPORT}",
        )
    if list(info.shape) != m.tflite_input.shape:
        shape = _short(m.tflite_input.shape)
        raise _fail(root / MANIFEST, f"'tflite.input.shape' {shape} is not the model's {info.shape}; {REEXPORT}")
    if info.dtype not in INPUT_DTYPES:
        feeds = list(INPUT_DTYPES)
        raise _fail(root / MODEL_FILE, f"the model's input is {info.dtype}; the agent feeds {feeds}; {REEXPORT}")
    if info.dtype != "float32" and not (info.quantized and math.isfinite(info.scale)):
        raise _fail(
            root / MODEL_FILE, f"the model's {info.dtype} input has no usable quantisation ({info.scale}); {REEXPORT}"
        )
    _same_tensor(root, m, m.tflite_input, info)


def _check_outputs(root: Path, m: _Manifest, model: TFLiteModel) -> dict[str, TensorInfo]:
    """Each output role of ``tflite.outputs``, found in the model by name, with its shape and quantisation."""
    found: dict[str, TensorInfo] = {}
    for role, t in m.outputs.items():
        try:
            info = model.output_by_name(t.name or "")
        except KeyError as exc:
            raise _fail(root / MODEL_FILE, f"{role} output ('{t.key}.name'): {exc.args[0]}; {REEXPORT}") from exc
        if list(info.shape[1:]) != t.shape[1:] or len(info.shape) != len(t.shape):
            problem = f"{role} output has shape {info.shape}, the manifest says {_short(t.shape)}"
            raise _fail(root / MODEL_FILE, f"{problem}; {REEXPORT}")
        _same_tensor(root, m, t, info)
        found[role] = info
    return found


def _embedding_source(
    root: Path, m: _Manifest, outputs: dict[str, TensorInfo]
) -> tuple[TensorInfo | None, TensorInfo | None]:
    """(embedding output or None, feature map output or None), checked against embedding_dim."""
    fmap = outputs.get("feature_map")
    if fmap is not None and len(fmap.shape) != 4:
        raise _fail(
            root / MODEL_FILE, f"feature_map output has shape {fmap.shape}; it must be (1, h, w, c); {REEXPORT}"
        )
    if m.embedding.pooling == "gem":
        if fmap is None:
            raise _fail(
                root / MANIFEST, f"embedding.pooling is 'gem' but tflite.outputs has no 'feature_map' entry; {REEXPORT}"
            )
        source, emb = fmap, None
    else:
        if "embedding" not in outputs:
            raise _fail(root / MANIFEST, f"tflite.outputs has no 'embedding' entry; {REEXPORT}")
        source = emb = outputs["embedding"]
        if len(emb.shape) != 2:
            raise _fail(root / MODEL_FILE, f"embedding output has shape {emb.shape}; it must be (1, D); {REEXPORT}")
    if source.shape[-1] != m.embedding_dim:
        raise _fail(
            root / MODEL_FILE,
            f"{'feature map' if emb is None else 'embedding output'} has dimension {source.shape[-1]}, "
            f"the manifest's embedding_dim is {m.embedding_dim}; {REEXPORT}",
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


def _check_patch(root: Path, m: _Manifest, found: dict[str, TensorInfo], contents: dict[str, bytes]) -> PatchParts:
    """The patch scorer of a bundle that has one (manifest keys ``scoring`` and ``patch``)."""
    if m.patch is None:
        return PatchParts(scoring=m.scoring)
    outputs = []
    for role in m.patch.outputs:
        if role not in found:
            raise _fail(
                root / MANIFEST, f"patch.outputs names {role!r} but tflite.outputs has no such entry; {REEXPORT}"
            )
        info = found[role]
        if len(info.shape) != 4:
            raise _fail(
                root / MODEL_FILE, f"patch output {role} has shape {info.shape}; it must be (1, h, w, c); {REEXPORT}"
            )
        outputs.append(info)
    if PATCH_BANK_FILE not in contents:
        raise _fail(
            root / MANIFEST, f"patch scoring needs {PATCH_BANK_FILE}, and the manifest's 'files' lacks it; {REEXPORT}"
        )
    dim = sum(int(o.shape[-1]) for o in outputs)
    arrays = _load_npz(root, PATCH_BANK_FILE, contents[PATCH_BANK_FILE])
    rows = _float_rows(root, PATCH_BANK_FILE, arrays, m.patch_bank, dim)
    return PatchParts(m.scoring, m.patch, tuple(outputs), PatchBank.of(rows), m.fusion, m.map_floor, m.map_top)


def _head_array(path: Path, head: dict[str, np.ndarray], key: str, shape: tuple[int | None, ...]) -> None:
    """``head[key]``, when there, must be a non-empty finite float array of ``shape`` (None: any size)."""
    a = head.get(key)
    if a is None:
        return
    fits = a.ndim == len(shape) and all(w is None or have == w for have, w in zip(a.shape, shape, strict=True))
    if not fits or a.size == 0 or a.dtype.kind != "f":
        wanted = "(" + ", ".join("K" if w is None else str(w) for w in shape) + (",)" if len(shape) == 1 else ")")
        raise _fail(
            path, f"'{key}' is {a.dtype} {a.shape}; Grad-CAM needs floats of shape {wanted} for this model; {REEXPORT}"
        )
    if not np.all(np.isfinite(a)):
        raise _fail(path, f"'{key}' holds non-finite values; {REEXPORT}")


def _check_head(root: Path, m: _Manifest, fmap: TensorInfo | None, contents: dict[str, bytes]) -> dict[str, np.ndarray]:
    """head.npz, when listed: the arrays Grad-CAM multiplies, with shapes that fit the model.

    ``proj_kernel`` (C, D): C the feature map's channels, D the embedding_dim; ``proj_bias`` (D,);
    ``class_weights`` (D, K). Other arrays are ignored."""
    if HEAD_FILE not in contents:
        if m.gradcam_projection:
            raise _fail(root / MANIFEST, f"'gradcam.projection' is true but 'files' lists no {HEAD_FILE}; {REEXPORT}")
        return {}
    path = root / HEAD_FILE
    head = _load_npz(root, HEAD_FILE, contents[HEAD_FILE])
    d = m.embedding_dim
    _head_array(path, head, "proj_kernel", (None if fmap is None else int(fmap.shape[-1]), d))
    _head_array(path, head, "proj_bias", (d,))
    _head_array(path, head, "class_weights", (d, None))
    if "proj_bias" in head and "proj_kernel" not in head:
        raise _fail(path, f"has 'proj_bias' without 'proj_kernel'; {REEXPORT}")
    if m.gradcam_projection and "proj_kernel" not in head:
        raise _fail(path, f"has no 'proj_kernel', and the manifest's 'gradcam.projection' is true; {REEXPORT}")
    return head


def load_bundle(path: str | Path, num_threads: int | None = None) -> Bundle:
    """Read and verify a bundle; raise BundleError, naming the file and the key, on any problem."""
    root = Path(path)
    manifest, raw_manifest = _read_manifest(root)
    with _guard(root / MANIFEST, "reading the manifest"):
        m = _parse_manifest(_Entry(root / MANIFEST, manifest))
    contents = _read_verified(root, m.files)
    with _guard(root / BANK_FILE, "checking the bank"):
        bank = _check_bank(root, m, _load_npz(root, BANK_FILE, contents[BANK_FILE]))
    model = _load_model(root, contents[MODEL_FILE], num_threads)
    with _guard(root / MODEL_FILE, "matching the model to the manifest"):
        _check_input(root, m, model)
        found = _check_outputs(root, m, model)
        emb, fmap = _embedding_source(root, m, found)
        parts = _check_patch(root, m, found, contents)
    with _guard(root / HEAD_FILE, "checking the Grad-CAM head"):
        head = _check_head(root, m, fmap, contents)
    return Bundle(
        path=root,
        manifest=manifest,
        preprocessing=m.preprocessing,
        model=model,
        embedding_output=emb,
        feature_map_output=fmap,
        bank=bank,
        threshold=m.threshold,
        score_scale=m.score_scale,
        manifest_sha256=sha256_bytes(raw_manifest),
        head=head,
        embedding=m.embedding,
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
