"""``yugami-score BUNDLE IMAGE...``: score image files with a bundle, one JSON line per image."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from agent.bundle import BundleError, load_bundle
from agent.preprocess import ImageError, load_image
from agent.scoring import Scorer

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
    return parser


def score_main(argv: Sequence[str] | None = None) -> int:
    args = build_score_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        bundle = load_bundle(args.bundle, num_threads=args.threads)
    except (BundleError, ImportError) as exc:
        print(f"yugami-score: {exc}", file=sys.stderr)
        return EXIT_BAD_BUNDLE
    scorer = Scorer(bundle)
    failed = 0
    for path in args.images:
        try:
            frame = load_image(path)
            result, _ = scorer.score(frame, name=path)
        except ImageError as exc:
            failed += 1
            print(json.dumps({"image": path, "error": str(exc)}), flush=True)
            continue
        print(json.dumps({"image": path, **result.as_dict()}), flush=True)
    return EXIT_SOME_IMAGES_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(score_main())
