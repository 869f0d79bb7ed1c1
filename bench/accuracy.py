"""Image AUROC of int8 bundles (through the agent's scorer) over datasets x classes x losses x seeds.

    python bench/accuracy.py                                   # the whole grid (long: hours on 2 cores)
    python bench/accuracy.py --datasets mvtec_screw --classes 2 --losses arcface --seeds 0 1 2
    python bench/accuracy.py --report                          # only rebuild the tables and box plots

Each cell runs ``yugami-train`` then ``yugami-eval --json`` (and, when the trainer saved the float model,
``--float-model`` for the float AUROC beside the int8 one). Results are kept per run in
bench/results/accuracy/<dataset>/<config>.json, so an interrupted grid resumes where it stopped; runs
already there are skipped. The zero-training baseline (``--epochs 0``) is run once per dataset.
Writes bench/results/accuracy.md and docs/img/accuracy_<dataset>.png (box plots over seeds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import RESULTS, ROOT, SHARED, md_table

OUT = RESULTS / "accuracy"  # --results NAME puts a separate study in bench/results/NAME
WEIGHTS = SHARED / "weights/mobilenet_v2_1.0_224_no_top.h5"
# The method's published MobileNetV2 figures on MVTec screw (class2 / class3), for reading ours against.
PUBLISHED_SCREW = {
    ("l2softmax", 2): 0.75,
    ("l2softmax", 3): 0.45,
    ("arcface", 2): 0.76,
    ("arcface", 3): 0.58,
    ("adacos", 3): 0.54,
}


def bin_path(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def run_cell(dataset: str, key: str, train_args: list[str], work: Path) -> dict[str, Any]:
    data = SHARED / "data" / dataset
    bundle, float_model = work / key, work / f"{key}.float.tflite"
    t0 = time.monotonic()
    train = [
        bin_path("yugami-train"),
        str(data),
        "--out",
        str(bundle),
        "--weights",
        str(WEIGHTS),
        "--quiet",
        "--save-float",
        str(float_model),
        *train_args,
    ]
    proc = subprocess.run(train, capture_output=True, text=True)
    train_s = time.monotonic() - t0
    if proc.returncode != 0:
        return {"status": "train_failed", "train_s": train_s, "error": proc.stderr[-2000:]}
    eval_json = work / f"{key}.eval.json"
    ev = [bin_path("yugami-eval"), str(bundle), str(data), "--json", str(eval_json)]
    if float_model.exists():
        ev += ["--float-model", str(float_model)]
    proc = subprocess.run(ev, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"status": "eval_failed", "train_s": train_s, "error": proc.stderr[-2000:]}
    result = json.loads(eval_json.read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {
        "status": "ok",
        "train_s": train_s,
        "image_auroc": result["image_auroc"],
        "float_image_auroc": (result.get("float") or {}).get("image_auroc"),
        "per_defect_auroc": result.get("per_defect_auroc"),
        "int8_vs_float": manifest.get("int8_vs_float"),
        "false_alarm_rate": result.get("false_alarm_rate"),
        "miss_rate": result.get("miss_rate"),
    }


def grid(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    cells = []
    for ds in args.datasets:
        cells.append((ds, "baseline_e0", ["--epochs", "0", *args.extra]))
        for classes in args.classes:
            for loss in args.losses:
                for seed in args.seeds:
                    key = f"c{classes}_{loss}_s{seed}"
                    cells.append(
                        (ds, key, ["--classes", str(classes), "--loss", loss, "--seed", str(seed), *args.extra])
                    )
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mvtec_screw", "magnetic_tile"])
    parser.add_argument("--classes", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--losses", nargs="+", default=["l2softmax", "arcface", "adacos"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more yugami-train flags (last)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench", help="bundles are written here")
    parser.add_argument("--keep-bundles", action="store_true")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from stored results")
    parser.add_argument(
        "--results", default="accuracy", help="study name: bench/results/NAME/ and NAME.md (default accuracy)"
    )
    args = parser.parse_args()
    global OUT
    OUT = RESULTS / args.results

    if not args.report:
        cells = grid(args)
        todo = [c for c in cells if not (OUT / c[0] / f"{c[1]}.json").exists()]
        print(f"{len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run", flush=True)
        for i, (ds, key, train_args) in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {ds} {key}: yugami-train {' '.join(train_args)}", flush=True)
            work = args.work / ds
            work.mkdir(parents=True, exist_ok=True)
            res = run_cell(ds, key, train_args, work)
            res["train_args"] = train_args
            (OUT / ds).mkdir(parents=True, exist_ok=True)
            (OUT / ds / f"{key}.json").write_text(json.dumps(res, indent=2))
            print(
                f"    -> {res['status']} AUROC {res.get('image_auroc')} float {res.get('float_image_auroc')} "
                f"({res['train_s'] / 60:.1f} min)",
                flush=True,
            )
            if not args.keep_bundles:
                shutil.rmtree(work / key, ignore_errors=True)
    report(args.results)


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def report(name: str = "accuracy") -> None:
    lines = [
        "# Accuracy: image AUROC of int8 bundles through the agent's scorer",
        "",
        f"Made by `python bench/accuracy.py --results {name}` (options select a part of the grid);"
        f" per-run JSON in `bench/results/{name}/`.",
        "",
    ]
    for ds_dir in sorted(p for p in OUT.glob("*") if p.is_dir()):
        runs = {p.stem: json.loads(p.read_text()) for p in sorted(ds_dir.glob("*.json"))}
        base = runs.pop("baseline_e0", None)
        groups: dict[str, list[dict[str, Any]]] = {}
        for key, r in runs.items():
            groups.setdefault(key.rsplit("_s", 1)[0], []).append(r)
        rows = []
        if base and base.get("status") == "ok":
            rows.append(
                [
                    "zero-training baseline (`--epochs 0`)",
                    1,
                    f"{base['image_auroc']:.3f}",
                    base["image_auroc"],
                    base.get("float_image_auroc") or "",
                    "",
                    f"{base['train_s'] / 60:.1f}",
                ]
            )
        for cfg, rs in sorted(groups.items()):
            ok = [r for r in rs if r.get("status") == "ok"]
            classes, loss = cfg.split("_", 1)
            published = PUBLISHED_SCREW.get((loss, int(classes[1:]))) if ds_dir.name == "mvtec_screw" else None
            floats = [r["float_image_auroc"] for r in ok if r.get("float_image_auroc") is not None]
            rows.append(
                [
                    f"{loss}, {classes[1:]} classes",
                    _seeds_cell(rs),
                    " / ".join(_seed_result(r) for r in rs),
                    _median([r["image_auroc"] for r in ok]) if ok else "failed",
                    _median(floats) if floats else "",
                    published if published is not None and ok else "",
                    f"{_median([r['train_s'] for r in ok]) / 60:.1f}" if ok else "",
                ]
            )
        lines += [
            f"## {ds_dir.name}",
            "",
            md_table(
                [
                    "config",
                    "seeds",
                    "AUROC int8 per seed",
                    "median AUROC int8",
                    "median AUROC float",
                    "published (MobileNetV2)",
                    "train min",
                ],
                rows,
            ),
            "",
        ]
        png = _boxplot(ds_dir.name, base, groups, name)
        if png:
            lines += [f"![box plots over seeds](../../docs/img/{png.name})", ""]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _refused(r: dict[str, Any]) -> bool:
    """The trainer's int8 gate turned the export down (cosine to float below the minimum)."""
    return r.get("status") == "train_failed" and "export refused" in (r.get("error") or "")


def _seed_result(r: dict[str, Any]) -> str:
    if r.get("status") == "ok":
        return f"{r['image_auroc']:.3f}"
    return "refused" if _refused(r) else r.get("status", "?")


def _seeds_cell(rs: list[dict[str, Any]]) -> str:
    """Seeds that gave a bundle; where some did not, how many and why (the median is of the rest)."""
    ok = sum(r.get("status") == "ok" for r in rs)
    if ok == len(rs):
        return str(ok)
    refused = sum(_refused(r) for r in rs)
    why = f", {refused} refused by the int8 gate" if refused else ""
    return f"{ok} of {len(rs)}{why}"


def _boxplot(
    dataset: str, base: dict[str, Any] | None, groups: dict[str, list[dict[str, Any]]], name: str = "accuracy"
) -> Path | None:
    data = {cfg: [r["image_auroc"] for r in rs if r.get("status") == "ok"] for cfg, rs in sorted(groups.items())}
    data = {k: v for k, v in data.items() if v}
    if not data:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(data) + 2, 4))
    ax.boxplot(list(data.values()), showmeans=True)
    for i, values in enumerate(data.values(), 1):  # with 3 seeds a box hides how few points it has
        ax.scatter([i] * len(values), values, s=14, color="black", zorder=3)
    ax.set_xticks(range(1, len(data) + 1), list(data), rotation=20)
    if base and base.get("status") == "ok":
        ax.axhline(base["image_auroc"], color="tab:red", ls="--", label="zero-training baseline")
        ax.legend(loc="lower right")
    ax.set_ylabel("image AUROC (int8 bundle)")
    ax.set_title(f"{dataset}: AUROC over seeds")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = ROOT / "docs" / "img" / f"{name}_{dataset}.png"  # pictures live in docs/, figures in results/
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    main()
