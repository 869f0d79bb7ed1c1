"""Grad-CAM cost on the device path: plain scoring against scoring + heat map (+ JPEG overlay).

    python bench/gradcam_speed.py BUNDLE [--frames 200] [--threads 2] [--images DIR]

Frames are real pictures brought to 640x480 camera frames (MVTec screw by default, or --images DIR).
Every frame goes through the three variants in turn, in one process, so they share caches and load:
- score: ``Scorer.score`` (preprocess + int8 invoke + cosine to the bank + verdict);
- score + cam: plus ``anomaly_cam`` (closed-form Grad-CAM at feature-map resolution);
- score + cam + overlay: plus ``overlay_jpeg`` (upsample, colour, blend, legend, JPEG encode).
Prints p50/p99 ms and the ratios to plain scoring; writes bench/results/gradcam_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bundle import Bundle, load_bundle
from agent.gradcam import anomaly_cam, overlay_jpeg
from agent.preprocess import list_images, load_image
from agent.scoring import Scorer
from bench._common import RESULTS, machine, md_table, percentiles, real_frames

FRAME_SIZE = (640, 480)


def frames_from(folder: Path | None, n: int) -> list[np.ndarray]:
    if folder is None:
        return real_frames(n, FRAME_SIZE)
    paths = list_images(folder)[:n]
    if not paths:
        raise SystemExit(f"no images in {folder}")
    frames = [cv2.resize(load_image(p), FRAME_SIZE, interpolation=cv2.INTER_AREA) for p in paths]
    return [cv2.cvtColor(f, cv2.COLOR_GRAY2BGR) if f.ndim == 2 else f[..., :3] for f in frames]


def measure(bundle_path: str, frames: list[np.ndarray], threads: int | None) -> dict[str, Any]:
    bundle = load_bundle(bundle_path, num_threads=threads)
    scorer = Scorer(bundle)

    def plain(f: np.ndarray) -> None:
        scorer.score(f)

    def with_cam(f: np.ndarray) -> None:
        result, emb = scorer.score(f)
        anomaly_cam(bundle, emb, result.nearest)

    def with_overlay(f: np.ndarray) -> None:
        result, emb = scorer.score(f)
        overlay_jpeg(emb.rgb, anomaly_cam(bundle, emb, result.nearest), bundle)

    variants: dict[str, Callable[[np.ndarray], None]] = {
        "score": plain,
        "score+cam": with_cam,
        "score+cam+overlay": with_overlay,
    }
    for f in frames[:10]:  # warm-up: allocations, XNNPACK packing, caches
        for fn in variants.values():
            fn(f)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for f in frames:
        for name, fn in variants.items():  # interleaved, so drift in machine load hits all three alike
            t0 = time.perf_counter()
            fn(f)
            times[name].append((time.perf_counter() - t0) * 1000.0)
    stats = {name: percentiles(ms) for name, ms in times.items()}
    stats.update(addon_costs(bundle, scorer, frames))
    base = stats["score"]["p50_ms"]
    fmap = bundle.feature_map_output.shape if bundle.feature_map_output else None
    return {
        "bundle": bundle_path,
        "model": bundle.name,
        "input_size": list(bundle.preprocessing.input_size),
        "feature_map": list(fmap) if fmap else None,
        "frame_size": list(FRAME_SIZE),
        "threads": threads,
        "runtime": bundle.model.runtime,
        "stats": stats,
        "ratio_p50": {name: s["p50_ms"] / base for name, s in stats.items()},
        "machine": machine(),
    }


def addon_costs(bundle: Bundle, scorer: Scorer, frames: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """The Grad-CAM steps alone on already-scored frames: less exposed to a busy machine than the
    difference of two end-to-end timings."""
    scored = [scorer.score(f) for f in frames]
    cam_ms, overlay_ms = [], []
    for result, emb in scored:
        t0 = time.perf_counter()
        cam = anomaly_cam(bundle, emb, result.nearest)
        t1 = time.perf_counter()
        overlay_jpeg(emb.rgb, cam, bundle)
        t2 = time.perf_counter()
        cam_ms.append((t1 - t0) * 1000.0)
        overlay_ms.append((t2 - t1) * 1000.0)
    return {"cam alone": percentiles(cam_ms), "overlay alone": percentiles(overlay_ms)}


def report(r: dict[str, Any]) -> str:
    rows = [[name, s["p50_ms"], s["p99_ms"], s["mean_ms"], r["ratio_p50"][name]] for name, s in r["stats"].items()]
    head = (
        f"Grad-CAM cost, bundle {r['model']} ({r['input_size'][0]}x{r['input_size'][1]} input, feature map "
        f"{r['feature_map']}), {r['stats']['score']['n']} frames {r['frame_size'][0]}x{r['frame_size'][1]}, "
        f"threads {r['threads']}, {r['runtime']}, {r['machine']['cpu']} ({r['machine']['cores']} cores)\n\n"
    )
    return head + md_table(["variant", "p50 ms", "p99 ms", "mean ms", "x score (p50)"], rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder")
    p.add_argument("--frames", type=int, default=200, help="frames per variant (default 200)")
    p.add_argument("--threads", type=int, default=None, help="TFLite threads (default: the runtime's)")
    p.add_argument("--images", type=Path, default=None, help="folder of pictures (default: MVTec screw test)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where gradcam_speed.{json,md} go")
    args = p.parse_args(argv)
    result = measure(args.bundle, frames_from(args.images, args.frames), args.threads)
    text = report(result)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gradcam_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gradcam_speed.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
