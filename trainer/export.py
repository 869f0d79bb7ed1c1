"""Keras embedder -> full-integer int8 TFLite, and the TFLite tensor roles the manifest records."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from agent.runtime import TensorInfo, TFLiteModel

logger = logging.getLogger(__name__)


def export_int8(model: Any, representative: Iterable[np.ndarray]) -> bytes:
    """Full-integer int8 TFLite of ``model`` (float input in the preprocessing's range).

    ``representative`` yields float32 inputs of shape (H, W, 3), normal images prepared with the
    agent's preprocessing; 100-500 of them calibrate the activation ranges.
    """
    import tensorflow as tf

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
    """Which output is the embedding (rank 2) and which the last conv feature map (rank 4)."""
    roles: dict[str, TensorInfo] = {}
    for info in tflite.outputs:
        if len(info.shape) == 2:
            roles["embedding"] = info
        elif len(info.shape) == 4:
            roles["feature_map"] = info
    if "embedding" not in roles:
        raise ValueError(f"no rank-2 embedding output among {[o.shape for o in tflite.outputs]}")
    return roles


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


def tflite_embeddings(model_bytes: bytes, inputs: np.ndarray, num_threads: int | None = None) -> np.ndarray:
    """L2-normalised embeddings (N, D) of float inputs (N, H, W, 3) through the TFLite runtime,
    the same calls the agent's scorer makes per frame."""
    tfl = TFLiteModel(model_bytes, num_threads=num_threads)
    emb_info = output_roles(tfl)["embedding"]
    out = []
    for x in inputs:
        tfl.set_input(np.asarray(x, np.float32))
        tfl.invoke()
        out.append(tfl.get_output(emb_info).reshape(-1))
    emb = np.stack(out).astype(np.float32)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


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
