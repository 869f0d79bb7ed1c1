"""Where does full-integer int8 post-training quantisation of the MobileNetV2 embedder lose
agreement with the float model, and what fixes it.  Small CPU experiments (150 representative,
50 held-out normals, 224 px), see docs/INT8.md.

    .venv/bin/python bench/int8_study.py cache                     # prepared pictures -> /tmp/int8_study
    .venv/bin/python bench/int8_study.py depth tile                # per-depth float vs int8 cosine
    .venv/bin/python bench/int8_study.py variant tile baseline     # one export variant, cosine + speed
    .venv/bin/python bench/int8_study.py deny tile                 # int8 with single ops left float
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import SHARED, load_npz

CACHE = Path(os.environ.get("INT8_STUDY_CACHE", "/tmp/int8_study"))
WEIGHTS = SHARED / "weights/mobilenet_v2_1.0_224_no_top.h5"
DATA = {"tile": SHARED / "data/magnetic_tile", "screw": SHARED / "data/mvtec_screw"}
N_REP, N_HELD, SIZE = 150, 50, 224
DEPTHS = [
    "block_2_add",
    "block_5_add",
    "block_9_add",
    "block_12_add",
    "block_15_add",
    "block_16_project_BN",
    "out_relu",
]


def cache(name: str) -> dict[str, np.ndarray]:
    """uint8 pictures: 'rep' (plain normals of the fit share), 'rep_line' (same, every 4th with a
    synthetic line, as the trainer does), 'held' (held-out normals)."""
    path = CACHE / f"{name}.npz"
    if (cached := load_npz(path)) is not None:
        return cached
    from agent.preprocess import Preprocessing
    from trainer import anomalies, data, localize

    spec = Preprocessing(input_size=(SIZE, SIZE))
    ds = data.find_dataset(DATA[name])
    fit_idx, held_idx = data.split_holdout(len(ds.train), 0.2, 0)
    rng = np.random.default_rng(0)
    fit_pick = sorted(rng.choice(fit_idx, N_REP, replace=False))
    held_pick = sorted(rng.choice(held_idx, N_HELD, replace=False))
    rep = data.load_prepared([ds.train[i] for i in fit_pick], spec)
    held = data.load_prepared([ds.train[i] for i in held_pick], spec)
    _, masks = localize.object_masks(rep)
    line_cfg = anomalies.AnomalyConfig().line
    rep_line = rep.copy()
    for k in range(3, N_REP, 4):
        rep_line[k] = anomalies.add_line(rep[k], masks[k], rng, line_cfg)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, rep=rep, rep_line=rep_line, held=held)
    return {"rep": rep, "rep_line": rep_line, "held": held}


def to_float(rgb: np.ndarray) -> np.ndarray:
    from agent.preprocess import Preprocessing
    from trainer import data

    return data.to_model_input(rgb, Preprocessing(input_size=(SIZE, SIZE)))


def cosines(a: np.ndarray, b: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    if centre is not None:
        a, b = a - centre, b - centre
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


def backbone() -> Any:
    import keras

    return keras.applications.MobileNetV2(
        input_shape=(SIZE, SIZE, 3), alpha=1.0, include_top=False, weights=str(WEIGHTS)
    )


def gap_model(base: Any, layers: list[str]) -> Any:
    import keras

    outs = [keras.layers.GlobalAveragePooling2D(name=f"gap_{n}")(base.get_layer(n).output) for n in layers]
    return keras.Model(base.input, outs)


def tflite_outputs(model_bytes: bytes, xs: np.ndarray, threads: int = 1) -> tuple[list[np.ndarray], float]:
    """Every output of every input (list per output, each (N, D)), and the median invoke ms."""
    from agent.runtime import TFLiteModel

    tfl = TFLiteModel(model_bytes, num_threads=threads)
    outs: list[list[np.ndarray]] = [[] for _ in tfl.outputs]
    ms = []
    for x in xs:
        tfl.set_input(x)
        t = time.perf_counter()
        tfl.invoke()
        ms.append((time.perf_counter() - t) * 1000)
        for j, info in enumerate(tfl.outputs):
            outs[j].append(tfl.get_output(info).reshape(-1))
    return [np.stack(o) for o in outs], float(np.median(ms))


def by_dim(outs: list[np.ndarray]) -> dict[int, np.ndarray]:
    return {o.shape[1]: o for o in outs}


def cmd_depth(name: str, rep_kind: str, bias_correction: bool) -> dict[str, Any]:
    from trainer.export import export_int8

    d = cache(name)
    base = backbone()
    model = gap_model(base, DEPTHS)
    held = to_float(d["held"])
    float_outs = [np.asarray(o) for o in model.predict(held, batch_size=25, verbose=0)]
    t = time.perf_counter()
    q = export_int8(model, list(to_float(d[rep_kind])), bias_correction=bias_correction)
    t_conv = time.perf_counter() - t
    q_outs, _ = tflite_outputs(q, held)
    q_dim = by_dim(q_outs)
    rows = {}
    for layer, f in zip(DEPTHS, float_outs, strict=True):
        i = q_dim[f.shape[1]]
        centre = f.mean(axis=0)
        rows[layer] = {
            "cos": float(cosines(f, i).mean()),
            "centred_cos": float(cosines(f, i, centre).mean()),
            "rel_err": float(np.linalg.norm(f - i) / np.linalg.norm(f)),
        }
        print(
            f"{layer:22s} cos {rows[layer]['cos']:.4f} centred {rows[layer]['centred_cos']:.4f} "
            f"rel_err {rows[layer]['rel_err']:.4f}",
            flush=True,
        )
    print(f"conversion {t_conv:.0f} s")
    return rows


def embedder() -> Any:
    from trainer.model import ModelConfig, build_embedder

    model, _ = build_embedder(ModelConfig(input_size=(SIZE, SIZE), weights=str(WEIGHTS)))
    return model


VARIANTS = {
    # name: (export_int8 keyword arguments, representative set)
    "baseline": ({"bias_correction": False}, "rep"),
    "baseline_lines": ({"bias_correction": False}, "rep_line"),
    "biascorr": ({"bias_correction": True}, "rep"),
    "biascorr_lines": ({"bias_correction": True}, "rep_line"),
}


def cmd_variant(name: str, variant: str) -> dict[str, Any]:
    """Export the real embedder (outputs [embedding, feature_map]) one way; cosine on held-out
    normals and the median single-thread invoke time."""
    from trainer.export import export_int8

    kwargs, rep_kind = VARIANTS[variant]
    d = cache(name)
    model = embedder()
    held = to_float(d["held"])
    f_emb = np.asarray(model.predict(held, batch_size=25, verbose=0)[0])
    t = time.perf_counter()
    q = export_int8(model, list(to_float(d[rep_kind])), **kwargs)
    t_export = time.perf_counter() - t
    outs, ms = tflite_outputs(q, held)
    q_emb = by_dim([o for o in outs if o.shape[1] == f_emb.shape[1]])[f_emb.shape[1]]
    cos = cosines(f_emb, q_emb)
    row = {
        "data": name,
        "variant": variant,
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "centred_cosine": float(cosines(f_emb, q_emb, f_emb.mean(axis=0)).mean()),
        "invoke_ms_1thread": ms,
        "export_s": t_export,
        "model_kb": len(q) // 1024,
    }
    print(json.dumps(row), flush=True)
    with (CACHE / "variants.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


DENY_GROUPS = [
    [],
    ["expanded_conv_depthwise_relu"],
    ["Conv1_relu"],
    ["expanded_conv_project", "block_1_", "block_2_"],
    ["block_1", "block_3", "block_4", "block_5", "block_6", "block_7", "block_8", "block_9"],
    ["block_16", "StatefulPartitionedCall"],
]


def cmd_deny(name: str) -> None:
    """Backbone int8 with some ops left in float (QuantizationDebugger denylist; diagnosis only,
    such a model is not full-integer): which op's quantisation costs the agreement."""
    import tensorflow as tf

    d = cache(name)
    base = backbone()
    rep = list(to_float(d["rep"]))
    held = to_float(d["held"])
    want = base.predict(held, batch_size=25, verbose=0).mean(axis=(1, 2))

    def dataset():
        for x in rep:
            yield [x[None]]

    names: list[str] = []
    for keys in DENY_GROUPS:
        conv = tf.lite.TFLiteConverter.from_keras_model(base)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = dataset
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        deny = [n for n in names if any(k in n.split(";")[0] for k in keys)]
        opts = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=deny) if deny else None
        dbg = tf.lite.experimental.QuantizationDebugger(
            converter=conv, debug_dataset=lambda: iter([[held[:1]]]), debug_options=opts
        )
        if not names:  # every quantised tensor's name, read from the first (plain) run's dump
            dbg.run()
            buf = io.StringIO()
            dbg.layer_statistics_dump(buf)
            names = [row["tensor_name"] for row in csv.DictReader(io.StringIO(buf.getvalue()))]
        outs, _ = tflite_outputs(dbg.get_nondebug_quantized_model(), held)
        got = outs[0].reshape(len(held), -1, want.shape[1]).mean(axis=1)
        print(
            f"float ops {keys or 'none'} ({len(deny)} tensors): cos {cosines(want, got).mean():.4f} "
            f"centred {cosines(want, got, want.mean(axis=0)).mean():.4f}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["cache", "depth", "variant", "deny"])
    ap.add_argument("data", nargs="?", default="tile", choices=sorted(DATA))
    ap.add_argument("variant", nargs="?", default="baseline", choices=sorted(VARIANTS))
    ap.add_argument("--rep", default="rep", choices=["rep", "rep_line"])
    ap.add_argument("--bias-correction", action="store_true", help="depth: export with bias correction")
    args = ap.parse_args()
    if args.cmd == "cache":
        for n in DATA:
            d = cache(n)
            print(n, {k: v.shape for k, v in d.items()})
        return
    if args.cmd == "deny":
        cmd_deny(args.data)
        return
    if args.cmd == "variant":
        cmd_variant(args.data, args.variant)
        return
    rows = cmd_depth(args.data, args.rep, args.bias_correction)
    out = CACHE / f"depth_{args.data}_{args.rep}{'_bc' if args.bias_correction else ''}.json"
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
