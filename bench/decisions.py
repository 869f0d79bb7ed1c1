"""Decisions at the shipped threshold: GeM alone, patch alone and fused, and the calibration settings,
on both shared data sets together (issue: one default for all data).

For each data set the zero-training int8 bundle (``yugami-train DATA --out B``, the default) is made
once; its int8 features of train/good and test/* are read once through the agent's own code
(:func:`trainer.export.tflite_features`) and cached. Every variant then re-runs the trainer's own
calibration (:func:`trainer.train.calibrate_bundle`: folds, coresets, fusion, tail threshold) on the
cached training features and scores the cached test features exactly as the agent does
(:mod:`agent.patches`, :func:`agent.scoring.cosine_scores`). Printed and written to
``bench/results/decisions.md``: image AUROC, recall and false-alarm rate at the threshold, F1-max,
recall at 1 % / 5 % false alarms, and the expected false-alarm rate the manifest would promise.

    python bench/decisions.py                       # both data sets, every variant
    python bench/decisions.py --datasets mvtec_screw --variants default
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import RESULTS, SHARED, machine

logger = logging.getLogger("bench.decisions")

WEIGHTS = SHARED / "weights/mobilenet_v2_1.0_224_no_top.h5"
# name -> TrainConfig overrides. "default" is what yugami-train does with no options.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "gem": {"scoring": "gem"},
    "patch": {"scoring": "patch"},
    "folds10": {"folds": 10},
    "folds20": {"folds": 20},
    "rows1200": {"patch_bank_rows": 1200},
    "rows4800": {"patch_bank_rows": 4800},
    "far0.02": {"far": 0.02},
    "far0.05": {"far": 0.05},
}


def bundle_for(dataset: str, work: Path) -> Path:
    from trainer.train import TrainConfig, train

    out = work / dataset / "bundle"
    if not (out / "manifest.json").is_file():
        train(TrainConfig(data_dir=SHARED / "data" / dataset, out=out, progress=False, model=_model_cfg()))
    return out


def _model_cfg():
    from trainer.model import ModelConfig

    return ModelConfig(weights=str(WEIGHTS))


def features(dataset: str, work: Path) -> dict[str, np.ndarray]:
    """int8 features of train/good and test/*, cached in WORK/DATASET/features.npz."""
    from agent.bundle import load_bundle
    from trainer import data
    from trainer.export import tflite_features

    cache = work / dataset / "features.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    bundle = load_bundle(bundle_for(dataset, work))
    model_bytes = (bundle.path / "embedder.tflite").read_bytes()
    ds = data.find_dataset(SHARED / "data" / dataset)
    spec = bundle.preprocessing

    def read(paths: list[Path]) -> tuple[np.ndarray, np.ndarray | None]:
        x = data.to_model_input(data.load_prepared(paths, spec), spec)
        return tflite_features(model_bytes, x, spec=bundle.embedding, progress=True)

    train_emb, train_patch = read(ds.train)
    test_paths = [(t, p) for t in sorted(ds.test) for p in ds.test[t]]
    test_emb, test_patch = read([p for _, p in test_paths])
    out = {
        "train_emb": train_emb,
        "train_patch": train_patch,
        "test_emb": test_emb,
        "test_patch": test_patch,
        "test_types": np.array([t for t, _ in test_paths]),
        "test_names": np.array([f"{t}/{p.name}" for t, p in test_paths]),
    }
    np.savez(cache, **out)
    return out


def test_scores(cal: Any, feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GeM, patch and fused scores of the test pictures against the variant's banks, as the agent scores."""
    from agent.patches import Fusion, PatchBank, nearest_distances
    from agent.scoring import cosine_scores

    bank = cal.bank.astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    gem = cosine_scores(feats["test_emb"], bank)[0]
    pbank = PatchBank.of(cal.patch_bank.astype(np.float32))
    patch = np.array([nearest_distances(f.astype(np.float32), pbank).max() for f in feats["test_patch"]])
    fusion = cal.manifest["scoring"].get("fusion")
    fused = Fusion.from_manifest(fusion).fuse(gem, patch) if fusion else None
    return {"gem": gem, "patch": patch, "fused": fused}


def row(dataset: str, variant: str, cal: Any, scores: np.ndarray, types: np.ndarray) -> dict[str, Any]:
    from trainer.evaluate import metrics

    m = metrics(list(types), scores, cal.threshold["value"])
    expected = cal.threshold["expected_false_alarm_rate"]
    return {
        "dataset": dataset,
        "variant": variant,
        "auroc": m["image_auroc"],
        "recall_at_threshold": m["recall_at_threshold"],
        "far_at_threshold": m["far_at_threshold"],
        "f1_max": m["f1_max"],
        "recall_at_far_0.01": m["recall_at_far"]["0.01"],
        "recall_at_far_0.05": m["recall_at_far"]["0.05"],
        "expected_far": expected["estimate"],
        "expected_far_90": expected["interval_90"],
        "normals_far": cal.threshold["normals"]["false_alarm_rate"],
    }


def run_variant(dataset: str, variant: str, feats: dict[str, np.ndarray]) -> dict[str, Any]:
    from trainer.train import TrainConfig, calibrate_bundle

    cfg = dataclasses.replace(
        TrainConfig(data_dir=SHARED / "data" / dataset, out=Path("unused"), progress=False), **VARIANTS[variant]
    )
    t0 = time.perf_counter()
    # calibrate_bundle standardises and thresholds the chosen scoring; patch features are always
    # given so that GeM-only variants still report the patch and fused columns' inputs
    cal = calibrate_bundle(cfg, feats["train_emb"], feats["train_patch"])
    scores = test_scores(cal, feats)
    r = row(dataset, variant, cal, scores[cfg.scoring], feats["test_types"])
    r["calibration_s"] = round(time.perf_counter() - t0, 1)
    return r


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list):
        return "-".join(f"{x:.3f}" for x in v)
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["mvtec_screw", "magnetic_tile"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--work", type=Path, default=Path("runs/decisions"))
    p.add_argument("--results", default="decisions", help="name of the bench/results/NAME.{md,json} files")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rows = []
    for dataset in args.datasets:
        (args.work / dataset).mkdir(parents=True, exist_ok=True)
        feats = features(dataset, args.work)
        for variant in args.variants:
            rows.append(run_variant(dataset, variant, feats))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = (
        f"# Decisions at the shipped threshold\n\n{json.dumps(machine())}\n\n"
        f"`python bench/decisions.py --datasets {' '.join(args.datasets)} --variants {' '.join(args.variants)}`\n\n"
        + table(rows)
        + "\n"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.results}.md").write_text(text)
    (RESULTS / f"{args.results}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
