"""Score ``test/*`` with a bundle exactly as the device does (int8 TFLite through agent.scoring.Scorer).

Reports image AUROC (good vs all defects, and good vs each defect type), the bundle's threshold and
the false-alarm and miss rates it gives. ``scorer="lof"`` replaces the max-cosine score by
scikit-learn's Local Outlier Factor fitted on the bank (evaluation only, the device keeps cosine).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.bundle import Bundle, BundleError, load_bundle
from agent.preprocess import load_image
from agent.runtime import TFLiteModel
from agent.scoring import Scorer
from trainer.data import GOOD, DataError, find_dataset
from trainer.plots_gradcam import write_gradcam_grid

logger = logging.getLogger(__name__)

SCORERS = ("cosine", "lof")


@dataclass(frozen=True)
class Scored:
    types: list[str]  # defect type per image ("good" for normals)
    scores: np.ndarray
    embeddings: np.ndarray
    names: list[str]
    paths: list[Path] = dataclasses.field(default_factory=list)
    frame_shapes: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    # with keep_maps: per picture, the patch anomaly map and the Grad-CAM map at cell resolution
    maps: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)


def embed_and_score(
    bundle: Bundle, test: dict[str, list[Path]], progress: bool = False, keep_maps: bool = False
) -> Scored:
    from tqdm import tqdm

    from agent.gradcam import anomaly_cam

    scorer = Scorer(bundle)
    scored = Scored([], np.zeros(0), np.zeros(0), [], maps={"anomaly_map": [], "gradcam": []})
    scores, embs = [], []
    items = [(t, p) for t in sorted(test) for p in test[t]]
    for t, p in tqdm(items, desc="scoring", unit="img", disable=not progress):
        frame = load_image(p)
        result, emb = scorer.score(frame, name=str(p))
        scored.types.append(t)
        scores.append(result.score)
        embs.append(emb.vector)
        scored.names.append(f"{t}/{p.name}")
        scored.paths.append(p)
        scored.frame_shapes.append(frame.shape[:2])
        if keep_maps and emb.patch_map is not None:
            scored.maps["anomaly_map"].append(emb.patch_map)
        if keep_maps and emb.feature_map is not None:
            scored.maps["gradcam"].append(anomaly_cam(bundle, emb, result.nearest))
    return dataclasses.replace(scored, scores=np.asarray(scores), embeddings=np.stack(embs))


def with_float_model(bundle: Bundle, model_path: Path, num_threads: int | None = None) -> Bundle:
    """The bundle with its int8 model replaced by a float TFLite of the same embedder; bank,
    threshold and preprocessing stay the bundle's, so the two read the same way through the Scorer."""
    from trainer.export import output_roles, patch_roles

    try:
        model = TFLiteModel(model_path, num_threads=num_threads)
    except (ValueError, RuntimeError, OSError) as exc:
        raise BundleError(f"--float-model {model_path}: the TFLite runtime cannot load it ({exc})") from exc
    if model.input.shape != bundle.model.input.shape:
        raise BundleError(
            f"--float-model {model_path}: input {model.input.shape} differs from the bundle's "
            f"{bundle.model.input.shape}; give the file yugami-train --save-float wrote with this bundle"
        )
    roles = output_roles(model)
    source = roles.get("feature_map") if bundle.embedding.pooling == "gem" else roles.get("embedding")
    if source is None or source.shape[-1] != bundle.embedding_dim:
        raise BundleError(
            f"--float-model {model_path}: outputs {[o.shape for o in model.outputs]} do not give the bundle's "
            f"{bundle.embedding.pooling} embedding of dimension {bundle.embedding_dim}; give the file "
            "yugami-train --save-float wrote with this bundle"
        )
    patch_outputs = tuple(roles[r] for r in patch_roles(roles))
    if bundle.patch is not None and [o.shape for o in patch_outputs] != [o.shape for o in bundle.patch_outputs]:
        raise BundleError(
            f"--float-model {model_path}: patch outputs {[o.shape for o in patch_outputs]} differ from the bundle's "
            f"{[o.shape for o in bundle.patch_outputs]}; give the file yugami-train --save-float wrote with this bundle"
        )
    return dataclasses.replace(
        bundle,
        model=model,
        embedding_output=roles.get("embedding"),
        feature_map_output=roles.get("feature_map"),
        patch_outputs=patch_outputs if bundle.patch is not None else (),
    )


def with_float_bank(
    bundle: Bundle, train: list[Path], progress: bool = False, model_path: Path | None = None
) -> tuple[Bundle, dict[str, Any]]:
    """``bundle`` (already holding the float model) with banks and threshold rebuilt from its own
    features, the way the trainer built the int8 ones: bundles with a ``scoring`` entry through
    :func:`trainer.train.calibrate_bundle` (folds, patch coreset, fusion, tail threshold, the
    manifest's settings), older ones through :func:`trainer.calibrate.bank_and_threshold` (the same
    fit / held-out split). Float test features against int8 banks would measure the int8-vs-float
    offset, not the features (screw, ImageNet: 0.70 instead of 0.81)."""
    if bundle.manifest.get("scoring") is not None and model_path is not None:
        return _float_recalibrated(bundle, train, model_path, progress)
    from tqdm import tqdm

    from trainer.calibrate import DEFAULT_FAR, bank_and_threshold
    from trainer.data import split_holdout

    settings = bundle.manifest.get("training", {}).get("settings", {})
    holdout, seed = float(settings.get("holdout", 0.2)), int(settings.get("seed", 0))
    far = float(settings.get("far", DEFAULT_FAR))
    scorer = Scorer(bundle)
    emb = np.stack(
        [scorer.embed(load_image(p), str(p)).vector for p in tqdm(train, desc="float bank", disable=not progress)]
    )
    fit_idx, held_idx = split_holdout(len(train), holdout, seed)
    bank16, reduction, threshold = bank_and_threshold(emb[fit_idx], emb[held_idx], far, bundle.bank.shape[0])
    bank = bank16.astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    info = {
        "bank": f"float embeddings of train/good ({len(train)}), k-center to {bank.shape[0]}",
        "threshold_source": f"float held-out normals ({len(held_idx)}) at false-alarm target {far}",
        "bank_reduction": reduction,
    }
    bundle = dataclasses.replace(bundle, bank=bank, threshold=threshold["value"], score_scale=threshold["scale"])
    return bundle, info


def _float_recalibrated(
    bundle: Bundle, train: list[Path], model_path: Path, progress: bool
) -> tuple[Bundle, dict[str, Any]]:
    from agent.patches import Fusion, PatchBank
    from trainer.data import load_prepared, to_model_input
    from trainer.export import tflite_features
    from trainer.train import TrainConfig, calibrate_bundle

    settings = bundle.manifest.get("training", {}).get("settings", {})
    keys = ("scoring", "folds", "patch_bank_rows", "far", "seed", "bank_size")
    cfg = TrainConfig(data_dir=Path("."), out=Path("."), **{k: settings[k] for k in keys if k in settings})
    x = to_model_input(load_prepared(train, bundle.preprocessing), bundle.preprocessing)
    emb, patches = tflite_features(
        model_path.read_bytes(), x, spec=bundle.embedding, patches=bundle.patch is not None, progress=progress
    )
    cal = calibrate_bundle(cfg, emb, patches)
    bank = cal.bank.astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    fusion = cal.manifest["scoring"].get("fusion")
    display = cal.manifest.get("patch", {}).get("map", {})
    bundle = dataclasses.replace(
        bundle,
        bank=bank,
        patch_bank=PatchBank.of(cal.patch_bank.astype(np.float32)) if cal.patch_bank is not None else None,
        fusion=Fusion.from_manifest(fusion) if fusion else None,
        threshold=cal.threshold["value"],
        score_scale=cal.threshold["scale"],
        map_floor=display.get("floor", bundle.map_floor),
        map_top=display.get("top", bundle.map_top),
    )
    info = {
        "bank": f"float features of train/good ({len(train)}), calibrated as the trainer does ({cfg.scoring})",
        "threshold_source": cal.threshold["method"],
    }
    return bundle, info


PIXEL_EVAL_PX = 256  # maps and masks compared at this long side (MVTec practice): bounded memory and time


def _mask(data_dir: Path, kind: str, path: Path, size: tuple[int, int]) -> np.ndarray | None:
    if kind == GOOD:
        return None
    mpath = data_dir / "ground_truth" / kind / f"{path.stem}_mask.png"
    m = cv2.imread(str(mpath), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise DataError(f"{mpath}: missing or unreadable mask; ground_truth/ must hold one per defect picture")
    return cv2.resize(m, (size[1], size[0]), interpolation=cv2.INTER_NEAREST) > 127


def has_masks(bundle: Bundle, data_dir: Path) -> bool:
    """Pixel figures need ``ground_truth/`` and maps over the whole picture (no ROI)."""
    return (data_dir / "ground_truth").is_dir() and bundle.preprocessing.roi is None


def pixel_metrics(data_dir: Path, scored: Scored) -> dict[str, Any]:
    """Pixel AUROC and AUPRO (to 30 % FPR) of the patch anomaly map and of Grad-CAM (kept by
    :func:`embed_and_score` with ``keep_maps``) against ``ground_truth/<type>/<name>_mask.png``."""
    from agent.gradcam import upsample
    from trainer.operating import aupro, pixel_auroc

    sizes = []
    for h, w in scored.frame_shapes:
        f = min(1.0, PIXEL_EVAL_PX / max(h, w))
        sizes.append((max(1, round(h * f)), max(1, round(w * f))))
    masks = [_mask(data_dir, t, p, size) for t, p, size in zip(scored.types, scored.paths, sizes, strict=True)]
    out: dict[str, Any] = {"compared_at": f"long side {PIXEL_EVAL_PX} px", "images": len(masks)}
    for name, cams in scored.maps.items():
        if cams and len(cams) == len(masks):
            m = [upsample(c, size) for c, size in zip(cams, sizes, strict=True)]
            out[name] = {"pixel_auroc": pixel_auroc(masks, m), "aupro": aupro(masks, m)}
    return out


def lof_scores(bank: np.ndarray, embeddings: np.ndarray, neighbours: int = 20) -> tuple[np.ndarray, float]:
    """(LOF outlier scores, LOF's own threshold): higher is more anomalous."""
    from sklearn.neighbors import LocalOutlierFactor

    k = max(1, min(neighbours, bank.shape[0] - 1))
    lof = LocalOutlierFactor(n_neighbors=k, novelty=True, metric="cosine").fit(bank)
    return -lof.score_samples(embeddings), float(-lof.offset_)


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, scores))


def metrics(types: list[str], scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Ranking (AUROC), the bundle's threshold as an operating point, the best F1 any threshold
    gives, and recall at fixed false-alarm rates (:mod:`trainer.operating`). The operating figures
    need both good and defective images; with one class they are None. ``resolution`` is one good
    and one defective image as a rate: a false-alarm rate below ``resolution["far"]`` is interpolated,
    not measured."""
    from trainer.operating import f1_max, operating_point, recall_at_far

    kinds = np.asarray(types)
    defect = (kinds != GOOD).astype(int)
    good_scores, bad_scores = scores[defect == 0], scores[defect == 1]
    per_type = {}
    for t in sorted(set(types) - {GOOD}):
        sel = (kinds == GOOD) | (kinds == t)
        per_type[t] = auroc((kinds[sel] == t).astype(int), scores[sel])
    operating: dict[str, Any] = dict.fromkeys(
        (
            "recall_at_threshold",
            "far_at_threshold",
            "precision_at_threshold",
            "f1_at_threshold",
            "f1_max",
            "f1_max_threshold",
            "recall_at_far",
            "resolution",
        )
    )
    if good_scores.size and bad_scores.size:
        operating.update(operating_point(defect, scores, threshold))
        operating.update(f1_max(defect, scores))
        at_far = {str(far): recall_at_far(defect, scores, far) for far in (0.01, 0.05)}
        operating["recall_at_far"] = {k: v["recall"] for k, v in at_far.items()}
        operating["resolution"] = next(iter(at_far.values()))["resolution"]
    return {
        "image_auroc": auroc(defect, scores),
        "per_defect_auroc": per_type,
        "threshold": float(threshold),
        "false_alarm_rate": float(np.mean(good_scores > threshold)) if good_scores.size else None,
        "miss_rate": float(np.mean(bad_scores <= threshold)) if bad_scores.size else None,
        "n_good": int(good_scores.size),
        "n_defect": int(bad_scores.size),
        **operating,
    }


def write_plots(out_dir: Path, types: list[str], scores: np.ndarray, threshold: float, title: str) -> list[Path]:
    """ROC curve and score histograms (good vs defective, threshold line) as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    out_dir.mkdir(parents=True, exist_ok=True)
    defect = (np.asarray(types) != GOOD).astype(int)
    paths = []
    fig, ax = plt.subplots(figsize=(5, 5))
    if len(np.unique(defect)) == 2:
        fpr, tpr, _ = roc_curve(defect, scores)
        ax.plot(fpr, tpr, label=f"AUROC {auroc(defect, scores):.3f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false-alarm rate", ylabel="detection rate", title=f"ROC: {title}")
    ax.legend(loc="lower right")
    paths.append(out_dir / "roc.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(min(scores.min(), threshold), max(scores.max(), threshold), 40)
    ax.hist(scores[defect == 0], bins=bins, alpha=0.6, label=f"good ({int((defect == 0).sum())})")
    ax.hist(scores[defect == 1], bins=bins, alpha=0.6, label=f"defective ({int(defect.sum())})")
    ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.4f}")
    ax.set(xlabel="anomaly score", ylabel="images", title=f"Scores: {title}")
    ax.legend()
    paths.append(out_dir / "score_histogram.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


def _scores(bundle: Bundle, scored: Scored, scorer: str) -> tuple[np.ndarray, float]:
    if scorer == "lof":
        return lof_scores(bundle.bank, scored.embeddings)
    return scored.scores, bundle.threshold


def evaluate(
    bundle_path: str | Path,
    data_dir: str | Path,
    scorer: str = "cosine",
    json_path: Path | None = None,
    plots_dir: Path | None = None,
    num_threads: int | None = None,
    progress: bool = False,
    float_model: Path | None = None,
) -> dict[str, Any]:
    """Figures of the bundle's int8 model; with ``float_model`` also those of the float TFLite
    (its own bank and threshold, built as the trainer builds them) under ``result["float"]``."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; use one of {SCORERS}")
    bundle = load_bundle(bundle_path, num_threads=num_threads)
    ds = find_dataset(data_dir)
    if GOOD not in ds.test or not ds.defect_types:
        raise DataError(f"{data_dir}: evaluation needs test/good/ and at least one test/<defect type>/ folder")
    float_bundle = with_float_model(bundle, float_model, num_threads) if float_model is not None else None
    float_info: dict[str, Any] = {}
    if float_bundle is not None:
        float_bundle, float_info = with_float_bank(float_bundle, ds.train, progress=progress, model_path=float_model)
    masks = has_masks(bundle, Path(data_dir))
    scored = embed_and_score(bundle, ds.test, progress=progress, keep_maps=masks)
    scores, threshold = _scores(bundle, scored, scorer)
    result = {
        "bundle": str(bundle_path),
        "data": str(data_dir),
        "scorer": scorer,
        "threshold_source": "bundle (calibrated on held-out normals)" if scorer == "cosine" else "LOF offset",
        **metrics(scored.types, scores, threshold),
        "manifest_sha256": bundle.manifest_sha256,
    }
    if float_bundle is not None:
        f_scored = embed_and_score(float_bundle, ds.test, progress=progress)
        f_scores, f_threshold = _scores(float_bundle, f_scored, scorer)
        result["float"] = {"model": str(float_model), **float_info, **metrics(f_scored.types, f_scores, f_threshold)}
    if masks:
        pixels = pixel_metrics(Path(data_dir), scored)
        result["pixel"] = pixels
        for name in ("anomaly_map", "gradcam"):
            if name in pixels:
                result[f"pixel_auroc_{name}"] = pixels[name]["pixel_auroc"]
                result[f"aupro_{name}"] = pixels[name]["aupro"]
        # the map the box shows first: the patch anomaly map where the bundle has one
        best = pixels.get("anomaly_map") or pixels.get("gradcam") or {}
        result["pixel_auroc"], result["aupro"] = best.get("pixel_auroc"), best.get("aupro")
    if plots_dir is not None:
        result["plots"] = [str(p) for p in write_plots(plots_dir, scored.types, scores, threshold, bundle.name)]
        if bundle.patch is not None:
            grid = write_gradcam_grid(bundle, ds.test, plots_dir / "anomaly_map_grid.jpg", patch_map=True)
            result["plots"].append(str(grid))
        if bundle.feature_map_output is not None:  # heat maps need the contract's feature_map output
            result["plots"].append(str(write_gradcam_grid(bundle, ds.test, plots_dir / "gradcam_grid.jpg")))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result
