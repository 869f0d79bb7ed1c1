"""--head-init imprint: the head's class centres start at each class's mean embedding."""

from __future__ import annotations

import numpy as np
import pytest

from tests.builders import TINY_SIZE, plain_part_images, tiny_embedder

pytest.importorskip("keras")


def test_imprinted_centres_are_the_normalised_class_means(tmp_path):
    from agent.preprocess import Preprocessing, prepare_rgb
    from trainer.anomalies import AnomalyGenerator
    from trainer.heads import make_head
    from trainer.localize import object_masks
    from trainer.model import build_training_model
    from trainer.train import IMPRINT_PICTURES, TrainConfig, imprint_head, make_batch

    spec = Preprocessing(input_size=TINY_SIZE)
    pictures = np.stack([prepare_rgb(img, spec) for img in plain_part_images(12, seed=1)])
    _, masks = object_masks(pictures)
    embedder = tiny_embedder(seed=0)
    head = make_head("arcface", 2)
    build_training_model(embedder, head)  # builds the head's kernel
    cfg = TrainConfig(data_dir=tmp_path, out=tmp_path / "b", head_init="imprint", seed=5)
    gen = AnomalyGenerator(cfg.anomaly)
    imprint_head(embedder, head, pictures, masks, gen, cfg, spec)

    kernel = np.asarray(head.kernel)
    np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), 1.0, atol=1e-5)
    # Recompute the normal class's mean the way imprint_head draws it (same rng stream).
    rng = np.random.default_rng([cfg.seed, 23])
    pick = rng.permutation(len(pictures))[:IMPRINT_PICTURES]
    idx, labels = np.repeat(pick, 2), np.tile(np.arange(2), pick.size)
    emb, _ = embedder.predict(make_batch(pictures, masks, idx, labels, gen, rng, spec), verbose=0)
    normal = emb[labels == 0].mean(axis=0)
    assert float(kernel[:, 0] @ (normal / np.linalg.norm(normal))) == pytest.approx(1.0, abs=1e-4)
    assert not np.allclose(kernel[:, 0], kernel[:, 1])  # the line class has its own centre
