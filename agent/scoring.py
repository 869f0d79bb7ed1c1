"""Embed a frame, score it against the normal bank, decide.

score = 1 - max cosine similarity between the frame's embedding and the bank of normal embeddings
(bundles without a ``scoring`` entry, and ``scoring.method: gem``); with ``patch`` the mean distance
of the frame's ``patch.top_k`` worst cells to the patch bank (agent.patches); with ``fused`` (the
trainer's default) the mean of the two, each standardised on normal pictures. The verdict is "anomaly" when
score > threshold. Confidence is the confidence in the verdict given:
p = logistic((score - threshold) / scale) is how anomalous the frame looks, and the confidence is p
for an "anomaly" verdict and 1 - p for "ok"; both are exactly 0.5 at the threshold.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import cv2
import numpy as np

from agent.bundle import Bundle, EmbeddingSpec
from agent.patches import PatchBank, nearest_distances, patch_features, worst_cells
from agent.preprocess import prepare_rgb, scale_to_float
from agent.runtime import TensorInfo, TFLiteModel, quantize


@dataclass(frozen=True)
class Embedding:
    vector: np.ndarray  # (D,), L2-normalised
    feature_map: np.ndarray | None  # (h, w, C) float, when the model exports it
    rgb: np.ndarray  # the prepared HxWx3 uint8 picture the model saw
    patch_map: np.ndarray | None = None  # (gh, gw) distance of each cell to its nearest normal patch


@dataclass(frozen=True)
class ExtraBanks:
    """Normal rows added on the box (agent.feedback's bank extension), searched after the bundle's own.

    Small by design (``feedback.max_extension`` frames): the GeM rows are appended to the bundle's bank
    once per change, the patch rows form a second :class:`PatchBank` whose distances are min-ed with the
    bundle's; a frame costs one more small matrix product, nothing while the extension is empty."""

    gem: np.ndarray  # (n, D) float32, L2-normalised
    patch: PatchBank | None  # cells of the frames, None for bundles without patch scoring


@dataclass(frozen=True)
class ScoreResult:
    score: float
    threshold: float
    verdict: str  # "ok" | "anomaly"
    confidence: float
    latency_ms: float
    nearest: int  # index of the nearest bank vector
    components: dict[str, float] | None = None  # fused bundles: the GeM and patch scores it was made of

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "score": round(self.score, 6),
            "threshold": round(self.threshold, 6),
            "verdict": self.verdict,
            "confidence": round(self.confidence, 4),
            "latency_ms": round(self.latency_ms, 3),
        }
        if self.components:
            d["components"] = {k: round(v, 6) for k, v in self.components.items()}
        return d


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, 1e-12)


GEM_EPS = 1e-6  # the floor under activations before the power; the trainer's Keras layer uses the same


def gem_pool(fmap: np.ndarray, p: float) -> np.ndarray:
    """Generalised mean over positions of a (h, w, C) or (1, h, w, C) map: (C,) float32.

    p = 1 is the average, large p tends to the maximum; p = 3 lets a few strongly activated cells (a
    scratch, a dent) move the channel much more than a plain average would."""
    return np.power(gem_powers(fmap, p).mean(axis=0), np.float32(1.0 / p))


def gem_powers(fmap: np.ndarray, p: float) -> np.ndarray:
    """max(A, eps)^p per cell and channel, (h w, C) float32: what GeM averages (and Grad-CAM weighs)."""
    x = np.maximum(np.asarray(fmap, np.float32).reshape(-1, fmap.shape[-1]), GEM_EPS)
    return x * x * x if p == 3.0 else np.power(x, np.float32(p))  # the cube: 10x faster than pow


def read_embedding(
    model: TFLiteModel, spec: EmbeddingSpec, embedding: TensorInfo | None, feature_map: TensorInfo | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(L2-normalised embedding (D,), feature map (h, w, C) or None) after ``model.invoke()``: the one
    definition the agent and the trainer's export checks share."""
    fmap = model.get_output(feature_map)[0] if feature_map is not None else None
    if spec.pooling == "gem":
        if fmap is None:
            raise ValueError("GeM pooling needs the model's feature_map output")
        return l2_normalize(gem_pool(fmap, spec.p)), fmap
    if embedding is None:
        raise ValueError("the model has no embedding output")
    return l2_normalize(model.get_output(embedding).reshape(-1)), fmap


def cosine_scores(embeddings: np.ndarray, bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1 - max cosine similarity of each row to the (normalised) bank, and the nearest index."""
    sims = l2_normalize(np.atleast_2d(embeddings)) @ bank.T
    nearest = np.argmax(sims, axis=1)
    return 1.0 - sims[np.arange(sims.shape[0]), nearest], nearest


def anomaly_probability(score: float, threshold: float, scale: float) -> float:
    z = (score - threshold) / scale
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-min(z, 700.0)))
    e = math.exp(max(z, -700.0))
    return e / (1.0 + e)


def decide(score: float, threshold: float, scale: float) -> tuple[str, float]:
    """Verdict and the confidence in it (0.5 exactly at the threshold)."""
    p = anomaly_probability(score, threshold, scale)
    if score > threshold:
        return "anomaly", p
    return "ok", 1.0 - p


def input_lut(bundle: Bundle) -> np.ndarray | None:
    """For a quantised input: the tensor value of each 0..255 pixel value, computed once.

    The same arithmetic as ``quantize(scale_to_float(rgb))`` element by element, so the result is
    identical; it spares the per-frame float conversion of a whole picture (a third of the agent's
    own work per frame at 224 px). None for float inputs.
    """
    info = bundle.model.input
    if not info.quantized:
        return None
    levels = np.arange(256, dtype=np.uint8).reshape(1, 256, 1)
    return quantize(scale_to_float(levels, bundle.preprocessing), info).reshape(256)


class Scorer:
    """The per-frame work of the device: preprocess, invoke, score, decide."""

    def __init__(self, bundle: Bundle, threshold: float | None = None) -> None:
        self.bundle = bundle
        self.threshold_override = threshold  # a box's own threshold (cmd/set), or None for the bundle's
        self._input_lut = input_lut(bundle)
        self.extra: ExtraBanks | None = None
        self._gem_bank = bundle.bank  # the bundle's bank, with the extension's GeM rows appended
        self._view = bundle

    def extend(self, extra: ExtraBanks | None) -> None:
        """Search ``extra`` beside the bundle's banks from the next frame on (None: the bundle's alone)."""
        b = self.bundle
        self.extra = extra
        if extra is None or extra.gem.shape[0] == 0:
            self._gem_bank, self._view = b.bank, b
            return
        if extra.gem.shape[1] != b.bank.shape[1]:
            raise ValueError(f"extension rows have {extra.gem.shape[1]} dimensions, the bank {b.bank.shape[1]}")
        self._gem_bank = np.ascontiguousarray(np.vstack([b.bank, extra.gem]), np.float32)
        self._view = dataclasses.replace(b, bank=self._gem_bank)

    @property
    def view(self) -> Bundle:
        """The bundle as this scorer searches it: its bank with the extension's rows appended, which is
        what ``ScoreResult.nearest`` indexes (Grad-CAM draws the difference to that row)."""
        return self._view

    @property
    def threshold(self) -> float:
        """The threshold verdicts are decided with: the override when there is one, else the bundle's."""
        return self.bundle.threshold if self.threshold_override is None else self.threshold_override

    def embed(self, frame: np.ndarray, name: str = "frame") -> Embedding:
        rgb = self._invoke(frame, name)
        vector, fmap = self._read_embedding()
        return Embedding(vector=vector, feature_map=fmap, rgb=rgb, patch_map=self._patch_map())

    def _invoke(self, frame: np.ndarray, name: str) -> np.ndarray:
        """Prepare the frame and run the model on it; the RGB picture the model saw."""
        b = self.bundle
        rgb = prepare_rgb(frame, b.preprocessing, name)
        if self._input_lut is not None:
            b.model.set_input(cv2.LUT(rgb, self._input_lut), raw=True)  # 5x faster than numpy indexing
        else:
            b.model.set_input(scale_to_float(rgb, b.preprocessing))
        b.model.invoke()
        return rgb

    def _read_embedding(self) -> tuple[np.ndarray, np.ndarray | None]:
        b = self.bundle
        return read_embedding(b.model, b.embedding, b.embedding_output, b.feature_map_output)

    def _patch_features(self) -> np.ndarray | None:
        """(cells, Dp) patch features of the frame last invoked, or None without patch scoring."""
        b = self.bundle
        if b.patch is None or b.patch_bank is None:
            return None
        return patch_features([b.model.get_output(o) for o in b.patch_outputs], b.patch.grid, b.patch.smoothing)

    def _patch_map(self) -> np.ndarray | None:
        features = self._patch_features()
        if features is None:
            return None
        b = self.bundle
        distances = nearest_distances(features, b.patch_bank)
        if self.extra is not None and self.extra.patch is not None:
            np.minimum(distances, nearest_distances(features, self.extra.patch), out=distances)
        return distances.reshape(b.patch.grid)

    def extension_features(self, frame: np.ndarray, name: str = "frame") -> tuple[
            np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(GeM embedding (D,), patch features (cells, Dp), each cell's distance to the bundle's own patch
        bank (cells,)) of a frame, prepared as every frame is: what agent.feedback adds to the banks."""
        self._invoke(frame, name)  # not embed(): its patch map (bundle and extension banks) is not wanted here
        vector, _ = self._read_embedding()
        features = self._patch_features()
        if features is None:
            return vector, None, None
        return vector, features, nearest_distances(features, self.bundle.patch_bank)

    def score_embedding(self, vector: np.ndarray) -> tuple[float, int]:
        scores, nearest = cosine_scores(vector, self._gem_bank)
        return float(scores[0]), int(nearest[0])

    def score_frame(self, emb: Embedding) -> tuple[float, int, dict[str, float] | None]:
        """(the bundle's score, nearest bank index, the components of a fused score or None)."""
        gem, nearest = self.score_embedding(emb.vector)
        b = self.bundle
        if b.scoring == "embedding" or emb.patch_map is None:
            return gem, nearest, None
        patch = float(worst_cells(emb.patch_map.reshape(-1), b.patch.top_k if b.patch else 1))
        if b.scoring == "patch" or b.fusion is None:
            return patch, nearest, None
        return float(b.fusion.fuse(gem, patch)), nearest, {"gem": gem, "patch": patch}

    def score(self, frame: np.ndarray, name: str = "frame") -> tuple[ScoreResult, Embedding]:
        t0 = time.perf_counter()
        emb = self.embed(frame, name)
        score, nearest, components = self.score_frame(emb)
        threshold = self.threshold  # read once: a cmd/set between the two uses must not split them
        verdict, confidence = decide(score, threshold, self.bundle.score_scale)
        latency = (time.perf_counter() - t0) * 1000.0
        result = ScoreResult(score, threshold, verdict, confidence, latency, nearest, components)
        return result, emb
