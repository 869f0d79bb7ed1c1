"""``yugami-score BUNDLE IMAGE...``: score image files with a bundle, one JSON line per image.

With ``--gradcam DIR`` it also writes each image's anomaly heat map over the prepared picture, and
beside it the patch anomaly map for bundles that score patches (``DIR/<image stem>.gradcam.jpg``),
and names the file in the JSON line's ``gradcam`` field.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.bundle import Bundle, BundleError, load_bundle
from agent.gradcam import GradCamError, head_weights, inspection_jpeg
from agent.preprocess import ImageError, load_image
from agent.scoring import Embedding, Scorer

logger = logging.getLogger(__name__)

EXIT_BAD_BUNDLE = 2
EXIT_SOME_IMAGES_FAILED = 1


def build_score_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yugami-score",
        description=(
            "Score image files with a yugami model bundle, exactly as the camera box does "
            "(same preprocessing, same int8 TFLite model, same threshold). Prints one JSON line per image: "
            '{"image", "score", "threshold", "verdict": "ok"|"anomaly", "confidence", "latency_ms"}.'
        ),
        epilog=(
            "Exit status: 0 all images scored; 1 some image could not be read (it gets an error line, the others "
            "are still scored); 2 the bundle was refused.\n\n"
            "Example: yugami-score models/demo part1.png part2.png"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bundle", help="bundle folder (manifest.json, embedder.tflite, bank.npz)")
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, BMP, TIFF...)")
    parser.add_argument("--threads", type=int, default=None, help="TFLite interpreter threads (default: runtime's)")
    parser.add_argument(
        "--gradcam",
        metavar="DIR",
        default=None,
        help="also write each image's anomaly heat map as DIR/<stem>.gradcam.jpg (colour scale fixed by the bundle)",
    )
    return parser


def gradcam_path(out_dir: Path, image: str, taken: set[Path]) -> Path:
    """DIR/<stem>.gradcam.jpg, numbered when two images share a stem."""
    stem = Path(image).stem
    path = out_dir / f"{stem}.gradcam.jpg"
    n = 1
    while path in taken:
        path = out_dir / f"{stem}_{n}.gradcam.jpg"
        n += 1
    taken.add(path)
    return path


def write_gradcam(bundle: Bundle, emb: Embedding, nearest: int, path: Path) -> str:
    path.write_bytes(inspection_jpeg(bundle, emb, nearest))  # frame | Grad-CAM | patch anomaly map where there is one
    return str(path)


def check_gradcam(bundle: Bundle) -> None:
    """Refuse --gradcam up front when the bundle cannot give heat maps, not after the first image."""
    if bundle.feature_map_output is None:
        raise GradCamError(
            f"bundle {bundle.path}: the model has no feature_map output, so --gradcam cannot draw heat maps; "
            "re-export it with yugami-train"
        )
    head_weights(bundle)


def score_main(argv: Sequence[str] | None = None) -> int:
    args = build_score_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        bundle = load_bundle(args.bundle, num_threads=args.threads)
    except (BundleError, ImportError) as exc:
        print(f"yugami-score: {exc}", file=sys.stderr)
        return EXIT_BAD_BUNDLE
    out_dir = Path(args.gradcam) if args.gradcam else None
    if out_dir is not None:
        try:
            check_gradcam(bundle)
            out_dir.mkdir(parents=True, exist_ok=True)
        except (GradCamError, OSError) as exc:
            print(f"yugami-score: --gradcam: {exc}", file=sys.stderr)
            return EXIT_BAD_BUNDLE
    scorer = Scorer(bundle)
    failed = 0
    taken: set[Path] = set()
    for path in args.images:
        try:
            frame = load_image(path)
            result, emb = scorer.score(frame, name=path)
        except ImageError as exc:
            failed += 1
            print(json.dumps({"image": path, "error": str(exc)}), flush=True)
            continue
        line: dict[str, object] = {"image": path, **result.as_dict()}
        if out_dir is not None:
            line["gradcam"] = write_gradcam(bundle, emb, result.nearest, gradcam_path(out_dir, path, taken))
        print(json.dumps(line), flush=True)
    return EXIT_SOME_IMAGES_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(score_main())
