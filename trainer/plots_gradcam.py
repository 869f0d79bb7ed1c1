"""A grid of test pictures with their anomaly heat maps, for ``yugami-eval --plots``.

Heat maps are made exactly as on the camera box (int8 TFLite via agent.scoring.Scorer, closed-form
Grad-CAM from agent.gradcam), and coloured on the bundle's fixed scale, so tiles compare directly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from agent.bundle import Bundle
from agent.gradcam import anomaly_cam, grid_image, overlay_image, patch_overlay_image
from agent.preprocess import load_image
from agent.scoring import Scorer

logger = logging.getLogger(__name__)


def pick_examples(test: dict[str, list[Path]], per_type: int) -> list[tuple[str, Path]]:
    """``per_type`` pictures of each test folder, spread evenly over its sorted file list."""
    picked = []
    for kind in sorted(test):
        paths = sorted(test[kind])
        if not paths:
            continue
        idx = np.unique(np.linspace(0, len(paths) - 1, min(per_type, len(paths))).round().astype(int))
        picked += [(kind, paths[i]) for i in idx]
    return picked


def gradcam_tiles(
    bundle: Bundle, examples: list[tuple[str, Path]], patch_map: bool = False
) -> tuple[list[np.ndarray], list[str]]:
    """One overlay (with the colour bar) and one caption per example: Grad-CAM, or with
    ``patch_map`` the patch anomaly map."""
    scorer = Scorer(bundle)
    tiles, labels = [], []
    for kind, path in examples:
        result, emb = scorer.score(load_image(path), name=str(path))
        if patch_map:
            tiles.append(patch_overlay_image(bundle, emb))
        else:
            tiles.append(overlay_image(emb.rgb, anomaly_cam(bundle, emb, result.nearest), bundle))
        flag = "!" if result.verdict == "anomaly" else ""
        labels.append(f"{kind} {result.score:.3f}{flag}")
    return tiles, labels


def write_gradcam_grid(
    bundle: Bundle,
    test: dict[str, list[Path]],
    out_path: Path,
    per_type: int = 3,
    columns: int = 6,
    tile_size: int = 200,
    patch_map: bool = False,
) -> Path:
    """Write ``out_path`` (PNG or JPEG by suffix): test pictures of every type with their heat maps.

    Captions read "<type> <score>" with "!" when the bundle's verdict is anomaly.
    """
    examples = pick_examples(test, per_type)
    if not examples:
        raise ValueError("no test pictures to draw heat maps for")
    tiles, labels = gradcam_tiles(bundle, examples, patch_map)
    grid = grid_image(tiles, labels, columns=columns, tile_size=tile_size)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out_path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {out_path}; check the folder and the suffix (.png or .jpg)")
    logger.info("wrote Grad-CAM grid of %d pictures to %s", len(tiles), out_path)
    return out_path
