"""A zero-training bundle for benchmarks: ImageNet MobileNetV2, GAP, L2 norm, bank of train/good.

    python bench/baseline_bundle.py DATA_DIR OUT [--weights PATH] [--input-size 224] [--float]

The same recipe as ``yugami-train DATA_DIR --epochs 0`` without the trainer's object localisation and
without its int8 agreement gate (it refuses MobileNetV2-ImageNet on magnetic tile: mean cosine 0.89
between the int8 and float embeddings), which is what the Grad-CAM benchmarks need: a real
MobileNetV2 bundle with the contract's two outputs. The agreement is printed and kept in the manifest.
``--float`` writes a float32 TFLite model instead (for int8-vs-float heat-map comparisons).
Bank: embeddings (through the exported TFLite model, as on the device) of train/good minus a held-out
20 %; threshold: the 99th percentile of the held-out scores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bundle import write_bundle
from agent.preprocess import Preprocessing, list_images, load_image, preprocess
from bench._common import SHARED

WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="MVTec-layout folder (train/good)")
    p.add_argument("out", type=Path, help="bundle folder to write")
    p.add_argument("--weights", default=str(WEIGHTS), help="MobileNetV2 no-top .h5")
    p.add_argument("--input-size", type=int, default=224, help="square model input in pixels")
    p.add_argument("--float", dest="as_float", action="store_true", help="float32 TFLite instead of int8")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from trainer.export import export_float, export_int8, int8_agreement, tflite_embeddings, tflite_manifest
    from trainer.model import ModelConfig, build_embedder

    pre = Preprocessing(input_size=(args.input_size, args.input_size))
    paths = list_images(args.data / "train" / "good")
    order = np.random.default_rng(args.seed).permutation(len(paths))
    x = np.stack([preprocess(load_image(paths[i]), pre) for i in order])
    n_hold = len(x) // 5
    held, rest = x[:n_hold], x[n_hold:]
    model, _ = build_embedder(ModelConfig(input_size=pre.input_size, weights=args.weights))
    model_bytes = export_float(model) if args.as_float else export_int8(model, list(rest[:300]))
    held_emb = tflite_embeddings(model_bytes, held)
    float_emb, _ = model.predict(held, verbose=0, batch_size=16)
    agreement = int8_agreement(float_emb, held_emb)
    bank = tflite_embeddings(model_bytes, rest)
    held_scores = 1.0 - (held_emb @ bank.T).max(axis=1)
    threshold = float(np.quantile(held_scores, 0.99))
    manifest = {
        "model": {"name": f"{args.data.name}-imagenet-baseline{'-float' if args.as_float else ''}", "version": "0"},
        "preprocessing": pre.to_manifest(),
        "tflite": tflite_manifest(model_bytes),
        "embedding_dim": int(bank.shape[1]),
        "gradcam": {"feature_map_output": "feature_map", "pooling": "avg", "projection": False},
        "bank": {"reduction": {"method": "none", "from": len(rest)}},
        "threshold": {
            "value": threshold,
            "scale": float(held_scores.std() + 1e-4),
            "method": "0.99 quantile of held-out normal scores",
            "target_false_alarm_rate": 0.01,
        },
        "training": {"note": "zero-training ImageNet baseline (bench/baseline_bundle.py)", "agreement": agreement},
    }
    write_bundle(args.out, model_bytes=model_bytes, bank=bank, manifest=manifest)
    print(f"wrote {args.out}: threshold {threshold:.4f}, bank {bank.shape}, TFLite vs Keras embeddings {agreement}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
