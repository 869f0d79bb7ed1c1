"""The ImageNet MobileNetV2 embedder on magnetic tile passes the 0.98 int8 gate only with bias
correction (docs/INT8.md). Small version of bench/int8_study.py: 96 px, 48 + 16 pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

pytestmark = pytest.mark.integration


def test_bias_correction_lifts_tile_over_the_gate(shared_dir: Path) -> None:
    from agent.preprocess import Preprocessing
    from trainer import data
    from trainer.export import MIN_INT8_COSINE, export_int8, int8_agreement, tflite_embeddings
    from trainer.model import ModelConfig, build_embedder

    size = (96, 96)
    spec = Preprocessing(input_size=size)
    paths = data.find_dataset(shared_dir / "data/magnetic_tile").train[::10][:64]
    x = data.to_model_input(data.load_prepared(paths, spec), spec)
    rep, held = x[:48], x[48:]
    weights = str(shared_dir / "weights/mobilenet_v2_1.0_224_no_top.h5")
    model, _ = build_embedder(ModelConfig(input_size=size, weights=weights))
    want = np.asarray(model.predict(held, verbose=0)[0])

    plain = int8_agreement(want, tflite_embeddings(export_int8(model, list(rep), bias_correction=False), held))
    corrected = int8_agreement(want, tflite_embeddings(export_int8(model, list(rep)), held))

    assert corrected["mean_cosine"] >= MIN_INT8_COSINE
    assert corrected["mean_cosine"] > plain["mean_cosine"] + 0.01
