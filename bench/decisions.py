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
    python bench/decisions.py --seeds 0 1 2 --variants default --evaluate   # the README's figures

``--evaluate`` also runs ``yugami-eval``'s own :func:`trainer.evaluate.evaluate` on each seed's bundle
(the int8 model through the agent's Scorer, pixel AUROC / AUPRO of the anomaly map and Grad-CAM where
the data set has masks) and reports the median over seeds.
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
    "top3": {"patch_top_k": 3},
    "top10": {"patch_top_k": 10},
    "top30": {"patch_top_k": 30},
}


def bundle_for(dataset: str, work: Path, seed: int = 0) -> Path:
    from trainer.train import TrainConfig, train

    out = work / dataset / ("bundle" if seed == 0 else f"bundle_s{seed}")
    if not (out / "manifest.json").is_file():
        t0 = time.perf_counter()
        train(TrainConfig(data_dir=SHARED / "data" / dataset, out=out, progress=False, seed=seed, model=_model_cfg()))
        (out.parent / f"{out.name}.train_s").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return out


def _model_cfg():
    from trainer.model import ModelConfig

    return ModelConfig(weights=str(WEIGHTS))


def features(dataset: str, work: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """int8 features of train/good and test/*, cached in WORK/DATASET/features[_sSEED].npz."""
    from agent.bundle import load_bundle
    from trainer import data
    from trainer.export import tflite_features

    cache = work / dataset / ("features.npz" if seed == 0 else f"features_s{seed}.npz")
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    bundle = load_bundle(bundle_for(dataset, work, seed))
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


def test_scores(cal: Any, feats: dict[str, np.ndarray], scoring: str) -> np.ndarray:
    """The test pictures' scores against the variant's banks, as the agent scores (the trainer's
    :meth:`trainer.train.Calibrated.score`, which the manifest's scoring drives)."""
    import dataclasses as dc

    manifest = {**cal.manifest, "scoring": {**cal.manifest["scoring"], "method": scoring}}
    return dc.replace(cal, manifest=manifest).score(feats["test_emb"], feats["test_patch"])


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


def run_variant(dataset: str, variant: str, feats: dict[str, np.ndarray], seed: int = 0) -> dict[str, Any]:
    from trainer.train import TrainConfig, calibrate_bundle

    base = TrainConfig(data_dir=SHARED / "data" / dataset, out=Path("unused"), progress=False, seed=seed)
    cfg = dataclasses.replace(base, **VARIANTS[variant])
    t0 = time.perf_counter()
    # calibrate_bundle standardises and thresholds the chosen scoring; patch features are always
    # given so that GeM-only variants still report the patch and fused columns' inputs
    cal = calibrate_bundle(cfg, feats["train_emb"], feats["train_patch"])
    r = row(dataset, variant, cal, test_scores(cal, feats, cfg.scoring), feats["test_types"])
    r["seed"] = seed
    r["calibration_s"] = round(time.perf_counter() - t0, 1)
    return r


EVAL_KEYS = (
    "image_auroc", "recall_at_threshold", "far_at_threshold", "f1_max", "pixel_auroc_anomaly_map",
    "aupro_anomaly_map", "pixel_auroc_gradcam", "aupro_gradcam",
)


def evaluate_bundle(dataset: str, work: Path, seed: int) -> dict[str, Any]:
    """yugami-eval's figures of one seed's default bundle (the agent's int8 path, end to end)."""
    import json as _json

    from trainer.evaluate import evaluate

    bundle = bundle_for(dataset, work, seed)
    result = evaluate(bundle, SHARED / "data" / dataset)
    manifest = _json.loads((bundle / "manifest.json").read_text())
    train_s = bundle.parent / f"{bundle.name}.train_s"
    return {
        "dataset": dataset,
        "seed": seed,
        **{k: result.get(k) for k in EVAL_KEYS},
        "threshold": result["threshold"],
        "expected_far": manifest["threshold"]["expected_false_alarm_rate"]["estimate"],
        "bundle_MiB": sum(f.stat().st_size for f in bundle.iterdir()) / 2**20,
        "train_s": float(train_s.read_text()) if train_s.is_file() else None,
    }


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset]
        med: dict[str, Any] = {"dataset": dataset, "seed": f"median of {len(mine)}"}
        for k in mine[0]:
            values = [r[k] for r in mine if isinstance(r[k], (int, float)) and r[k] is not None]
            if k not in med and values and len(values) == len(mine):
                med[k] = float(np.median(values))
            elif k not in med:
                med[k] = "-"
        out.append(med)
    return out


def defects_study(dataset: str, feats: dict[str, np.ndarray], n: int, draws: int, seed: int = 0) -> list[dict]:
    """``yugami-train --defects``: ``n`` test defects drawn at random place the threshold (best F1, or
    recall 0.9); the figures come from the REST of the test set (every good, the other defects)."""
    from trainer.calibrate import threshold_from_defects
    from trainer.operating import operating_point
    from trainer.train import TrainConfig, calibrate_bundle

    cfg = TrainConfig(data_dir=SHARED / "data" / dataset, out=Path("unused"), progress=False, seed=seed)
    cal = calibrate_bundle(cfg, feats["train_emb"], feats["train_patch"])
    scores = test_scores(cal, feats, cfg.scoring)
    labels = (feats["test_types"] != "good").astype(int)
    defects = np.flatnonzero(labels == 1)
    rows = []
    for rule in ("f1", "recall"):
        points = []
        for d in range(draws):
            pick = np.random.default_rng([seed, d, 97]).choice(defects, n, replace=False)
            t = threshold_from_defects(cal.normal_scores, scores[pick], rule, 0.9, seed)["value"]
            rest = np.setdiff1d(np.arange(labels.size), pick)
            points.append(operating_point(labels[rest], scores[rest], t))
        rows.append({
            "dataset": dataset, "defects_given": n, "rule": rule if rule == "f1" else "recall 0.9", "draws": draws,
            "recall_median": float(np.median([p["recall_at_threshold"] for p in points])),
            "far_median": float(np.median([p["far_at_threshold"] for p in points])),
            "far_p90": float(np.quantile([p["far_at_threshold"] for p in points], 0.9)),
            "normal_only_recall": operating_point(labels, scores, cal.threshold["value"])["recall_at_threshold"],
        })
    return rows


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
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--work", type=Path, default=Path("runs/decisions"))
    p.add_argument("--results", default="decisions", help="name of the bench/results/NAME.{md,json} files")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="train seeds (one bundle each)")
    p.add_argument("--evaluate", action="store_true", help="also yugami-eval each seed's default bundle")
    p.add_argument(
        "--defects-study", type=int, default=0, metavar="N",
        help="also: N labelled test defects place the threshold (yugami-train --defects), 20 random draws, "
        "figures on the rest of the test set",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rows, evals, study = [], [], []
    for dataset in args.datasets:
        (args.work / dataset).mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            if args.evaluate:
                evals.append(evaluate_bundle(dataset, args.work, seed))
                print(table(evals[-1:]).splitlines()[-1], flush=True)
            feats = features(dataset, args.work, seed)
            for variant in args.variants:
                rows.append(run_variant(dataset, variant, feats, seed))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
            if args.defects_study and seed == args.seeds[0]:
                study += defects_study(dataset, feats, args.defects_study, draws=20, seed=seed)
                print(table(study[-2:]), flush=True)
    command = (
        f"python bench/decisions.py --datasets {' '.join(args.datasets)} --variants {' '.join(args.variants)} "
        f"--seeds {' '.join(map(str, args.seeds))}" + (" --evaluate" if args.evaluate else "")
        + (f" --defects-study {args.defects_study}" if args.defects_study else "")
    )
    text = f"# Decisions at the shipped threshold\n\n{json.dumps(machine())}\n\n`{command}`\n\n"
    if evals:
        text += "## yugami-eval of the default bundle, per seed\n\n" + table(evals + medians(evals)) + "\n\n"
    if rows:
        text += "## Variants, from cached int8 features (calibration re-run per variant)\n\n" + table(rows) + "\n\n"
    if study:
        text += (
            f"## Threshold placed with {args.defects_study} labelled defects (yugami-train --defects), "
            "figures on the rest of the test set\n\n" + table(study) + "\n"
        )
    rows = {"evaluate": evals, "variants": rows, "defects_study": study}  # type: ignore[assignment]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.results}.md").write_text(text)
    (RESULTS / f"{args.results}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
