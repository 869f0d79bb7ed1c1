"""Keras embedder -> full-integer int8 TFLite, and the TFLite tensor roles the manifest records."""

from __future__ import annotations

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
    return converter.convert()


def export_float(model: Any) -> bytes:
    """Float32 TFLite of ``model`` (for comparisons and tests)."""
    import tensorflow as tf

    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


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
