"""Normal images in, a model bundle out.

1. read train/good (or a plain folder), prepare every picture with the agent's preprocessing;
2. hold out a seeded share of the normals (fine-tuning leaves them out; the int8 check uses them);
3. localise the object (mean picture, difference, Otsu, morphology) in the fit pictures;
4. with ``epochs > 0`` fine-tune MobileNetV2 with a metric-learning head to tell normal pictures from
   synthetic anomalies (line, distortion) made afresh in every batch (default ``epochs=0``: ImageNet
   features as they are, which measured best on both data sets);
5. export a full-integer int8 TFLite model: the feature map (pooled with GeM by the agent) and, for
   patch or fused scoring, the patch trunk's three maps; compare it with the float model on the
   held-out normals and refuse to ship below a mean cosine of 0.98;
6. read every normal's int8 features as the box will; banks of all normals (GeM: k-center; patches:
   a coreset of all cells); every normal scored out of fold gives the fusion's statistics and the
   threshold (a tail fit at the target false-alarm rate, or placed with ``defects``);
7. write the bundle (manifest with every setting, the data fingerprint, head.npz for Grad-CAM).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.bundle import EmbeddingSpec, write_bundle
from agent.patches import SCORINGS
from agent.preprocess import Preprocessing
from trainer import anomalies, calibrate, data, localize
from trainer.bank import PATCH_PROJECTION_DIM
from trainer.export import (
    check_int8,
    export_float,
    export_int8,
    int8_agreement,
    output_roles,
    patch_roles,
    tflite_features,
    tflite_manifest,
)
from trainer.model import PATCH_INPUT_FACTOR, PATCH_LAYERS, ModelConfig, export_model

logger = logging.getLogger(__name__)

MODEL_NAME = "yugami-mobilenetv2"
PATCH_TOP_K = 10  # mean of the 10 worst cells: best on both shared sets (bench/results/decisions_topk.md)
PATCH_BANK_ROWS = 2400  # exact search of 784 cells x 2400 rows x 248 dims: ~10 ms, 1 thread (bench/speed.py)
DEBUG_PICTURE = "localization.png"
DEBUG_PANEL_PX = 112


@dataclass(frozen=True)
class TrainConfig:
    data_dir: Path
    out: Path
    loss: str = "l2softmax"  # l2softmax | arcface | adacos | adacos-fixed (see docs/TRAINING.md)
    classes: int = 2  # 2: normal + line; 3: + distortion
    epochs: int = 0  # 0: ImageNet features (measured best); > 0: the self-supervised fine-tune
    batch_size: int = 32
    lr: float = 1e-4  # Adam learning rate
    scale: float = 30.0  # ArcFace s (and L2-Softmax alpha)
    margin: float = 0.3  # ArcFace m (radians)
    seed: int = 0
    holdout: float = 0.2  # share of train/good kept out of the bank for calibration
    far: float = calibrate.DEFAULT_FAR  # target false-alarm rate of the threshold
    bank_size: int | None = None  # None: as many as fit in bank.npz < 1 MB
    scoring: str = "fused"  # fused | gem | patch (agent.patches; docs/TRAINING.md "scoring")
    patch_bank_rows: int = PATCH_BANK_ROWS  # rows of the patch bank (coreset of all training cells)
    patch_top_k: int = PATCH_TOP_K  # a frame's patch score: the mean of its k worst cells
    folds: int = calibrate.DEFAULT_FOLDS  # calibration: each fold scored against a bank built without it
    defects: Path | None = None  # a folder of a few labelled defective pictures to place the threshold with
    threshold_rule: str = "f1"  # with defects: "f1" (best F1) or "recall" (flag target_recall of them)
    target_recall: float = 0.9
    representative: int = 300  # normal pictures calibrating int8 activation ranges (100-500)
    min_int8_cosine: float = 0.98  # refuse the export when int8 and float embeddings agree less than this
    resize: str = "area"
    model: ModelConfig = field(default_factory=ModelConfig)
    anomaly: anomalies.AnomalyConfig = field(default_factory=anomalies.AnomalyConfig)
    name: str = MODEL_NAME
    version: str = "1"
    progress: bool = True

    def to_manifest(self) -> dict[str, Any]:
        d = asdict(self)
        d["data_dir"], d["out"] = str(self.data_dir), str(self.out)
        d["defects"] = str(self.defects) if self.defects is not None else None
        d["model"]["input_size"] = list(self.model.input_size)
        return d


def _seed_everything(seed: int) -> None:
    import keras

    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # Same seed, same bundle: deterministic kernels cost a little speed on CPU.
        tf.config.experimental.enable_op_determinism()


def epoch_plan(n_pictures: int, classes: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(picture index, label) for one epoch: every fit picture once in every class, shuffled."""
    idx = np.repeat(np.arange(n_pictures), classes)
    labels = np.tile(np.arange(classes), n_pictures)
    order = np.random.default_rng([seed, epoch]).permutation(idx.size)
    return idx[order], labels[order]


def make_batch(
    pictures: np.ndarray,
    masks: np.ndarray,
    idx: np.ndarray,
    labels: np.ndarray,
    gen: anomalies.AnomalyGenerator,
    rng: np.random.Generator,
    spec: Preprocessing,
) -> np.ndarray:
    """Float model inputs of one batch, anomalies drawn afresh with this batch's own rng."""
    return data.to_model_input(gen.batch(pictures[idx], masks[idx], labels, rng), spec)


def fine_tune(cfg: TrainConfig, pictures: np.ndarray, masks: np.ndarray, spec: Preprocessing):
    """Train embedder + head; returns (embedder, head, history of mean losses per epoch)."""
    import keras
    from tqdm import tqdm

    from trainer.heads import make_head
    from trainer.model import build_embedder, build_training_model, set_fine_tune

    embedder, backbone = build_embedder(cfg.model)
    if cfg.epochs == 0:
        return embedder, None, []
    n_weights = set_fine_tune(backbone, cfg.model.fine_tune_layers)
    head = make_head(cfg.loss, cfg.anomaly.classes, s=cfg.scale, m=cfg.margin)
    trainer = build_training_model(embedder, head)
    trainer.compile(
        optimizer=keras.optimizers.Adam(cfg.lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    logger.info("fine-tuning %d backbone weights, head %s, %d classes", n_weights, cfg.loss, cfg.anomaly.classes)
    gen = anomalies.AnomalyGenerator(cfg.anomaly)
    history: list[dict[str, float]] = []
    for epoch in range(cfg.epochs):
        idx, labels = epoch_plan(len(pictures), cfg.anomaly.classes, cfg.seed, epoch)
        steps = range(0, idx.size, cfg.batch_size)
        bar = tqdm(steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not cfg.progress)
        losses, accs = [], []
        for step, start in enumerate(bar):
            b_idx, b_lab = idx[start : start + cfg.batch_size], labels[start : start + cfg.batch_size]
            rng = np.random.default_rng([cfg.seed, epoch, step])
            x = make_batch(pictures, masks, b_idx, b_lab, gen, rng, spec)
            loss, acc = trainer.train_on_batch([x, b_lab.astype(np.int32)], b_lab.astype(np.int32))
            losses.append(float(loss))
            accs.append(float(acc))
            bar.set_postfix(loss=f"{np.mean(losses):.3f}", acc=f"{np.mean(accs):.3f}")
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "accuracy": float(np.mean(accs))})
        logger.info("epoch %d: loss %.4f accuracy %.3f", epoch + 1, history[-1]["loss"], history[-1]["accuracy"])
    return embedder, head, history


def _representative(pictures: np.ndarray, cfg: TrainConfig, spec: Preprocessing) -> list[np.ndarray]:
    """Normal pictures for the int8 activation ranges, nothing synthetic added. Every 4th picture
    used to carry a synthetic line, so the ranges would not clip what a defect does; the lines widen
    the early layers' ranges instead, and coarser steps for the normal texture cost more than the
    clipping saves: zero-training GeM 448 px screw bundle, int8 AUROC 0.914 with lines, 0.932 without
    (float 0.939; ``bench/int8_gem.py``, docs/INT8.md)."""
    rng = np.random.default_rng([cfg.seed, 11])
    pick = sorted(rng.permutation(len(pictures))[: cfg.representative])
    return list(data.to_model_input(pictures[pick], spec))


def embedding_spec(model: ModelConfig) -> EmbeddingSpec:
    """How the agent reads the embedding of this model: pools the feature map (GeM) or takes the output."""
    return EmbeddingSpec("gem", model.gem_p) if model.pooling == "gem" else EmbeddingSpec("model")


def _gradcam_entry(cfg: TrainConfig, head: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "feature_map_output": "feature_map",
        "pooling": cfg.model.pooling,
        "projection": cfg.model.projection > 0,
    }
    if head is not None:
        entry["class_names"] = cfg.anomaly.class_names
    return entry


def _debug_png(pictures: np.ndarray, mean: np.ndarray, masks: np.ndarray) -> bytes:
    picture = localize.debug_picture(pictures, mean, masks)
    # Panels of DEBUG_PANEL_PX: enough to see where the object was found, and it keeps a noisy 16-panel
    # PNG small in every bundle shipped to a camera box (at 448 px full-size panels made 1.1 MB of it).
    scale = min(1.0, DEBUG_PANEL_PX / pictures.shape[1])
    picture = cv2.resize(picture, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("could not encode the localisation debug picture")
    return buf.tobytes()


def _float_embeddings(embedder: Any, inputs: np.ndarray, batch: int = 32) -> np.ndarray:
    emb, _ = embedder.predict(inputs, batch_size=batch, verbose=0)
    return np.asarray(emb, np.float32)


@dataclass
class Calibrated:
    bank: np.ndarray  # float16 GeM / embedding bank of all normals
    reduction: dict[str, Any]
    patch_bank: np.ndarray | None
    threshold: dict[str, Any]
    manifest: dict[str, Any]  # the "scoring" and "patch" entries (without the patch outputs' roles)
    normal_scores: np.ndarray  # out-of-fold scores of every training normal, in the bundle's scoring

    def score(self, emb: np.ndarray, patch_feats: np.ndarray | None) -> np.ndarray:
        """Scores of pictures outside the banks (features as :func:`tflite_features` gives them), the
        agent's arithmetic: 1 - max cosine, the worst cell's distance, or their fusion."""
        from agent.patches import Fusion, PatchBank, nearest_distances, worst_cells
        from agent.scoring import cosine_scores

        bank = self.bank.astype(np.float32)
        gem = cosine_scores(emb, bank / np.linalg.norm(bank, axis=1, keepdims=True))[0]
        method = self.manifest["scoring"]["method"]
        if method == "gem" or self.patch_bank is None or patch_feats is None:
            return gem
        pbank = PatchBank.of(self.patch_bank.astype(np.float32))
        top_k = int(self.manifest["patch"].get("top_k", 1))
        patch = np.array([worst_cells(nearest_distances(f.astype(np.float32), pbank), top_k) for f in patch_feats])
        if method == "patch":
            return patch
        return Fusion.from_manifest(self.manifest["scoring"]["fusion"]).fuse(gem, patch)


def calibrate_bundle(cfg: TrainConfig, emb: np.ndarray, patch_feats: np.ndarray | None) -> Calibrated:
    """Banks and threshold from every training normal (int8 features, as the device reads them).

    k folds: each fold is scored against banks built from the other folds (out-of-fold scores, what
    a new normal frame scores); GeM and patch scores are standardised with their out-of-fold mean and
    standard deviation and averaged (``fused``); the threshold models the upper tail of the
    out-of-fold scores of the chosen scoring (:func:`trainer.calibrate.tail_threshold`). The banks
    that ship hold every normal."""
    from agent.patches import Fusion
    from trainer.bank import build_bank, patch_coreset

    folds = calibrate.fold_indices(emb.shape[0], cfg.folds, cfg.seed)
    if patch_feats is not None and cfg.patch_top_k > patch_feats.shape[1]:
        cfg = replace(cfg, patch_top_k=patch_feats.shape[1])  # a small input has fewer cells than k
    oof = calibrate.out_of_fold_scores(
        emb, patch_feats, folds, cfg.patch_bank_rows, cfg.bank_size, cfg.seed, cfg.patch_top_k
    )
    bank16, reduction = build_bank(emb, cfg.bank_size)
    entry: dict[str, Any] = {"scoring": {"method": "gem" if cfg.scoring == "gem" else cfg.scoring}}
    scores = oof["gem"]
    patch_bank = None
    if patch_feats is not None:
        patch_bank = patch_coreset(patch_feats, cfg.patch_bank_rows, cfg.seed).astype(np.float16)
        p_mean, p_std = float(oof["patch"].mean()), float(max(oof["patch"].std(), 1e-6))
        entry["patch"] = {
            "layers": list(PATCH_LAYERS),
            "input": f"the model input averaged {PATCH_INPUT_FACTOR}x{PATCH_INPUT_FACTOR} (ImageNet weights)",
            "score": "mean of the top_k largest Euclidean distances of a cell's feature to its nearest bank row",
            "top_k": cfg.patch_top_k,
            "reduction": f"greedy k-center on a {PATCH_PROJECTION_DIM}-d random projection of all training cells",
            "from_cells": int(patch_feats.shape[0] * patch_feats.shape[1]),
            # the anomaly map's colours: a normal frame's worst cell at the bottom, 6 std above it at the top
            "map": {"floor": p_mean, "top": p_mean + 6.0 * p_std},
        }
        if cfg.scoring == "patch":
            scores = oof["patch"]
        elif cfg.scoring == "fused":
            fusion = Fusion(float(oof["gem"].mean()), float(max(oof["gem"].std(), 1e-6)), p_mean, p_std)
            entry["scoring"]["fusion"] = fusion.to_manifest()
            scores = fusion.fuse(oof["gem"], oof["patch"])
    entry["scoring"]["calibration"] = f"{len(folds)}-fold out-of-fold scores of all {emb.shape[0]} normals"
    threshold = calibrate.tail_threshold(scores, cfg.far, cfg.seed)
    logger.info(
        "threshold %.4f (%s); expected false-alarm rate %.4f (90%% %s)",
        threshold["value"], cfg.scoring, threshold["expected_false_alarm_rate"]["estimate"],
        [round(v, 4) for v in threshold["expected_false_alarm_rate"]["interval_90"]],
    )
    return Calibrated(bank16, reduction, patch_bank, threshold, entry, np.asarray(scores, np.float64))


def _threshold_from_defects(
    cfg: TrainConfig, cal: Calibrated, model_bytes: bytes, emb_spec: EmbeddingSpec, spec: Preprocessing
) -> dict[str, Any]:
    """The threshold placed with ``cfg.defects`` (labelled defective pictures scored as the box would)."""
    paths = data.find_dataset(cfg.defects).train
    emb, patches = tflite_features(
        model_bytes, data.to_model_input(data.load_prepared(paths, spec), spec), spec=emb_spec,
        patches=cal.patch_bank is not None,
    )
    threshold = calibrate.threshold_from_defects(
        cal.normal_scores, cal.score(emb, patches), cfg.threshold_rule, cfg.target_recall, cfg.seed
    )
    threshold["normal_only"] = {k: cal.threshold[k] for k in ("value", "method", "expected_false_alarm_rate")}
    logger.info(
        "threshold %.4f placed with %d defects (%s): recall on them %.2f, expected false alarms %.4f",
        threshold["value"], len(paths), cfg.threshold_rule, threshold["on_defects"]["recall"],
        threshold["expected_false_alarm_rate"]["estimate"],
    )
    return threshold


def _patch_spec(model_bytes: bytes) -> dict[str, Any] | None:
    """The manifest's patch outputs and grid, read off the exported model."""
    from agent.patches import grid_for
    from agent.runtime import TFLiteModel

    roles = output_roles(TFLiteModel(model_bytes))
    names = patch_roles(roles)
    if not names:
        return None
    return {"outputs": names, "grid": list(grid_for(roles[names[0]].shape[1:3])), "smoothing": 3}


def train(cfg: TrainConfig, save_float: Path | None = None) -> Path:
    """Run the whole pipeline and write the bundle to ``cfg.out``; returns its path.

    ``save_float``: also write the float32 TFLite of the same embedder there, so ``yugami-eval
    --float-model`` can tell what int8 costs from what the features themselves are worth."""
    t0 = time.perf_counter()
    if cfg.scoring not in SCORINGS:
        raise ValueError(f"--scoring {cfg.scoring!r}: use one of {list(SCORINGS)}")
    if cfg.model.patch != (cfg.scoring != "gem"):  # patch maps are exported exactly when the score uses them
        cfg = replace(cfg, model=replace(cfg.model, patch=cfg.scoring != "gem"))
    if cfg.epochs == 0 and cfg.model.projection > 0:
        raise ValueError(
            "--epochs 0 uses ImageNet features as they are; an untrained projection would scramble "
            "them: leave --projection at 0"
        )
    ds = data.find_dataset(cfg.data_dir)  # before TensorFlow starts, so a wrong path fails at once
    _seed_everything(cfg.seed)
    spec = Preprocessing(input_size=cfg.model.input_size, resize=cfg.resize)
    pictures = data.load_prepared(ds.train, spec)
    fit_idx, held_idx = data.split_holdout(len(pictures), cfg.holdout, cfg.seed)
    fit, held = pictures[fit_idx], pictures[held_idx]
    mean, masks = localize.object_masks(fit)

    embedder, head, history = fine_tune(cfg, fit, masks, spec)
    t_train = time.perf_counter() - t0

    representative = _representative(fit, cfg, spec)
    to_export = export_model(embedder, cfg.model)
    model_bytes = export_int8(to_export, representative)
    emb_spec = embedding_spec(cfg.model)
    all_emb, patch_feats = tflite_features(
        model_bytes, data.to_model_input(pictures, spec), spec=emb_spec, patches=cfg.model.patch,
        progress=cfg.progress,
    )
    agreement = int8_agreement(_float_embeddings(embedder, data.to_model_input(held, spec)), all_emb[held_idx])
    logger.info("int8 vs float: mean cosine %.4f (min %.4f)", agreement["mean_cosine"], agreement["min_cosine"])
    if save_float is not None:
        # Written before the int8 gate, so a refused export can still be measured in float.
        save_float.parent.mkdir(parents=True, exist_ok=True)
        save_float.write_bytes(export_float(to_export))
        logger.info("float TFLite written to %s", save_float)
    check_int8(agreement, cfg.min_int8_cosine)

    cal = calibrate_bundle(cfg, all_emb, patch_feats)
    if cfg.defects is not None:
        cal.threshold = _threshold_from_defects(cfg, cal, model_bytes, emb_spec, spec)
    if "patch" in cal.manifest:
        cal.manifest["patch"].update(_patch_spec(model_bytes) or {})
    manifest = {
        "model": {"name": cfg.name, "version": cfg.version, "backbone": f"MobileNetV2 alpha {cfg.model.alpha}"},
        "preprocessing": spec.to_manifest(),
        "tflite": tflite_manifest(model_bytes),
        "embedding_dim": int(all_emb.shape[1]),
        "embedding": emb_spec.to_manifest(),
        "gradcam": _gradcam_entry(cfg, head),
        "bank": {"reduction": cal.reduction, "source": "int8 embeddings of all train/good"},
        **cal.manifest,
        "threshold": cal.threshold,
        "int8_vs_float": {**agreement, "minimum_required": cfg.min_int8_cosine, "on": "held-out normals"},
        "training": {
            "settings": cfg.to_manifest(),
            "data": {
                "layout": ds.layout,
                "train_images": len(ds.train),
                "fit_images": len(fit_idx),
                "held_out_images": len(held_idx),
                "fingerprint_sha256": data.fingerprint(ds.train),
                "fingerprint_method": "sha256 over sorted file names and their bytes",
            },
            "history": history,
            "train_seconds": round(t_train, 1),
            "zero_training_baseline": cfg.epochs == 0,
        },
        "localization": {"debug_picture": DEBUG_PICTURE, "mean_object_share": float(np.mean(masks > 0))},
    }
    from trainer.model import head_arrays

    out = write_bundle(
        cfg.out,
        model_bytes=model_bytes,
        bank=cal.bank,
        patch_bank=cal.patch_bank,
        manifest=manifest,
        head=head_arrays(embedder, head) or None,
        extra_files={DEBUG_PICTURE: _debug_png(fit, mean, masks)},
    )
    logger.info("bundle %s written in %.1f s", out, time.perf_counter() - t0)
    return out
