"""``yugami-train`` and ``yugami-eval``: the workstation's two commands."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from trainer.calibrate import DEFAULT_FAR

logger = logging.getLogger(__name__)

# Kept here (equal to trainer.heads.HEADS, a test checks) so --help does not import Keras.
LOSSES = ("l2softmax", "arcface", "adacos", "adacos-fixed")

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

TRAIN_DESCRIPTION = """\
Train a yugami model bundle from NORMAL images only.

DATA_DIR is either MVTec layout (DATA_DIR/train/good/*.png; test/ is ignored here and used by
yugami-eval) or a plain folder of normal images. By default the trainer
  1. exports a full-integer int8 TFLite model of ImageNet MobileNetV2 (no training, --epochs 0):
     the last feature map (the camera box pools it with GeM into the embedding) and three early
     patch maps (block_2 / 7 / 13 on the input at half size), checked against the float model
     (mean cosine >= 0.98 on held-out normals, or no bundle),
  2. keeps the int8 embeddings of all training normals as the bank (greedy k-center, < 1 MB) and a
     coreset of their patch features as the patch bank (--patch-bank-rows, 2400),
  3. scores every normal out of fold (--folds 5), standardises the GeM and patch scores on those
     scores and averages them (--scoring fused),
  4. sets the threshold where a tail fitted to the normals' scores leaves --far (1 %) above it, and
     writes the false-alarm rate it expects with a 90 % range; or, with --defects DIR, at the best F1
     (or --threshold-rule recall) against a few labelled defective pictures.
With --epochs N it first fine-tunes MobileNetV2 with a metric-learning head (--loss) to separate
normal pictures from synthetic anomalies made afresh in every batch: thin lines drawn on the object
(class "line") and, with --classes 3, turned-and-shifted patches (class "distortion").
The bundle folder (manifest.json, embedder.tflite, bank.npz, patch_bank.npz, head.npz,
localization.png) is what the camera box loads; localization.png shows where the object was found.
"""

TRAIN_EPILOG = """\
Start here:
  yugami-train ../shared/data/mvtec_screw --out runs/screw \\
      --weights ../shared/weights/mobilenet_v2_1.0_224_no_top.h5
  yugami-eval runs/screw ../shared/data/mvtec_screw --json runs/screw_eval.json --plots runs/screw_plots
  # a release for boxes that check signatures (docs/FLEET.md): a higher version, signed
  yugami-train ... --model-version 2 --sign-key ~/yugami-keys/release-2026.key

What the default gives (int8 through the agent's scorer, median of 3 seeds, docs/TRAINING.md):
image AUROC screw 0.976, magnetic tile 0.956; GeM alone 0.93 / 0.95, patches alone 0.93 / 0.90.
At the shipped threshold (1 % false alarms expected) test false alarms stay at or under 1.2 % on both,
but only a third (screw) to a half (tile) of the defects are caught: a normal-only threshold cannot
know how far defects lie. If you have a few labelled defects, give them with --defects DIR.
The fine-tune (--epochs 10) measured below ImageNet features on both data sets (GeM: screw 0.855 vs
0.932, tile 0.892 vs 0.950); train it and let yugami-eval decide only if your defects are thin lines.
Training is deterministic for a given --seed on one machine. Without internet, pass --weights PATH
to a MobileNetV2 no-top .h5 file.
"""


def input_size(text: str) -> tuple[int, int]:
    """'448' -> (448, 448); '384x512' -> (384, 512) (height x width)."""
    parts = text.lower().split("x")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r}: give pixels (448) or height x width (384x512)")
    return (values[0], values[-1])


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="yugami-train",
        description=TRAIN_DESCRIPTION,
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR", help="MVTec-layout folder or a folder of normal images")
    p.add_argument("--out", type=Path, required=True, metavar="BUNDLE_DIR", help="bundle folder to write (replaced)")
    m = p.add_argument_group("method")
    m.add_argument(
        "--loss",
        choices=LOSSES,
        default="l2softmax",
        help="metric-learning head (default l2softmax: on MVTec screw at 448 px ArcFace's margin wrecked the "
        "features, see docs/TRAINING.md; adacos-fixed = AdaCos with fixed scale)",
    )
    m.add_argument(
        "--classes", type=int, choices=(2, 3), default=2, help="2: normal + line; 3: + distortion (default 2)"
    )
    m.add_argument(
        "--epochs",
        type=int,
        default=0,
        help="passes over train/good, each picture once per class (default 0: ImageNet features as they are, "
        "which measured best on both data sets; 10 is the fine-tune's usual length)",
    )
    m.add_argument("--scale", type=float, default=30.0, help="ArcFace s / L2-Softmax alpha (default 30)")
    m.add_argument("--margin", type=float, default=0.3, help="ArcFace margin m in radians (default 0.3)")
    net = p.add_argument_group("network")
    net.add_argument(
        "--input-size",
        type=input_size,
        default=(448, 448),
        metavar="PX|HxW",
        help="model input in pixels, square (448) or height x width (384x512) to keep a wide camera's aspect "
        "(default 448: MVTec screw's threads need it, 4x the compute of 224; large, coarse defects can take 224)",
    )
    net.add_argument("--alpha", type=float, default=1.0, help="MobileNetV2 width multiplier (default 1.0)")
    net.add_argument(
        "--weights",
        default="imagenet",
        help="'imagenet' (Keras downloads them), 'none' (random) or a .h5 file (default imagenet)",
    )
    net.add_argument(
        "--fine-tune-layers",
        type=int,
        default=38,
        metavar="N",
        help="train the last N backbone layers, BatchNorm stays frozen (default 38 = block_13 onwards; -1 = all)",
    )
    net.add_argument(
        "--projection",
        type=int,
        default=0,
        metavar="D",
        help="Dense projection to D dims before the L2 norm (default 0 = pooled features; needs --pooling avg)",
    )
    net.add_argument(
        "--pooling",
        choices=["gem", "avg"],
        default="gem",
        help="feature map to embedding: 'gem' generalised mean (default; the device pools the int8 feature "
        "map) or 'avg' global average inside the model",
    )
    net.add_argument(
        "--gem-p", type=float, default=3.0, metavar="P", help="GeM exponent (default 3; 1 = average, large = max)"
    )
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, default=32, help="default 32")
    opt.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    opt.add_argument("--seed", type=int, default=0, help="seed for everything random (default 0)")
    cal = p.add_argument_group("scoring, banks and threshold")
    cal.add_argument(
        "--scoring",
        choices=["fused", "gem", "patch"],
        default="fused",
        help="'fused' (default): GeM and patch scores, each standardised on normal pictures, averaged; "
        "'gem': 1 - max cosine of the GeM embedding; 'patch': the worst cell's distance to the patch bank",
    )
    cal.add_argument(
        "--patch-bank-rows",
        type=int,
        default=2400,
        metavar="N",
        help="rows of the patch bank (coreset of all training cells; default 2400: ~10 ms exact search per frame)",
    )
    cal.add_argument(
        "--defects",
        type=Path,
        default=None,
        metavar="DIR",
        help="a folder of a few labelled defective pictures: place the threshold with them (--threshold-rule) "
        "instead of at --far on normals alone; the manifest records both and the false-alarm rate expected",
    )
    cal.add_argument(
        "--threshold-rule",
        choices=["f1", "recall"],
        default="f1",
        help="with --defects: 'f1' best F1 against the normals (default), 'recall' flag --target-recall of them",
    )
    cal.add_argument("--target-recall", type=float, default=0.9, help="with --threshold-rule recall (default 0.9)")
    cal.add_argument(
        "--patch-top-k",
        type=int,
        default=10,
        metavar="K",
        help="a frame's patch score is the mean of its K worst cells (default 10; 1 = the worst cell alone)",
    )
    cal.add_argument(
        "--folds",
        type=int,
        default=5,
        help="calibration folds: each is scored against banks built without it (default 5)",
    )
    cal.add_argument(
        "--bank-size",
        type=int,
        default=None,
        help="at most this many bank vectors (default: what fits in bank.npz < 1 MB)",
    )
    cal.add_argument(
        "--far", type=float, default=DEFAULT_FAR, help="target false-alarm rate for the threshold (default 0.01)"
    )
    cal.add_argument(
        "--holdout", type=float, default=0.2, help="share of train/good held out for calibration (default 0.2)"
    )
    cal.add_argument(
        "--representative", type=int, default=300, help="normal pictures calibrating the int8 ranges (default 300)"
    )
    cal.add_argument(
        "--min-int8-cosine",
        type=float,
        default=0.98,
        help="refuse the export when the int8 model's embeddings of held-out normals agree with the "
        "float model's less than this mean cosine (default 0.98)",
    )
    misc = p.add_argument_group("output")
    misc.add_argument("--name", default="yugami-mobilenetv2", help="model name in the manifest")
    misc.add_argument("--model-version", "--version", dest="version", default="1", metavar="V",
                      help="model version in the manifest (default 1); boxes refuse a bundle older than the one "
                      "they run unless forced, so raise it with every release (1, 2, ... or 1.10 > 1.9)")
    misc.add_argument("--sign-key", type=Path, default=None, metavar="KEY",
                      help="sign the bundle after export with this private key (NAME.key from yugami-keys "
                      "generate); boxes with bundle_trust keys accept only signed bundles")
    misc.add_argument(
        "--save-float",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the float32 TFLite of the same embedder (for yugami-eval --float-model)",
    )
    misc.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return p


def _train_config(args: argparse.Namespace):
    from trainer.anomalies import AnomalyConfig
    from trainer.model import ModelConfig
    from trainer.train import TrainConfig

    if args.epochs < 0 or args.batch_size < 1 or args.lr <= 0 or min(args.input_size) < 32:
        raise ValueError("--epochs >= 0, --batch-size >= 1, --lr > 0 and --input-size >= 32 are required")
    if args.patch_bank_rows < 1 or args.folds < 2 or args.patch_top_k < 1:
        raise ValueError("--patch-bank-rows >= 1, --patch-top-k >= 1 and --folds >= 2 are required")
    if not 0 < args.holdout < 1:
        raise ValueError("--holdout must be in (0, 1): the threshold is calibrated on held-out normals")
    return TrainConfig(
        data_dir=args.data_dir,
        out=args.out,
        loss=args.loss,
        classes=args.classes,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        scale=args.scale,
        margin=args.margin,
        seed=args.seed,
        holdout=args.holdout,
        far=args.far,
        bank_size=args.bank_size,
        scoring=args.scoring,
        patch_bank_rows=args.patch_bank_rows,
        patch_top_k=args.patch_top_k,
        folds=args.folds,
        defects=args.defects,
        threshold_rule=args.threshold_rule,
        target_recall=args.target_recall,
        representative=args.representative,
        min_int8_cosine=args.min_int8_cosine,
        model=ModelConfig(
            input_size=args.input_size,
            alpha=args.alpha,
            weights=args.weights,
            projection=args.projection,
            fine_tune_layers=args.fine_tune_layers,
            pooling=args.pooling,
            gem_p=args.gem_p,
        ),
        anomaly=AnomalyConfig(classes=args.classes),
        name=args.name,
        version=args.version,
        progress=not args.quiet,
    )


def _setup_logging(quiet: bool) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def train_main(argv: Sequence[str] | None = None) -> int:
    args = build_train_parser().parse_args(argv)
    _setup_logging(args.quiet)
    from trainer.data import DataError
    from trainer.export import ExportError
    from trainer.model import ModelError

    try:
        cfg = _train_config(args)
        _check_sign_key(args.sign_key)  # before minutes of training, not after
        from trainer.train import train

        out = train(cfg, save_float=args.save_float)
    except (DataError, ModelError, ValueError) as exc:
        print(f"yugami-train: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ExportError as exc:
        print(f"yugami-train: export refused: {exc}", file=sys.stderr)
        return EXIT_FAILED
    result: dict[str, object] = {"bundle": str(out)}
    if args.sign_key is not None:
        from fleet.keys import KeysError, sign_bundle

        try:
            result["signed"] = sign_bundle(out, args.sign_key)["key_id"]
        except KeysError as exc:
            print(f"yugami-train: the bundle {out} was written but not signed: {exc}", file=sys.stderr)
            return EXIT_FAILED
    print(json.dumps(result))
    return 0


def _check_sign_key(path: Path | None) -> None:
    """A --sign-key that cannot sign is a ValueError now (fleet.keys needs no TensorFlow)."""
    if path is None:
        return
    from fleet.keys import KeysError, load_private_key

    try:
        load_private_key(path)
    except KeysError as exc:
        raise ValueError(f"--sign-key: {exc}") from exc


def build_eval_parser() -> argparse.ArgumentParser:
    from trainer.evaluate import SCORERS

    p = argparse.ArgumentParser(
        prog="yugami-eval",
        description=(
            "Score DATA_DIR/test/* with a bundle exactly as the camera box does (int8 TFLite through the agent's "
            "scorer) and report image AUROC (overall and per defect type), the bundle's threshold, and the "
            "false-alarm and miss rates it gives. Needs test/good/ and at least one test/<defect type>/."
        ),
        epilog="Example: yugami-eval runs/screw ../shared/data/mvtec_screw --json runs/screw.json --plots runs/plots",
    )
    p.add_argument("bundle", type=Path, help="bundle folder written by yugami-train")
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR", help="MVTec-layout folder with test/")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--plots", type=Path, default=None, metavar="DIR", help="write roc.png and score_histogram.png")
    p.add_argument(
        "--scorer",
        choices=SCORERS,
        default="cosine",
        help="cosine: what the device does (default); lof: Local Outlier Factor on the bank",
    )
    p.add_argument(
        "--float-model",
        type=Path,
        default=None,
        metavar="FILE",
        help="float32 TFLite of the same embedder (yugami-train --save-float): also score with it in place of "
        "the int8 model and report its figures under 'float'. Its bank and threshold are rebuilt from "
        "DATA_DIR's train/good with the bundle's hold-out split, as the trainer built the int8 ones",
    )
    p.add_argument("--threads", type=int, default=None, help="TFLite interpreter threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def eval_main(argv: Sequence[str] | None = None) -> int:
    args = build_eval_parser().parse_args(argv)
    _setup_logging(True)
    from agent.bundle import BundleError
    from agent.preprocess import ImageError
    from trainer.data import DataError
    from trainer.evaluate import evaluate

    try:
        result = evaluate(
            args.bundle,
            args.data_dir,
            scorer=args.scorer,
            json_path=args.json,
            plots_dir=args.plots,
            num_threads=args.threads,
            progress=not args.quiet,
            float_model=args.float_model,
        )
    except (BundleError, DataError, ImageError) as exc:
        print(f"yugami-eval: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
