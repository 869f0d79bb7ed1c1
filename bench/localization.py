"""Does the anomaly heat map point at the defect? Checked against pixel masks (magnetic tile).

    python bench/localization.py BUNDLE [--data ../shared/data/magnetic_tile] [--picture docs/img/...png]

Every test picture is scored by the bundle as on the camera box (int8 TFLite, agent.scoring.Scorer) and
its anomaly heat map made by agent.gradcam.anomaly_cam. The map is brought back to the picture's own
pixels (bilinear upsampling to the ROI, zero outside it) and compared with
``ground_truth/<type>/<name>_mask.png``:
- peak-in-mask: share of defective pictures whose heat-map maximum lies on a defect pixel, beside
  the chance level (the mean share of a picture that the mask covers); and the same with the mask
  grown by one feature-map cell (a 7x7 map cannot place a peak finer than that), with its chance level;
- pixel AUROC: heat value as a per-pixel defect score, pixels of every defective picture (and, as in
  MVTec's pixel AUROC, also with the good test pictures, whose masks are empty); a fixed random subset
  of pixels per picture keeps it small.
Writes a JSON summary and a PNG grid (picture + mask outline, heat map + peak) for a few pictures.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bundle import Bundle, load_bundle
from agent.gradcam import anomaly_cam, blend, cam_scale, grid_image, legend, upsample
from agent.preprocess import list_images, load_image, to_rgb
from agent.scoring import Scorer
from bench._common import RESULTS, SHARED, machine, md_table

GOOD = "good"
PIXELS_PER_IMAGE = 4000


@dataclass
class Case:
    kind: str
    path: Path
    mask: np.ndarray  # bool, picture resolution
    heat: np.ndarray  # float32, picture resolution (0 outside the ROI)
    cam: np.ndarray  # feature-map resolution
    rgb: np.ndarray  # prepared picture the model saw
    score: float
    peak: tuple[int, int]  # (row, col) in picture pixels
    near: np.ndarray  # bool: the mask grown by one feature-map cell

    @property
    def hit(self) -> bool:
        return bool(self.heat.max() > 0 and self.mask[self.peak])

    @property
    def near_hit(self) -> bool:
        return bool(self.heat.max() > 0 and self.near[self.peak])


def mask_path(data: Path, kind: str, image: Path) -> Path:
    return data / "ground_truth" / kind / f"{image.stem}_mask.png"


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise SystemExit(f"{path}: missing or unreadable mask")
    if m.shape != shape:
        m = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return m > 127


def heat_in_picture(cam: np.ndarray, bundle: Bundle, shape: tuple[int, int]) -> np.ndarray:
    """The cam over the whole picture: upsampled onto the ROI (the whole picture without one), 0 elsewhere."""
    roi = bundle.preprocessing.roi
    if roi is None:
        return upsample(cam, shape)
    x, y, w, h = roi
    heat = np.zeros(shape, np.float32)
    heat[y : y + h, x : x + w] = upsample(cam, (h, w))
    return heat


def run_case(scorer: Scorer, bundle: Bundle, data: Path, kind: str, path: Path) -> Case:
    frame = load_image(path)
    result, emb = scorer.score(frame, name=str(path))
    cam = anomaly_cam(bundle, emb, result.nearest)
    shape = frame.shape[:2]
    heat = heat_in_picture(cam, bundle, shape)
    mask = read_mask(mask_path(data, kind, path), shape) if kind != GOOD else np.zeros(shape, bool)
    peak = np.unravel_index(int(np.argmax(heat)), shape)
    near = grow(mask, cell_pixels(bundle, cam.shape, shape))
    return Case(kind, path, mask, heat, cam, emb.rgb, result.score, (int(peak[0]), int(peak[1])), near)


def cell_pixels(bundle: Bundle, cam_shape: tuple[int, ...], shape: tuple[int, int]) -> int:
    """How many picture pixels one feature-map cell spans (the larger side)."""
    roi = bundle.preprocessing.roi
    h, w = (roi[3], roi[2]) if roi is not None else shape
    return max(1, round(max(h / cam_shape[0], w / cam_shape[1])))


def grow(mask: np.ndarray, radius: int) -> np.ndarray:
    if not mask.any():
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def sample_pixels(case: Case, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    heat, mask = case.heat.ravel(), case.mask.ravel()
    if heat.size > PIXELS_PER_IMAGE:
        idx = rng.choice(heat.size, PIXELS_PER_IMAGE, replace=False)
        heat, mask = heat[idx], mask[idx]
    return heat, mask


def pixel_auroc(cases: list[Case], seed: int = 0) -> float:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    parts = [sample_pixels(c, rng) for c in cases]
    heat = np.concatenate([p[0] for p in parts])
    mask = np.concatenate([p[1] for p in parts])
    return float(roc_auc_score(mask, heat))


def summarise(cases: list[Case]) -> dict[str, Any]:
    defective = [c for c in cases if c.kind != GOOD]
    per_type = {}
    for kind in sorted({c.kind for c in defective}):
        sel = [c for c in defective if c.kind == kind]
        per_type[kind] = {
            "images": len(sel),
            "peak_in_mask": float(np.mean([c.hit for c in sel])),
            "chance": float(np.mean([c.mask.mean() for c in sel])),
            "peak_near_mask": float(np.mean([c.near_hit for c in sel])),
            "near_chance": float(np.mean([c.near.mean() for c in sel])),
            "pixel_auroc": pixel_auroc(sel),
        }
    return {
        "defective_images": len(defective),
        "good_images": len(cases) - len(defective),
        "peak_in_mask": float(np.mean([c.hit for c in defective])),
        "peak_chance": float(np.mean([c.mask.mean() for c in defective])),
        "peak_near_mask": float(np.mean([c.near_hit for c in defective])),
        "near_chance": float(np.mean([c.near.mean() for c in defective])),
        "pixel_auroc_defective": pixel_auroc(defective),
        "pixel_auroc_with_good": pixel_auroc(cases) if len(cases) > len(defective) else None,
        "per_type": per_type,
    }


def _outline(picture: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = picture.copy()
    cv2.drawContours(out, contours, -1, colour, 1)
    return out


def case_tiles(case: Case, bundle: Bundle) -> tuple[list[np.ndarray], list[str]]:
    """Picture with the mask outline, and the heat overlay with the outline and the peak marked."""
    picture = to_rgb(load_image(case.path))
    # Drawn at picture resolution with the bundle's fixed colour scale, as the device's overlay.
    heat = blend(picture, case.heat / np.float32(cam_scale(bundle)))
    heat = _outline(heat, case.mask, (255, 255, 255))
    cv2.drawMarker(heat, (case.peak[1], case.peak[0]), (255, 0, 255), cv2.MARKER_CROSS, 14, 2)
    mark = "in" if case.hit else "out"
    return [_outline(picture, case.mask, (0, 255, 0)), heat], [
        f"{case.kind} {case.score:.3f}",
        f"peak {mark}",
    ]


def write_picture(cases: list[Case], bundle: Bundle, out: Path, per_type: int = 2) -> Path:
    chosen: list[Case] = []
    for kind in sorted({c.kind for c in cases}):
        sel = [c for c in cases if c.kind == kind]
        chosen += [sel[i] for i in np.linspace(0, len(sel) - 1, min(per_type, len(sel))).round().astype(int)]
    tiles, labels = [], []
    for case in chosen:
        t, lab = case_tiles(case, bundle)
        tiles += t
        labels += lab
    grid = grid_image(tiles, labels, columns=6, tile_size=180)
    # One colour bar for the whole grid: every heat tile uses the same bundle scale.
    bar = legend(grid.shape[1], cam_scale(bundle), bundle.threshold)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(np.vstack([grid, bar]), cv2.COLOR_RGB2BGR))
    return out


def collect(bundle: Bundle, data: Path, include_good: bool, limit: int | None) -> list[Case]:
    scorer = Scorer(bundle)
    test = data / "test"
    kinds = sorted(p.name for p in test.iterdir() if p.is_dir() and (include_good or p.name != GOOD))
    cases = []
    for kind in kinds:
        paths = list_images(test / kind)[:limit]
        cases += [run_case(scorer, bundle, data, kind, p) for p in paths]
    return cases


def report(summary: dict[str, Any], bundle_name: str) -> str:
    keys = ["peak_in_mask", "peak_chance", "peak_near_mask", "near_chance", "pixel_auroc_defective"]
    rows = [["all defective", summary["defective_images"], *(summary[k] for k in keys)]]
    for kind, s in summary["per_type"].items():
        rows.append(
            [kind, s["images"], s["peak_in_mask"], s["chance"], s["peak_near_mask"], s["near_chance"], s["pixel_auroc"]]
        )
    headers = ["defect type", "images", "peak in mask", "chance", "peak <= 1 cell from mask", "chance", "pixel AUROC"]
    table = md_table(headers, rows)
    extra = summary["pixel_auroc_with_good"]
    tail = f"\n\npixel AUROC with the {summary['good_images']} good test pictures too: {extra:.3f}\n" if extra else "\n"
    return f"Localisation of {bundle_name}\n\n{table}{tail}"


def compare_maps(cases: list[Case], other: Bundle) -> dict[str, float]:
    """Pearson r between this run's heat maps and ``other``'s (its own nearest), per picture."""
    scorer = Scorer(other)
    rs = []
    for case in cases:
        result, emb = scorer.score(load_image(case.path), name=str(case.path))
        cam = anomaly_cam(other, emb, result.nearest)
        if cam.shape != case.cam.shape or case.cam.std() == 0 or cam.std() == 0:
            continue
        rs.append(float(np.corrcoef(case.cam.ravel(), cam.ravel())[0, 1]))
    a = np.asarray(rs)
    return {
        "images": int(a.size),
        "median_r": float(np.median(a)),
        "mean_r": float(a.mean()),
        "p10_r": float(np.quantile(a, 0.1)),
        "share_above_0.9": float(np.mean(a > 0.9)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle folder trained on the data set's train/good")
    p.add_argument("--data", type=Path, default=SHARED / "data" / "magnetic_tile", help="MVTec-layout data with masks")
    p.add_argument("--picture", type=Path, default=Path("docs/img/gradcam_magnetic_tile.png"), help="PNG grid")
    p.add_argument("--json", type=Path, default=RESULTS / "localization.json", help="summary JSON")
    p.add_argument("--no-good", action="store_true", help="skip the good test pictures (no pixel AUROC with them)")
    p.add_argument("--limit", type=int, default=None, help="at most this many pictures per test folder")
    p.add_argument("--threads", type=int, default=None, help="TFLite threads")
    p.add_argument(
        "--compare",
        default=None,
        metavar="BUNDLE",
        help="also report the Pearson r of each heat map with this bundle's (e.g. the float export)",
    )
    args = p.parse_args(argv)
    bundle = load_bundle(args.bundle, num_threads=args.threads)
    cases = collect(bundle, args.data, not args.no_good, args.limit)
    summary = summarise(cases)
    write_picture([c for c in cases if c.kind != GOOD], bundle, args.picture)
    result = {
        "bundle": args.bundle,
        "model": bundle.name,
        "data": str(args.data),
        **summary,
        "picture": str(args.picture),
        "machine": machine(),
    }
    if args.compare:
        result["compare"] = {"bundle": args.compare, **compare_maps(cases, load_bundle(args.compare))}
        print("heat-map agreement with", args.compare, result["compare"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(report(summary, bundle.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
