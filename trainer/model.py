"""The embedder: MobileNetV2 backbone, pooling (GeM or average), optional projection, L2 norm.

The contract every part of yugami relies on (Grad-CAM included): ONE input (H, W, 3) float in
[-1, 1]; TWO outputs in this order, ``[embedding, feature_map]``, where feature_map is the last
conv feature map (MobileNetV2's ``out_relu``) and embedding = L2normalize(Dense(pool(feature_map)))
or L2normalize(pool(feature_map)) without the projection.

pool is generalised mean pooling (GeM, p = 3) by default: measured on screw and magnetic tile with no
training at all it beats the plain average (docs/TRAINING.md). The exported int8 model then carries only
the feature map and the agent pools it (:func:`agent.scoring.gem_pool`), the same arithmetic as
:class:`GeMPooling` here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from agent.bundle import GEM_P_RANGE
from agent.scoring import GEM_EPS

logger = logging.getLogger(__name__)

FEATURE_MAP_LAYER = "out_relu"
# PatchCore on MobileNetV2 (AMCO-UniPD/PaSTe): torchvision blocks 3 + 8 + 14, in Keras names. Early,
# high-resolution maps see scratches and thin threads; the deep ones (out_relu) do not (0.684 screw).
PATCH_LAYERS = ("block_2_add", "block_7_add", "block_13_project_BN")
PATCH_INPUT_FACTOR = 2  # the patch trunk sees the input at half size: 224 px for 448, the published recipe
POOLINGS = ("gem", "avg")
IMAGENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)


class ModelError(ValueError):
    """A model setting that cannot work; the message says how to fix it."""


@dataclass(frozen=True)
class ModelConfig:
    input_size: tuple[int, int] = (448, 448)  # (height, width); screw threads need 448 (docs/TRAINING.md)
    alpha: float = 1.0  # MobileNetV2 width multiplier
    weights: str = "imagenet"  # "imagenet" (Keras download), "none" (random) or a path to a .h5 weights file
    projection: int = 0  # 0: embedding = L2norm(GAP); D > 0: L2norm(Dense(D)(GAP))
    fine_tune_layers: int = 38  # backbone layers trained, counted from the end (-1: all; 38 = block_13 on)
    pooling: str = "gem"  # "gem": generalised mean (pooled by the agent on the device); "avg": in the model
    gem_p: float = 3.0
    patch: bool = True  # also export the patch trunk's maps (PATCH_LAYERS, ImageNet weights, half size)

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ModelError(f"pooling {self.pooling!r}: use one of {list(POOLINGS)}")
        if not GEM_P_RANGE[0] <= self.gem_p <= GEM_P_RANGE[1]:
            raise ModelError(f"--gem-p {self.gem_p}: use a value in {GEM_P_RANGE[0]}..{GEM_P_RANGE[1]:g} (3 is usual)")
        if self.pooling == "gem" and self.projection > 0:
            raise ModelError(
                "--projection with --pooling gem is not supported: the device pools the feature map itself "
                "and has no projection after it; use --pooling avg with a projection, or no projection"
            )


def resolve_weights(weights: str, alpha: float) -> str | None:
    """The ``weights`` argument for keras.applications, checked so the error is ours, not Keras'."""
    if weights == "none":
        return None
    if weights == "imagenet":
        if alpha not in IMAGENET_ALPHAS:
            raise ModelError(f"ImageNet weights exist for alpha in {IMAGENET_ALPHAS}, not {alpha}")
        return "imagenet"
    path = Path(weights)
    if not path.is_file():
        raise ModelError(f"--weights {weights}: no such file; give 'imagenet', 'none' or a MobileNetV2 .h5 file")
    return str(path)


def build_backbone(cfg: ModelConfig, inputs: Any) -> keras.Model:
    weights = resolve_weights(cfg.weights, cfg.alpha)
    try:
        return keras.applications.MobileNetV2(input_tensor=inputs, alpha=cfg.alpha, include_top=False, weights=weights)
    except ValueError as exc:
        raise ModelError(
            f"could not build MobileNetV2(alpha={cfg.alpha}) with weights {cfg.weights!r}: {exc}. "
            "A weights file must match alpha (the shared file is alpha 1.0)"
        ) from exc


def set_fine_tune(backbone: keras.Model, layers: int) -> int:
    """Make the last ``layers`` layers trainable (-1: all). BatchNorm always stays frozen: with
    batches of 32 mostly-similar pictures its statistics would drift away from what the rest of the
    network expects. Returns the number of trainable weights."""
    all_layers = backbone.layers
    start = 0 if layers < 0 else max(0, len(all_layers) - layers)
    for i, layer in enumerate(all_layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
    return len(backbone.trainable_weights)


@keras.saving.register_keras_serializable(package="yugami")
class GeMPooling(keras.layers.Layer):
    """(B, h, w, C) -> (B, C): ``(mean_ij max(x, eps)^p)^(1/p)``, agent.scoring.gem_pool in Keras."""

    def __init__(self, p: float = 3.0, eps: float = GEM_EPS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.p, self.eps = float(p), float(eps)

    def call(self, x: Any) -> Any:
        powered = keras.ops.power(keras.ops.maximum(x, self.eps), self.p)
        return keras.ops.power(keras.ops.mean(powered, axis=(1, 2)), 1.0 / self.p)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "p": self.p, "eps": self.eps}


def build_patch_trunk(cfg: ModelConfig) -> keras.Model:
    """MobileNetV2 with ImageNet (or the given) weights cut at the patch layers, for an input
    ``PATCH_INPUT_FACTOR`` times smaller than the embedder's; outputs the PATCH_LAYERS maps.

    It is never fine-tuned: the early layers' generic texture features are what patch scoring
    needs, and the self-supervised fine-tune measured worse than ImageNet features on both data sets."""
    h, w = cfg.input_size
    ph, pw = max(32, h // PATCH_INPUT_FACTOR), max(32, w // PATCH_INPUT_FACTOR)
    inputs = keras.Input((ph, pw, 3), name="patch_image")
    trunk = build_backbone(cfg, inputs)
    return keras.Model(inputs, [trunk.get_layer(n).output for n in PATCH_LAYERS], name="patch_trunk")


def export_model(embedder: keras.Model, cfg: ModelConfig) -> keras.Model:
    """What goes into the TFLite file: with GeM the feature map (the agent pools it in float, since a
    cube and cube root lose too much in int8); with average pooling [embedding, feature_map]; with
    ``cfg.patch`` also the patch trunk's maps, highest resolution first, on the input averaged 2x2
    inside the model (one input, one invoke on the box)."""
    outputs = [embedder.outputs[1]] if cfg.pooling == "gem" else list(embedder.outputs)
    if cfg.patch:
        half = keras.layers.AveragePooling2D(PATCH_INPUT_FACTOR, name="patch_input")(embedder.input)
        outputs += list(build_patch_trunk(cfg)(half))
    if len(outputs) == 1:
        return keras.Model(embedder.input, outputs[0], name="yugami_feature_map")
    return keras.Model(embedder.input, outputs, name="yugami_export")


def build_embedder(cfg: ModelConfig) -> tuple[keras.Model, keras.Model]:
    """(embedder with outputs [embedding, feature_map], the backbone inside it)."""
    h, w = cfg.input_size
    inputs = keras.Input((h, w, 3), name="image")
    backbone = build_backbone(cfg, inputs)
    fmap = backbone.get_layer(FEATURE_MAP_LAYER).output
    if cfg.pooling == "gem":
        x = GeMPooling(cfg.gem_p, name="gem")(fmap)
    else:
        x = keras.layers.GlobalAveragePooling2D(name="gap")(fmap)
    if cfg.projection > 0:
        x = keras.layers.Dense(cfg.projection, name="projection")(x)
    emb = keras.layers.UnitNormalization(name="embedding")(x)
    embedder = keras.Model(inputs, [emb, fmap], name="yugami_embedder")
    return embedder, backbone


def build_training_model(embedder: keras.Model, head: keras.layers.Layer) -> keras.Model:
    """[image, label] -> logits: the head sees the label so margins can act on the true class."""
    labels = keras.Input((), dtype="int32", name="label")
    emb, _ = embedder.outputs
    logits = head([emb, labels])
    return keras.Model([embedder.input, labels], logits, name="yugami_trainer")


def head_arrays(embedder: keras.Model, head: Any | None) -> dict[str, np.ndarray]:
    """What Grad-CAM needs of the head: projection kernel/bias, normalised class centres."""
    arrays: dict[str, np.ndarray] = {}
    try:
        proj = embedder.get_layer("projection")
    except ValueError:
        proj = None
    if proj is not None:
        kernel, bias = proj.get_weights()
        arrays["proj_kernel"] = kernel.astype(np.float32)
        arrays["proj_bias"] = bias.astype(np.float32)
    if head is not None:
        arrays["class_weights"] = head.class_weights()
    return arrays
