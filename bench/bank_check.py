"""Does the bank matter? Image AUROC of one TFLite model scored (a) against the bundle's bank
(the fit share of train/good, k-center) and (b) against every train/good embedding (no hold-out,
no coreset: the setting of issue 3's reference figures).

    .venv/bin/python bench/bank_check.py BUNDLE MODEL.tflite DATA_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from agent.bundle import load_bundle
from trainer.data import GOOD, find_dataset, load_prepared, to_model_input
from trainer.evaluate import auroc
from trainer.export import tflite_embeddings


def main(bundle_path: str, model_path: str, data_dir: str) -> dict[str, object]:
    bundle = load_bundle(bundle_path)
    spec = bundle.preprocessing
    ds = find_dataset(data_dir)
    model = Path(model_path).read_bytes()
    train = tflite_embeddings(model, to_model_input(load_prepared(ds.train, spec), spec))
    items = [(t, p) for t in sorted(ds.test) for p in ds.test[t]]
    test = tflite_embeddings(model, to_model_input(load_prepared([p for _, p in items], spec), spec))
    labels = np.array([t != GOOD for t, _ in items], int)
    result: dict[str, object] = {"model": model_path}
    for name, bank in (("bundle_bank", bundle.bank), ("all_train_good", train)):
        result[name] = auroc(labels, 1.0 - (test @ bank.T).max(axis=1))
    return result


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    print(json.dumps(main(*sys.argv[1:4])))
