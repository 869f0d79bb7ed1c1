"""What int8 costs the anomaly score with GeM at 448 px, and where in the network it is lost.

The int8 gate (cosine int8 vs float on held-out normals) passes at 0.996 on MVTec screw, yet the
zero-training bundle scores image AUROC 0.914 where its float twin scores 0.939. This study works
on AUROC itself: the zero-training GeM embedder (ImageNet MobileNetV2, ``out_relu`` feature map,
GeM p = 3 pooled in float as the agent does), bank = every train/good embedding, score = 1 - max
cosine, on the full test set; every variant is exported from the same float model.

    .venv/bin/python bench/int8_gem.py screw plain biascorr            # export variants
    .venv/bin/python bench/int8_gem.py screw deny:head deny:stem        # ops left in float (diagnosis)

Variants: ``plain`` (converter alone), ``biascorr`` (the trainer's export), ``nolines`` (bias
correction, calibration without synthetic lines), ``deny:GROUP`` (bias correction, the ops of a
group kept float: not full-integer, diagnosis only; groups in DENY_GROUPS). Pictures and float
embeddings are cached in /tmp/int8_gem; results are appended to bench/results/int8_gem.jsonl.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("YUGAMI_SHARED", ROOT.parent / "shared"))
CACHE = Path(os.environ.get("INT8_GEM_CACHE", "/tmp/int8_gem"))
WEIGHTS = SHARED / "weights/mobilenet_v2_1.0_224_no_top.h5"
DATA = {"tile": SHARED / "data/magnetic_tile", "screw": SHARED / "data/mvtec_screw"}
OUT = ROOT / "bench" / "results" / "int8_gem.jsonl"
SIZE, P, N_REP, SEED = 448, 3.0, 300, 0

# Name fragments of the ops kept in float by deny:GROUP (MobileNetV2 layer names).
DENY_GROUPS = {
    "stem": ["Conv1", "expanded_conv_"],
    "early": ["block_1_", "block_2_", "block_3_", "block_4_", "block_5_"],
    "middle": ["block_6_", "block_7_", "block_8_", "block_9_", "block_10_", "block_11_", "block_12_"],
    "late": ["block_13_", "block_14_", "block_15_"],
    "head": ["block_16_", "Conv_1", "out_relu"],
}


def pictures(name: str) -> dict[str, np.ndarray]:
    """uint8 pictures as the trainer prepares them: 'train' (all train/good), 'test', 'labels'
    (1 = defect), 'rep' (the trainer's int8 calibration set: fit share, every 4th with a line),
    'rep_plain' (the same pictures without lines)."""
    path = CACHE / f"{name}_{SIZE}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
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
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    out = {}
    for part in ("train", "test"):
        fm = [model.predict(to_float(d[part][i : i + 16]), verbose=0) for i in range(0, len(d[part]), 16)]
        out[part] = gem(np.concatenate(fm))
    np.savez(path, **out)
    return out


def int8_embeddings(model_bytes: bytes, rgb: np.ndarray) -> np.ndarray:
    from agent.runtime import TFLiteModel

    tfl = TFLiteModel(model_bytes, num_threads=2)
    info = tfl.outputs[0]
    fmaps = []
    for x in to_float(rgb):
        tfl.set_input(x)
        tfl.invoke()
        fmaps.append(tfl.get_output(info)[0])
    return gem(np.stack(fmaps))


def auroc(train: np.ndarray, test: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    scores = 1.0 - (test @ train.T).max(axis=1)
    return float(roc_auc_score(labels, scores))


def export_denied(model: Any, rep: list[np.ndarray], fragments: list[str], held: np.ndarray) -> bytes:
    """Bias-corrected int8 with the ops whose tensor names hold a fragment kept in float."""
    import csv
    import io

    import tensorflow as tf

    from trainer.export import BIAS_CORRECTION_IMAGES, bias_corrected

    corrected = bias_corrected(model, np.stack(rep[:BIAS_CORRECTION_IMAGES]))

    def dataset():
        for x in rep:
            yield [x[None]]

    def converter():
        conv = tf.lite.TFLiteConverter.from_keras_model(corrected)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = dataset
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        return conv

    probe = tf.lite.experimental.QuantizationDebugger(converter=converter(), debug_dataset=lambda: iter([[held[:1]]]))
    probe.run()
    buf = io.StringIO()
    probe.layer_statistics_dump(buf)
    names = [row["tensor_name"] for row in csv.DictReader(io.StringIO(buf.getvalue()))]
    deny = [n for n in names if any(f in n.split(";")[0] for f in fragments)]
    opts = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=deny)
    dbg = tf.lite.experimental.QuantizationDebugger(
        converter=converter(), debug_dataset=lambda: iter([[held[:1]]]), debug_options=opts
    )
    print(f"    {len(deny)} of {len(names)} tensors kept float", flush=True)
    return dbg.get_nondebug_quantized_model()


def run_variant(name: str, variant: str, model: Any, d: dict[str, np.ndarray], f: dict[str, np.ndarray]) -> dict:
    from trainer.export import export_int8

    t = time.perf_counter()
    rep = list(to_float(d["rep_plain" if variant == "nolines" else "rep"]))
    if variant.startswith("deny:"):
        q = export_denied(model, rep, DENY_GROUPS[variant[5:]], to_float(d["train"][:1]))
    else:
        q = export_int8(model, rep, bias_correction=variant != "plain")
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", choices=sorted(DATA))
    ap.add_argument("variants", nargs="+", help="plain, biascorr, nolines, deny:" + "|".join(DENY_GROUPS))
    args = ap.parse_args()
    for v in args.variants:
        if v not in ("plain", "biascorr", "nolines") and v[5:] not in DENY_GROUPS:
            ap.error(f"unknown variant {v!r}")
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
