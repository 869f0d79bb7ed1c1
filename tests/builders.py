"""Small models and bundles built from code, so no test depends on a binary fixture."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from agent.bundle import write_bundle
from agent.preprocess import Preprocessing, preprocess

TINY_SIZE = (64, 64)


def plain_part_images(n: int, seed: int = 0, size: int = 96) -> list[np.ndarray]:
    """Grey 'parts': a bright disc on a dark background with mild jitter (BGR uint8)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        img = np.full((size, size, 3), 40, np.uint8)
        c = (size // 2 + int(rng.integers(-3, 4)), size // 2 + int(rng.integers(-3, 4)))
        cv2.circle(img, c, size // 3, (180, 180, 180), -1)
        img = cv2.add(img, rng.integers(0, 12, img.shape, dtype=np.uint8))
        images.append(img)
    return images


def scratched(img: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = img.copy()
    h, w = out.shape[:2]
    p1 = (int(rng.integers(w // 4, w // 2)), int(rng.integers(h // 4, h // 2)))
    p2 = (int(rng.integers(w // 2, 3 * w // 4)), int(rng.integers(h // 2, 3 * h // 4)))
    cv2.line(out, p1, p2, (0, 0, 0), 3)
    return out


def tiny_embedder(input_size: tuple[int, int] = TINY_SIZE, dim: int = 16, seed: int = 0):
    """feature map -> global average pool -> dense projection -> L2 norm; two outputs."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((*input_size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inp)
    fmap = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="feature_map")(x)
    pooled = keras.layers.GlobalAveragePooling2D()(fmap)
    proj = keras.layers.Dense(dim, name="projection")(pooled)
    emb = keras.layers.UnitNormalization(name="embedding")(proj)
    return keras.Model(inp, [emb, fmap])


def build_tiny_bundle(out: Path, seed: int = 0, quantize: bool = True) -> Path:
    """A real int8 (or float) TFLite bundle whose bank holds embeddings of plain parts."""
    from trainer.export import export_float, export_int8, tflite_manifest

    pre = Preprocessing(input_size=TINY_SIZE)
    model = tiny_embedder(seed=seed)
    normals = [preprocess(img, pre) for img in plain_part_images(40, seed=seed)]
    model_bytes = export_int8(model, normals) if quantize else export_float(model)
    bank_emb, _ = model.predict(np.stack(normals[:30]), verbose=0)
    held, _ = model.predict(np.stack(normals[30:]), verbose=0)
    sims = held @ bank_emb.T
    held_scores = 1.0 - sims.max(axis=1)
    threshold = float(np.quantile(held_scores, 0.99)) + 1e-4
    proj = model.get_layer("projection")
    kernel, bias = (w for w in proj.get_weights())
    manifest = {
        "model": {"name": "tiny-test", "version": "0"},
        "preprocessing": pre.to_manifest(),
        "tflite": tflite_manifest(model_bytes),
        "embedding_dim": int(bank_emb.shape[1]),
        "gradcam": {"feature_map_output": "feature_map", "pooling": "avg", "projection": True},
        "bank": {"reduction": {"method": "none", "from": 30}},
        "threshold": {
            "value": threshold,
            "scale": float(np.std(held_scores) + 1e-3),
            "method": "quantile of held-out normal scores",
            "target_false_alarm_rate": 0.01,
        },
        "training": {"note": "built by tests/builders.py; untrained"},
    }
    return write_bundle(
        out,
        model_bytes=model_bytes,
        bank=bank_emb,
        manifest=manifest,
        head={"proj_kernel": kernel, "proj_bias": bias},
    )
