"""Does an ensemble of bundles (e.g. the 2- and 3-class models) score better than each alone?

    python bench/ensemble.py runs/bench448/mvtec_screw/c2_l2softmax_s0 runs/bench448/mvtec_screw/c3_l2softmax_s0 \\
        --data ../shared/data/mvtec_screw

Each bundle scores test/* through the agent's Scorer (int8, as on the device). Scores of different
bundles live on different scales, so each is standardised with what its bundle learnt from normal
images alone: ``(score - threshold) / scale`` (the manifest's calibrated threshold and the held-out
normals' spread). The ensemble score is their mean. Prints the image AUROC of every bundle and of the
ensemble, and appends them to bench/results/ensemble.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import RESULTS, md_table


def standardised_scores(bundle_path: Path, data: Path) -> tuple[list[str], np.ndarray, float]:
    from agent.bundle import load_bundle
    from trainer.data import find_dataset
    from trainer.evaluate import embed_and_score

    bundle = load_bundle(bundle_path)
    scored = embed_and_score(bundle, find_dataset(data).test)
    return scored.names, (scored.scores - bundle.threshold) / bundle.score_scale, bundle.threshold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout folder with test/")
    args = parser.parse_args()
    from trainer.evaluate import auroc

    names, columns = None, []
    rows = []
    for b in args.bundles:
        n, z, _ = standardised_scores(b, args.data)
        if names is not None and n != names:
            raise SystemExit("the bundles scored different test sets")
        names = n
        columns.append(z)
    assert names is not None
    labels = np.array([0 if n.startswith("good/") else 1 for n in names])
    for b, z in zip(args.bundles, columns, strict=True):
        rows.append([f"`{b}`", auroc(labels, z)])
    rows.append([f"ensemble (mean of {len(columns)} standardised scores)", auroc(labels, np.mean(columns, axis=0))])
    table = md_table(["bundle", "image AUROC (int8)"], rows)
    print(table)
    out = RESULTS / "ensemble.md"
    head = "" if out.exists() else "# Ensembles of bundles: image AUROC through the agent's scorer\n\n"
    command = " ".join(["python bench/ensemble.py", *sys.argv[1:]])
    out.write_text((out.read_text() if out.exists() else head)
                   + f"{time.strftime('%F')}, `{command}`:\n\n{table}\n\n")


if __name__ == "__main__":
    main()
