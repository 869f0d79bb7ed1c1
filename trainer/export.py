"""Keras embedder -> full-integer int8 TFLite, and the TFLite tensor roles the manifest records."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from agent.bundle import EmbeddingSpec
from agent.runtime import TensorInfo, TFLiteModel
from agent.scoring import read_embedding

logger = logging.getLogger(__name__)


def export_int8(model: Any, representative: Iterable[np.ndarray], bias_correction: bool = True) -> bytes:
    """Full-integer int8 TFLite of ``model`` (float input in the preprocessing's range).

    ``representative`` yields float32 inputs of shape (H, W, 3), normal images prepared with the
    agent's preprocessing; 100-500 of them calibrate the activation ranges. With ``bias_correction``
    (the default) the model converted is a copy whose conv biases cancel the mean error that int8
    weight rounding adds (see :func:`bias_corrected`); ``model`` itself is left untouched.
    """
    import tensorflow as tf

    representative = [np.asarray(x, dtype=np.float32) for x in representative]
    if bias_correction:
        model = bias_corrected(model, np.stack(representative[:BIAS_CORRECTION_IMAGES]))

    def dataset() -> Iterator[list[np.ndarray]]:
        for x in representative:
            yield [np.asarray(x, dtype=np.float32)[None]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return _quiet_convert(converter)


BIAS_CORRECTION_IMAGES = 64  # enough for a stable per-channel mean; each costs one float forward pass


def _int8_per_channel(w: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``w`` rounded the way the converter stores conv weights: symmetric int8 [-127, 127], one
    scale per output channel (max |w| / 127), back in float."""
    scale = np.abs(w).max(axis=axes, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    return (np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32)


def _consumers(model: Any) -> dict[int, list[Any]]:
    """id(layer) -> the layers that take its output."""
    out: dict[int, list[Any]] = {}
    for layer in model.layers:
        for node in layer._inbound_nodes:
            for t in node.input_tensors:
                out.setdefault(id(t._keras_history.operation), []).append(layer)
    return out


def _conv_pairs(model: Any) -> list[tuple[Any, Any | None]]:
    """(conv, the BatchNormalization the converter folds into it, or None) for every Conv2D and
    DepthwiseConv2D whose output offset can be moved: into that BN's beta, or the conv's own bias."""
    import keras

    consumers = _consumers(model)
    pairs = []
    for layer in model.layers:
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            continue
        if len(layer._inbound_nodes) != 1 or getattr(layer, "groups", 1) != 1:
            continue  # shared or grouped convs: not in MobileNetV2, left as they are
        nxt = consumers.get(id(layer), [])
        linear = layer.activation is keras.activations.linear
        if linear and len(nxt) == 1 and isinstance(nxt[0], keras.layers.BatchNormalization) and nxt[0].center:
            pairs.append((layer, nxt[0]))
        elif layer.use_bias:
            pairs.append((layer, None))
    return pairs


def _folded_kernel(conv: Any, bn: Any | None) -> tuple[np.ndarray, tuple[int, ...]]:
    """The kernel the converter quantises (BatchNorm folded in) and its per-channel reduce axes."""
    import keras

    w = keras.ops.convert_to_numpy(conv.kernel).astype(np.float32)
    depthwise = isinstance(conv, keras.layers.DepthwiseConv2D)
    axes = (0, 1, 3) if depthwise else (0, 1, 2)
    if bn is None:
        return w, axes
    gamma = keras.ops.convert_to_numpy(bn.gamma) if bn.scale else 1.0
    k = gamma / np.sqrt(keras.ops.convert_to_numpy(bn.moving_variance) + bn.epsilon)
    return (w * k.reshape((1, 1, -1, 1) if depthwise else (1, 1, 1, -1))).astype(np.float32), axes


def _conv_with(conv: Any, x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``conv``'s linear part (no bias, no activation) applied with another kernel."""
    import keras

    args = {"strides": conv.strides, "padding": conv.padding, "dilation_rate": conv.dilation_rate}
    if isinstance(conv, keras.layers.DepthwiseConv2D):
        return keras.ops.convert_to_numpy(keras.ops.depthwise_conv(x, kernel, **args))
    return keras.ops.convert_to_numpy(keras.ops.conv(x, kernel, **args))


def _weight_rounding_offsets(model: Any, pairs: list[tuple[Any, Any | None]], inputs: np.ndarray, batch: int):
    """Per pair, the mean over ``inputs`` and pixels of what int8 kernel rounding adds to each
    output channel, measured on the float model's own activations."""
    import keras

    errors = []
    for conv, bn in pairs:
        w, axes = _folded_kernel(conv, bn)
        errors.append(_int8_per_channel(w, axes) - w)
    probe = keras.Model(model.inputs, [conv.input for conv, _ in pairs])
    sums: list[np.ndarray | float] = [0.0] * len(pairs)
    counts = [0] * len(pairs)
    for start in range(0, len(inputs), batch):
        xs = probe.predict(inputs[start : start + batch], verbose=0)
        xs = xs if isinstance(xs, list) else [xs]
        for i, (conv, _) in enumerate(pairs):
            err = _conv_with(conv, xs[i], errors[i]).astype(np.float64)
            sums[i] = sums[i] + err.sum(axis=(0, 1, 2))
            counts[i] += err.shape[0] * err.shape[1] * err.shape[2]
    return [np.asarray(s / c, np.float32) for s, c in zip(sums, counts, strict=True)]


def bias_corrected(model: Any, inputs: np.ndarray, batch: int = 8) -> Any:
    """A copy of ``model`` whose int8 conversion agrees better with ``model`` in float.

    Rounding a conv kernel to int8 adds ``conv(x, W_q - W)`` to its output. On pictures that are
    nearly uniform (grey parts, magnetic tiles) that error is almost the same at every pixel, so it
    does not average out in the pooled embedding: it is a per-channel offset that later layers
    amplify (on MobileNetV2 above all ``expanded_conv_depthwise``, 3x3 kernels with large folded
    BatchNorm gains on flat input; docs/INT8.md). Bias correction (Nagel et al. 2019, "Data-Free
    Quantization", section 4.2, empirical variant) measures that offset per output channel on
    ``inputs`` (float activations) and subtracts it from the channel's bias: the BatchNormalization
    beta the converter folds into the conv, or the conv's own bias. Kernels and graph are unchanged,
    so the TFLite model has the same ops and speed. The copy's float outputs differ from
    ``model``'s by design (by those offsets); its int8 outputs are the ones closer to ``model``.
    ``model`` itself is not modified.
    """
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    _correct_nested(copy, inputs, batch)
    pairs = _conv_pairs(copy)
    if not pairs:
        return copy
    offsets = _weight_rounding_offsets(copy, pairs, np.asarray(inputs, np.float32), batch)
    for (conv, bn), offset in zip(pairs, offsets, strict=True):
        target = bn.beta if bn is not None else conv.bias
        target.assign(keras.ops.convert_to_numpy(target) - offset)
    logger.info(
        "int8 bias correction on %d conv layers from %d pictures, largest offset %.4f",
        len(pairs),
        len(inputs),
        max(float(np.abs(o).max()) for o in offsets),
    )
    return copy


def _correct_nested(model: Any, inputs: np.ndarray, batch: int) -> None:
    """Bias-correct, in place, every model nested in ``model`` as one layer (the patch trunk) on the
    activations that reach it: its convs are not among ``model``'s own layers."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            probe = keras.Model(model.inputs, layer._inbound_nodes[0].input_tensors[0])
            reaching = np.asarray(probe.predict(np.asarray(inputs, np.float32), batch_size=batch, verbose=0))
            layer.set_weights(bias_corrected(layer, reaching, batch).get_weights())


def _quiet_convert(converter: Any) -> bytes:
    """Convert, keeping Keras' printed listing of every captured variable out of the user's terminal."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model_bytes = converter.convert()
    logger.debug("converter output:\n%s", buf.getvalue())
    return model_bytes


def export_float(model: Any) -> bytes:
    """Float32 TFLite of ``model`` (for comparisons and tests)."""
    import tensorflow as tf

    return _quiet_convert(tf.lite.TFLiteConverter.from_keras_model(model))


def output_roles(tflite: TFLiteModel) -> dict[str, TensorInfo]:
    """Which output is the embedding (rank 2), which the last conv feature map (the rank-4 output with
    the most channels: 1280 for MobileNetV2) and which the patch maps (the other rank-4 outputs,
    ``patch_0`` the highest resolution); a GeM model has no embedding output."""
    roles: dict[str, TensorInfo] = {}
    maps = []
    for info in tflite.outputs:
        if len(info.shape) == 2:
            roles["embedding"] = info
        elif len(info.shape) == 4:
            maps.append(info)
    if maps:
        maps.sort(key=lambda i: i.shape[-1], reverse=True)
        roles["feature_map"] = maps[0]
        for i, info in enumerate(sorted(maps[1:], key=lambda i: i.shape[1] * i.shape[2], reverse=True)):
            roles[f"patch_{i}"] = info
    if not roles:
        raise ValueError(f"no rank-2 embedding or rank-4 feature map among {[o.shape for o in tflite.outputs]}")
    return roles


def patch_roles(roles: dict[str, TensorInfo]) -> list[str]:
    """The patch map roles of :func:`output_roles`, highest resolution first."""
    return sorted((r for r in roles if r.startswith("patch_")), key=lambda r: int(r.split("_")[1]))


def tflite_manifest(model_bytes: bytes) -> dict[str, Any]:
    """The manifest's ``tflite`` entry: input and outputs with their quantisation."""
    tfl = TFLiteModel(model_bytes)
    return {
        "input": tfl.input.to_manifest(),
        "outputs": {role: info.to_manifest() for role, info in output_roles(tfl).items()},
    }


class ExportError(RuntimeError):
    """An exported model that must not ship (e.g. int8 too far from the float model)."""


MIN_INT8_COSINE = 0.98


def tflite_embeddings(
    model_bytes: bytes, inputs: np.ndarray, num_threads: int | None = None, spec: EmbeddingSpec | None = None
) -> np.ndarray:
    """L2-normalised embeddings (N, D) of float inputs (N, H, W, 3) through the TFLite runtime,
    read by the agent's own :func:`agent.scoring.read_embedding` (``spec``: the bundle's pooling)."""
    return tflite_features(model_bytes, inputs, num_threads, spec, patches=False)[0]


def tflite_features(
    model_bytes: bytes,
    inputs: np.ndarray,
    num_threads: int | None = None,
    spec: EmbeddingSpec | None = None,
    patches: bool = True,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(embeddings (N, D) float32, patch features (N, cells, Dp) float16 or None) of float inputs,
    read exactly as the agent reads a frame (:func:`agent.scoring.read_embedding`,
    :func:`agent.patches.patch_features`); patch features only when the model has patch outputs."""
    from tqdm import tqdm

    from agent.patches import grid_for, patch_features

    tfl = TFLiteModel(model_bytes, num_threads=num_threads)
    roles = output_roles(tfl)
    spec = spec or EmbeddingSpec()
    patch_infos = [roles[r] for r in patch_roles(roles)] if patches else []
    grid = grid_for(patch_infos[0].shape[1:3]) if patch_infos else None
    emb, feats = [], []
    for x in tqdm(inputs, desc="features", unit="img", disable=not progress, leave=False):
        tfl.set_input(np.asarray(x, np.float32))
        tfl.invoke()
        emb.append(read_embedding(tfl, spec, roles.get("embedding"), roles.get("feature_map"))[0])
        if grid is not None:
            feats.append(patch_features([tfl.get_output(i) for i in patch_infos], grid).astype(np.float16))
    return np.stack(emb).astype(np.float32), (np.stack(feats) if feats else None)


def int8_agreement(float_embeddings: np.ndarray, int8_embeddings: np.ndarray) -> dict[str, float]:
    """Mean and minimum cosine between float and int8 embeddings of the same pictures."""
    a = float_embeddings / np.maximum(np.linalg.norm(float_embeddings, axis=1, keepdims=True), 1e-12)
    b = int8_embeddings / np.maximum(np.linalg.norm(int8_embeddings, axis=1, keepdims=True), 1e-12)
    cos = np.sum(a * b, axis=1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "count": int(cos.size)}


def check_int8(agreement: dict[str, float], minimum: float = MIN_INT8_COSINE) -> None:
    if agreement["mean_cosine"] < minimum:
        raise ExportError(
            f"int8 model disagrees with the float model: mean cosine {agreement['mean_cosine']:.4f} < {minimum} "
            f"over {agreement['count']} held-out normals. Give more representative images, train longer "
            "(random weights quantise badly), or check the input scaling"
        )
