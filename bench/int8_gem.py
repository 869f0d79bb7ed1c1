"""What int8 costs the anomaly score with GeM at 448 px, and what the calibration set does to it.

The int8 gate (cosine int8 vs float on held-out normals) passes at 0.996 on MVTec screw, yet the
zero-training bundle scored image AUROC 0.914 where its float twin scored 0.939. This study works
on AUROC itself: the zero-training GeM embedder (ImageNet MobileNetV2, ``out_relu`` feature map,
GeM p = 3 pooled in float as the agent does), bank = every train/good embedding, score = 1 - max
cosine, on the full test set; every variant is exported from the same float model with the
trainer's 300 representative pictures (seed 0).

    .venv/bin/python bench/int8_gem.py screw plain lines nolines
    .venv/bin/python bench/int8_gem.py tile lines nolines
    .venv/bin/python bench/int8_gem.py --ranges A.tflite B.tflite      # activation scales, A vs B

Variants: ``plain`` (converter alone, calibration with lines), ``lines`` (bias correction, every
4th calibration picture with a synthetic line: the trainer's export until 2026-11-27),
``nolines`` (bias correction, normal pictures only: the trainer's export now). Pictures and float
embeddings are cached in /tmp/int8_gem; rows are appended to bench/results/int8_gem.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import RESULTS, SHARED, load_npz

CACHE = Path(os.environ.get("INT8_GEM_CACHE", "/tmp/int8_gem"))
WEIGHTS = SHARED / "weights/mobilenet_v2_1.0_224_no_top.h5"
DATA = {"tile": SHARED / "data/magnetic_tile", "screw": SHARED / "data/mvtec_screw"}
OUT = RESULTS / "int8_gem.jsonl"
SIZE, P, N_REP, SEED = 448, 3.0, 300, 0
# variant: (bias correction, calibration set)
VARIANTS = {"plain": (False, "rep"), "lines": (True, "rep"), "nolines": (True, "rep_plain")}


def pictures(name: str) -> dict[str, np.ndarray]:
    """uint8 pictures as the trainer prepares them: 'train' (all train/good), 'test', 'labels'
    (1 = defect), 'rep' (the trainer's int8 calibration set: fit share, every 4th with a line),
    'rep_plain' (the same pictures without lines)."""
    path = CACHE / f"{name}_{SIZE}.npz"
    if (cached := load_npz(path)) is not None:
        return cached
    from agent.preprocess import Preprocessing
    from trainer import anomalies, data, localize

    spec = Preprocessing(input_size=(SIZE, SIZE))
    ds = data.find_dataset(DATA[name])
    train = data.load_prepared(ds.train, spec)
    test_paths = [p for kind in sorted(ds.test) for p in ds.test[kind]]
    labels = np.array([int(kind != "good") for kind in sorted(ds.test) for _ in ds.test[kind]], np.uint8)
    test = data.load_prepared(test_paths, spec)
    fit_idx, _ = data.split_holdout(len(train), 0.2, SEED)
    fit = train[fit_idx]
    _, masks = localize.object_masks(fit)
    rng = np.random.default_rng([SEED, 11])  # as trainer.train._representative
    pick = sorted(rng.permutation(len(fit))[:N_REP])
    line_cfg = anomalies.AnomalyConfig().line
    rep_plain = fit[pick]
    rep = np.stack(
        [fit[i] if k % 4 != 3 else anomalies.add_line(fit[i], masks[i], rng, line_cfg) for k, i in enumerate(pick)]
    )
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, train=train, test=test, labels=labels, rep=rep, rep_plain=rep_plain)
    return {"train": train, "test": test, "labels": labels, "rep": rep, "rep_plain": rep_plain}


def to_float(rgb: np.ndarray) -> np.ndarray:
    from agent.preprocess import Preprocessing
    from trainer import data

    return data.to_model_input(rgb, Preprocessing(input_size=(SIZE, SIZE)))


def feature_model() -> Any:
    """The exported graph of a zero-training GeM bundle: image -> out_relu feature map."""
    from trainer.model import ModelConfig, build_embedder, export_model

    cfg = ModelConfig(input_size=(SIZE, SIZE), weights=str(WEIGHTS), pooling="gem", gem_p=P)
    embedder, _ = build_embedder(cfg)
    return export_model(embedder, cfg)


def gem(fmaps: np.ndarray) -> np.ndarray:
    from agent.scoring import gem_pool, l2_normalize

    return l2_normalize(np.stack([gem_pool(f, P) for f in fmaps]))


def float_embeddings(name: str, model: Any, d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    path = CACHE / f"{name}_{SIZE}_float.npz"
    if (cached := load_npz(path)) is not None:
        return cached
    out = {}
    for part in ("train", "test"):
        fm = [model.predict(to_float(d[part][i : i + 16]), verbose=0) for i in range(0, len(d[part]), 16)]
        out[part] = gem(np.concatenate(fm))
    np.savez(path, **out)
    return out


def int8_embeddings(model_bytes: bytes, rgb: np.ndarray) -> np.ndarray:
    """Read as the agent reads a GeM bundle (the trainer's export check does the same)."""
    from agent.bundle import EmbeddingSpec
    from trainer.export import tflite_embeddings

    return tflite_embeddings(model_bytes, to_float(rgb), num_threads=2, spec=EmbeddingSpec("gem", P))


def auroc(train: np.ndarray, test: np.ndarray, labels: np.ndarray) -> float:
    """Image AUROC of 1 - max cosine to a bank of every train embedding, the agent's score."""
    from agent.scoring import cosine_scores
    from trainer.evaluate import auroc as image_auroc

    return image_auroc(labels, cosine_scores(test, train)[0])


def run_variant(name: str, variant: str, model: Any, d: dict[str, np.ndarray], f: dict[str, np.ndarray]) -> dict:
    from trainer.export import export_int8

    t = time.perf_counter()
    bias_correction, rep_kind = VARIANTS[variant]
    q = export_int8(model, list(to_float(d[rep_kind])), bias_correction=bias_correction)
    export_s = time.perf_counter() - t
    qe = {part: int8_embeddings(q, d[part]) for part in ("train", "test")}
    cos = np.sum(qe["test"] * f["test"], axis=1)
    centre = f["test"].mean(axis=0)
    a, b = qe["test"] - centre, f["test"] - centre
    centred = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    row = {
        "data": name,
        "size": SIZE,
        "variant": variant,
        "auroc_int8": round(auroc(qe["train"], qe["test"], d["labels"]), 4),
        "auroc_float": round(auroc(f["train"], f["test"], d["labels"]), 4),
        "test_cosine_mean": round(float(cos.mean()), 4),
        "test_cosine_centred": round(float(centred.mean()), 4),
        "export_s": round(export_s, 1),
    }
    print(json.dumps(row), flush=True)
    with OUT.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


def activation_scales(path: Path) -> dict[str, float]:
    """Per-tensor int8 scale of every activation (batch-1 4-D tensors) of a TFLite model."""
    from agent.runtime import load_interpreter_class

    interpreter_class, _ = load_interpreter_class()
    scales = {}
    for d in interpreter_class(model_path=str(path)).get_tensor_details():
        q = d["quantization_parameters"]
        if d["dtype"] == np.int8 and len(q["scales"]) == 1 and len(d["shape"]) == 4 and d["shape"][0] == 1:
            scales[d["name"]] = float(q["scales"][0])
    return scales


def compare_ranges(a_path: Path, b_path: Path, top: int = 12) -> None:
    """How much wider A's activation ranges are than B's (two int8 exports of one float model)."""
    a, b = activation_scales(a_path), activation_scales(b_path)
    common = [n for n in a if n in b]
    ratio = {n: a[n] / b[n] for n in common}
    r = np.array(list(ratio.values()))
    print(
        f"{len(common)} activation tensors; scale A / B: median {np.median(r):.3f}, min {r.min():.3f}, "
        f"max {r.max():.3f}; wider by > 5 %: {(r > 1.05).sum()}, narrower by > 5 %: {(r < 0.95).sum()}"
    )
    for n in sorted(common, key=lambda n: -ratio[n])[:top]:
        print(f"  {ratio[n]:.2f}  {n.split(';')[0]}")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--ranges":  # bench/int8_gem.py --ranges A.tflite B.tflite
        compare_ranges(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", choices=sorted(DATA))
    ap.add_argument("variants", nargs="+", choices=VARIANTS, metavar="VARIANT", help=", ".join(VARIANTS))
    args = ap.parse_args()
    d = pictures(args.data)
    model = feature_model()
    f = float_embeddings(args.data, model, d)
    print(
        f"{args.data}: {len(d['train'])} train, {len(d['test'])} test; float AUROC "
        f"{auroc(f['train'], f['test'], d['labels']):.4f}",
        flush=True,
    )
    for v in args.variants:
        run_variant(args.data, v, model, d, f)


if __name__ == "__main__":
    main()
