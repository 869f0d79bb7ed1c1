"""Which ImageNet MobileNetV2 features to score with, before any training: pooling x layer x input size.

    python bench/pooling_study.py                                  # screw 224..512, tile 224..448 (~10 min)
    python bench/pooling_study.py --datasets mvtec_screw --sizes 448 --patch

For every data set and input size the float Keras backbone (``../shared/weights``) embeds train/good
and test/*, once; each candidate embedding is then scored like the agent scores (1 - max cosine against
the train/good embeddings, no hold-out, no coreset, float, no int8) and reported as image AUROC:

* global average pooling (GAP, what the seed method used) and generalised mean pooling (GeM,
  ``(mean_ij x^p)^(1/p)``) with p in 2..8, and global max pooling, of several layers;
* with ``--patch``: PatchCore-style patch scoring (each cell's 3x3-averaged feature against a bank of
  40 000 random train cells, the image's score = its worst cell), the issue's "bank of patch-level
  features"; only on maps of at most 14x14 cells ("-" otherwise), the search is too slow here beyond.

Prints a table and writes bench/results/pooling_study.md. The trainer's default (GeM p=3 of ``out_relu``
at 448 px) was chosen from this table; the int8 bundles' figures are in bench/results/accuracy.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import RESULTS, SHARED, md_table

WEIGHTS = SHARED / "weights/mobilenet_v2_1.0_224_no_top.h5"
LAYERS = ("block_13_expand_relu", "block_16_project_BN", "out_relu")
POOLS: tuple[float | str, ...] = ("avg", 2.0, 3.0, 4.0, 8.0, "max")
PATCH_BANK = 40_000  # train cells kept (random) for patch scoring: exhaustive search over all is hours here
PATCH_MAX_CELLS = 196  # patch scoring only on maps of at most 14x14 cells, for the same reason


def extract(dataset: str, size: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """(train features, test features, test labels 0 good / 1 defective) per layer, float16."""
    import keras

    from agent.preprocess import Preprocessing
    from trainer.data import GOOD, find_dataset, load_prepared, to_model_input

    ds = find_dataset(SHARED / "data" / dataset)
    spec = Preprocessing(input_size=(size, size))
    inp = keras.Input((size, size, 3))
    backbone = keras.applications.MobileNetV2(input_tensor=inp, include_top=False, weights=str(WEIGHTS))
    model = keras.Model(inp, [backbone.get_layer(n).output for n in LAYERS])
    test = [(p, 0 if t == GOOD else 1) for t, ps in ds.test.items() for p in ps]

    def run(paths: list[Path]) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {n: [] for n in LAYERS}
        for i in range(0, len(paths), 32):
            outputs = model.predict(to_model_input(load_prepared(paths[i : i + 32], spec), spec), verbose=0)
            for name, y in zip(LAYERS, outputs, strict=True):
                out[name].append(y.astype(np.float16))
        return {n: np.concatenate(v) for n, v in out.items()}

    return run(ds.train), run([p for p, _ in test]), np.array([y for _, y in test])


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def pool(fmaps: np.ndarray, how: float | str) -> np.ndarray:
    x = fmaps.astype(np.float32)
    if how == "avg":
        return x.mean(axis=(1, 2))
    x = np.maximum(x, 1e-6)  # as agent.scoring.gem_pool
    if how == "max":
        return x.max(axis=(1, 2))
    return (x ** float(how)).mean(axis=(1, 2)) ** (1.0 / float(how))


def knn_scores(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    return 1.0 - (_unit(test) @ _unit(train).T).max(axis=1)


def patch_scores(train: np.ndarray, test: np.ndarray, seed: int = 0) -> np.ndarray:
    """Worst cell per test image: 1 - max cosine of its 3x3-averaged feature to a bank of train cells."""

    def smooth(x: np.ndarray) -> np.ndarray:
        x = np.pad(x.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        h, w = x.shape[1] - 2, x.shape[2] - 2
        return sum(x[:, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0

    tr, te = smooth(train), smooth(test)
    cells = _unit(tr.reshape(-1, tr.shape[-1]))
    bank = cells[np.random.default_rng(seed).choice(len(cells), min(len(cells), PATCH_BANK), replace=False)]
    per_image = _unit(te.reshape(len(te), -1, te.shape[-1]))
    return np.array([(1.0 - (cells_i @ bank.T).max(axis=1)).max() for cells_i in per_image])


def study(dataset: str, size: int, patch: bool) -> list[list[object]]:
    from sklearn.metrics import roc_auc_score

    t0 = time.monotonic()
    train, test, labels = extract(dataset, size)
    rows = []
    for layer in LAYERS:
        row: list[object] = [dataset, size, f"`{layer}` {train[layer].shape[1]}x{train[layer].shape[2]}"]
        for how in POOLS:
            scores = knn_scores(pool(train[layer], how), pool(test[layer], how))
            row.append(round(float(roc_auc_score(labels, scores)), 3))
        if patch and train[layer].shape[1] * train[layer].shape[2] > PATCH_MAX_CELLS:
            row.append("-")
        elif patch:
            row.append(round(float(roc_auc_score(labels, patch_scores(train[layer], test[layer]))), 3))
        rows.append(row)
        print(" | ".join(str(v) for v in row), flush=True)
    print(f"  ({dataset} {size} px: {time.monotonic() - t0:.0f} s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mvtec_screw", "magnetic_tile"])
    parser.add_argument("--sizes", nargs="+", type=int, default=None, help="default: screw 224 320 384 448 512, "
                        "tile 224 320 448")
    parser.add_argument("--patch", action="store_true", help="also PatchCore-style patch scoring (slow)")
    parser.add_argument("--out", type=Path, default=RESULTS / "pooling_study.md")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    default_sizes = {"mvtec_screw": [224, 320, 384, 448, 512], "magnetic_tile": [224, 320, 448]}
    header = ["data", "px", "layer", *["GAP" if h == "avg" else "GMP" if h == "max" else f"GeM p={h:g}" for h in POOLS]]
    if args.patch:
        header.append("patch kNN")
    rows = []
    for ds in args.datasets:
        for size in args.sizes or default_sizes.get(ds, [224, 448]):
            rows += study(ds, size, args.patch)
    command = " ".join(["python bench/pooling_study.py", *sys.argv[1:]])
    text = "\n".join([
        "# Pooling study: image AUROC of ImageNet MobileNetV2 features, no training, float, k-NN on train/good",
        "",
        f"Made by `{command}` (see the script's docstring).",
        "",
        md_table(header, rows),
        "",
    ])
    args.out.write_text(text)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
