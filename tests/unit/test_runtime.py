from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.preprocess import Preprocessing, load_image, prepare_rgb
from agent.runtime import TensorInfo, TFLiteModel, dequantize, load_interpreter_class, quantize


def test_foreign_uint8_model_classifies_grace_hopper(shared_dir: Path) -> None:
    ref = shared_dir / "reference_tflite"
    model = TFLiteModel(ref / "mobilenet_v2_1.0_224_quant.tflite", num_threads=1)
    assert model.input.dtype == "uint8" and model.input.quantized
    rgb = prepare_rgb(load_image(ref / "grace_hopper.bmp"), Preprocessing(input_size=(224, 224), resize="linear"))
    # The model's own float domain is [-1, 1]; run() quantises with the input tensor's (scale, zero_point).
    (logits,) = model.run(rgb.astype(np.float32) / 127.5 - 1.0)
    labels = (ref / "imagenet_labels.txt").read_text().splitlines()
    assert labels[int(np.argmax(logits))] == "military uniform"


def test_runtime_prefers_ai_edge_litert() -> None:
    _, name = load_interpreter_class()
    assert name in ("ai_edge_litert", "tflite_runtime")


@pytest.mark.parametrize("dtype,scale,zp", [("int8", 0.05, -3), ("uint8", 0.02, 128)])
def test_quantize_round_trip(dtype: str, scale: float, zp: int) -> None:
    info = TensorInfo("t", 0, (1, 4), dtype, scale, zp)
    x = np.array([[-1.0, -0.2, 0.0, 1.3]], np.float32)
    q = quantize(x, info)
    assert q.dtype == np.dtype(dtype)
    assert np.max(np.abs(dequantize(q, info) - x)) <= scale / 2 + 1e-6


def test_quantize_saturates_instead_of_wrapping() -> None:
    info = TensorInfo("t", 0, (1, 2), "int8", 0.01, 0)
    assert quantize(np.array([100.0, -100.0]), info).tolist() == [127, -128]


def test_float_tensors_pass_through() -> None:
    info = TensorInfo("t", 0, (1, 2), "float32", 0.0, 0)
    x = np.array([0.25, -3.0], np.float32)
    assert np.array_equal(dequantize(quantize(x, info), info), x)
