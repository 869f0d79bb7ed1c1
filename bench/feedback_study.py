"""Operator feedback on magnetic tile: K false alarms fed back as "good" to the on-box bank extension,
against retraining with them (issue 15, "Must show").

The bank extension as the agent applies it (:mod:`agent.feedback`): a frame labelled "good" adds its
GeM embedding to the GeM bank and those of its 28x28 patch cells that lie farther than the bundle's
``patch.map.floor`` from the bundle's own patch bank to a second, small patch bank; a frame's GeM
distance and each cell's distance are the minimum over both banks; the patch score (mean of the top_k
worst cells), the fusion statistics and the threshold stay as shipped. The study runs that arithmetic
with the agent's own functions (:func:`agent.scoring.cosine_scores`, :func:`agent.patches.nearest_distances`
on :class:`agent.patches.PatchBank`, :func:`agent.patches.worst_cells`, :meth:`agent.patches.Fusion.fuse`)
on the shipped bundle's int8 features (cached by ``bench/decisions.py``:
``runs/final/magnetic_tile/features[_sSEED].npz``), and checks it once against the agent's own path on
the pictures (``Scorer``, ``agent.feedback.extension_features``, ``BankExtension``, ``Scorer.extend``).

The measurement:

* At the shipped threshold tile has about 2 false alarms in 252 test/good pictures, so K = 20 false
  alarms do not exist there. The study runs at the operating point a line sets (``cmd/set``) when it
  wants to catch more defects: the highest threshold that still flags a target recall (0.95, and 0.90)
  of the 392 test defects, the rule of ``yugami-train --threshold-rule recall``. The shipped threshold's
  figures are reported too.
* test/good is split at random (seeded, ``--draws`` times) into a feedback pool and a held-out half.
  K of the pool's false alarms at that threshold (drawn at random; all of them when fewer than K exist)
  are fed back. Figures on the held-out normals and all defects, before and after: false alarms, defects
  caught; and how many fed-back frames still alarm.
* Retraining: ``yugami-train`` with default settings (fused, epochs 0, the shared ImageNet weights) on
  train/good plus the K fed-back frames (a folder of symlinks under ``--retrain-work``), the same seed;
  its int8 features of the test pictures read as the agent reads them; evaluated on the same held-out
  normals and defects (a) at its own shipped threshold and (b) at the same recall rule recomputed on its
  own defect scores. Only the first ``--retrain-draws`` draws of the first seed (each retraining takes
  minutes).

    python bench/feedback_study.py                                   # the figures in bench/results
    python bench/feedback_study.py --seeds 0 --draws 3 --retrain-draws 0   # quick, extension only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import RESULTS, SHARED, machine

logger = logging.getLogger("bench.feedback_study")

DATASET = "magnetic_tile"
WEIGHTS = SHARED / "weights/mobilenet_v2_1.0_224_no_top.h5"
MAX_EXTENSION = 32  # feedback.max_extension's default: K up to 32 fits the box's bound
FEATURE_CHUNK = 64  # pictures per tflite_features call: 64 float 448 px inputs are 150 MB
DRAW_SEED = 0  # the random splits and picks; the figures in bench/results were made with 0


@dataclass(frozen=True)
class Components:
    """A bundle's two distances for each test picture, before fusion."""

    gem: np.ndarray  # (N,) 1 - max cosine to the GeM bank
    cells: np.ndarray  # (N, cells) each cell's distance to its nearest patch-bank row


def components(bundle: Any, emb: np.ndarray, patch: np.ndarray) -> Components:
    from agent.patches import nearest_distances
    from agent.scoring import cosine_scores

    gem = cosine_scores(emb, bundle.bank)[0]
    cells = np.stack([nearest_distances(f.astype(np.float32), bundle.patch_bank) for f in patch])
    return Components(gem, cells)


def fused(bundle: Any, c: Components) -> np.ndarray:
    """The bundle's score from its components: what ``agent.scoring.Scorer.score_frame`` computes."""
    from agent.patches import worst_cells

    return np.asarray(bundle.fusion.fuse(c.gem, worst_cells(c.cells, bundle.patch.top_k)), np.float64)


def recall_threshold(defect_scores: np.ndarray, recall: float) -> float:
    """The highest threshold that still flags ``recall`` of the defects (alarm when score > threshold),
    halfway to the next lower defect score: :func:`trainer.calibrate.threshold_from_defects`'s recall rule."""
    d = np.sort(np.asarray(defect_scores, np.float64))
    k = int(np.ceil(recall * d.size))
    cut = d[d.size - k]
    below = d[d < cut]
    return float((cut + below.max()) / 2.0) if below.size else float(np.nextafter(cut, -np.inf))


class Extension:
    """The bank extension of one bundle over the test pictures, as :mod:`agent.feedback` builds it: a
    fed-back frame adds its GeM row and the patch cells farther than the bundle's ``patch.map.floor``
    from the bundle's own patch bank (:func:`agent.feedback.extension_features`), searched beside the
    bundle's banks (:class:`agent.scoring.ExtraBanks`, ``Scorer.extend``).

    The distance of every picture's cells to one candidate frame's kept cells is computed once and
    kept: the min over a K-frame extension bank is the min over its frames, so a draw's extension is
    K elementwise minima (:meth:`check_on_images` compares with the agent's own path)."""

    def __init__(self, bundle: Any, feats: dict[str, np.ndarray], base: Components) -> None:
        self.bundle, self.feats, self.base = bundle, feats, base
        self._cells: dict[int, np.ndarray] = {}

    def kept(self, j: int) -> np.ndarray:
        """Test picture ``j``'s patch rows that the extension would hold."""
        floor = self.bundle.map_floor
        cells = self.feats["test_patch"][j].astype(np.float32)
        return cells[self.base.cells[j] > floor] if floor > 0 else cells

    def frame_cells(self, j: int) -> np.ndarray:
        """(N, cells): each test picture's cells against picture ``j``'s kept cells as a patch bank."""
        from agent.patches import PatchBank, nearest_distances

        if j not in self._cells:
            rows = self.kept(j)
            if rows.shape[0] == 0:
                self._cells[j] = np.full(self.base.cells.shape, np.inf, np.float32)
            else:
                bank = PatchBank.of(rows)
                self._cells[j] = np.stack(
                    [nearest_distances(f.astype(np.float32), bank) for f in self.feats["test_patch"]]
                )
        return self._cells[j]

    def scores(self, fed: np.ndarray) -> np.ndarray:
        """Every test picture's score with the frames ``fed`` added to the banks."""
        from agent.scoring import cosine_scores, l2_normalize

        if fed.size == 0:
            return fused(self.bundle, self.base)
        emb = self.feats["test_emb"]
        gem = np.minimum(self.base.gem, cosine_scores(emb, l2_normalize(emb[fed]))[0])
        cells = self.base.cells.copy()
        for j in fed:
            np.minimum(cells, self.frame_cells(int(j)), out=cells)
        return fused(self.bundle, Components(gem, cells))

    def check_on_images(self, bundle_dir: Path, fed: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
        """The agent's own path on the pictures: a Scorer, ``agent.feedback.extension_features`` of each
        fed-back frame into a ``BankExtension``, ``Scorer.extend(extension.banks())``, then
        ``Scorer.score`` of the pictures ``rows``; the largest difference from :meth:`scores`."""
        from agent.bundle import load_bundle
        from agent.feedback import BankExtension, ExtensionFrame, extension_features
        from agent.preprocess import load_image
        from agent.scoring import Scorer

        names = self.feats["test_names"]

        def picture(i: int) -> np.ndarray:
            return load_image(SHARED / "data" / DATASET / "test" / str(names[i]))

        scorer = Scorer(load_bundle(bundle_dir))
        ext = BankExtension(Path("unused-extension.npz"), max_frames=MAX_EXTENSION)
        for j in fed:
            gem, cells = extension_features(scorer, picture(int(j)), str(names[j]))
            ext.add(ExtensionFrame(str(names[j]), 0.0, gem, cells), scorer.bundle.manifest_sha256)
        scorer.extend(ext.banks())
        got = np.array([scorer.score(picture(int(i)), str(names[i]))[0].score for i in rows])
        return {
            "pictures": int(rows.size),
            "fed": int(fed.size),
            "max_abs_score_diff": float(np.abs(got - self.scores(fed)[rows]).max()),
            "patch_rows_per_fed_frame": [int(self.kept(int(j)).shape[0]) for j in fed],
        }


def split(n_good: int, draw: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool, held-out) positions among the test goods: a random half each, the same halves for every
    seed's bundle (so bundles are compared on the same pictures)."""
    perm = np.random.default_rng([DRAW_SEED, draw, 15]).permutation(n_good)
    return np.sort(perm[: n_good // 2]), np.sort(perm[n_good // 2 :])


def fed_frames(pool_alarms: np.ndarray, k: int, draw: int) -> np.ndarray:
    """K of the pool's false alarms, at random; the K = 5 frames are among the K = 20 ones (an operator
    who sent 20 sent the first 5 too)."""
    order = np.random.default_rng([DRAW_SEED, draw, 16]).permutation(pool_alarms.size)
    return pool_alarms[order[:k]]


def figures(scores: np.ndarray, held: np.ndarray, defects: np.ndarray, fed: np.ndarray, t: float) -> dict[str, int]:
    return {
        "held_false_alarms": int((scores[held] > t).sum()),
        "defects_caught": int((scores[defects] > t).sum()),
        "fed_alarming": int((scores[fed] > t).sum()),
    }


def shipped_scores(seed: int, work: Path) -> tuple[Any, dict[str, np.ndarray], Components]:
    """A seed's shipped bundle, its cached int8 test features and their components."""
    from agent.bundle import load_bundle
    from bench.decisions import features

    bundle = load_bundle(work / DATASET / ("bundle" if seed == 0 else f"bundle_s{seed}"))
    feats = features(DATASET, work, seed)
    return bundle, feats, components(bundle, feats["test_emb"], feats["test_patch"])


def extension_study(
    seed: int, work: Path, recalls: list[float], ks: list[int], draws: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    t0 = time.perf_counter()
    bundle, feats, base = shipped_scores(seed, work)
    ext = Extension(bundle, feats, base)
    scores = fused(bundle, base)
    goods = np.flatnonzero(feats["test_types"] == "good")
    defects = np.flatnonzero(feats["test_types"] != "good")
    recalls_of = {f"recall {r:.2f}": r for r in recalls}
    points = {"shipped": bundle.threshold, **{p: recall_threshold(scores[defects], r) for p, r in recalls_of.items()}}
    rows, draws_out = [], []
    for draw in range(draws):
        pool, held = (goods[i] for i in split(goods.size, draw))
        for point, t in points.items():
            alarms = pool[scores[pool] > t]
            for k in ks if point != "shipped" else [max(ks)]:
                fed = fed_frames(alarms, k, draw)
                before = figures(scores, held, defects, fed, t)
                after_scores = ext.scores(fed)
                # the threshold as shipped or set; and, for a recall point, the same rule re-applied to the
                # extended scores (what the retrained bundle gets), so the two compare at equal recall
                variants = [(point, t)]
                if point != "shipped":
                    variants.append((f"{point} re-placed", recall_threshold(after_scores[defects], recalls_of[point])))
                for name, t_after in variants:
                    after = figures(after_scores, held, defects, fed, t_after)
                    rows.append(
                        {
                            "seed": seed,
                            "draw": draw,
                            "point": name,
                            "threshold": t,
                            "threshold_after": t_after,
                            "k": k,
                            "fed": int(fed.size),
                            "pool_alarms": int(alarms.size),
                            "held": int(held.size),
                            "defects": int(defects.size),
                            **{f"{key}_before": v for key, v in before.items()},
                            **{f"{key}_after": v for key, v in after.items()},
                        }
                    )
                draws_out.append(
                    {"seed": seed, "draw": draw, "point": point, "k": k, "fed": feats["test_names"][fed].tolist()}
                )
        print(
            f"seed {seed} draw {draw}: {len(ext._cells)} fed-back candidates cached, {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    main = next(r for r in rows if r["draw"] == 0 and r["k"] == max(ks) and r["point"] in recalls_of)
    pool0, held0 = (goods[i] for i in split(goods.size, 0))
    fed0 = fed_frames(pool0[scores[pool0] > main["threshold"]], max(ks), 0)
    check_rows = np.r_[held0[:6], defects[::50], fed0[:3]]
    info = {
        "seed": seed,
        "thresholds": points,
        "test_good_alarms": {p: int((scores[goods] > t).sum()) for p, t in points.items()},
        "defect_recall": {p: float((scores[defects] > t).mean()) for p, t in points.items()},
        "check": ext.check_on_images(bundle.path, fed0, check_rows),
        "patch_search_ms": search_ms(bundle, feats, ext, fed0),
        "fed": draws_out,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return rows, info


def search_ms(bundle: Any, feats: dict[str, np.ndarray], ext: Extension, fed: np.ndarray) -> dict[str, float]:
    """A frame's patch search: the shipped bank alone, and it plus an extension of ``fed`` frames
    (median of 20, on a CPU the other benches share)."""
    from agent.patches import PatchBank, nearest_distances

    x = feats["test_patch"][0].astype(np.float32)
    extra = PatchBank.of(np.concatenate([ext.kept(int(j)) for j in fed]))

    def timed(banks: list[Any]) -> float:
        ms = []
        for _ in range(20):
            t0 = time.perf_counter()
            for b in banks:
                nearest_distances(x, b)
            ms.append((time.perf_counter() - t0) * 1000.0)
        return round(float(np.median(ms)), 1)

    return {
        "shipped_bank_rows": bundle.patch_bank.rows.shape[0],
        "shipped_bank_ms": timed([bundle.patch_bank]),
        "extension_frames": int(fed.size),
        "extension_rows": extra.rows.shape[0],
        "with_extension_ms": timed([bundle.patch_bank, extra]),
    }


# ---- retraining ----------------------------------------------------------------------------------


def retrain(folder: Path, fed_names: list[str], seed: int) -> tuple[Path, float]:
    """``yugami-train`` (defaults) on train/good plus the fed-back frames; cached in ``folder``."""
    from trainer import data

    out = folder / "bundle"
    took = folder / "train_s"
    if (out / "manifest.json").is_file() and took.is_file():
        return out, float(took.read_text())
    good = folder / "data" / "train" / "good"
    if good.parent.parent.exists():
        shutil.rmtree(good.parent.parent)
    good.mkdir(parents=True)
    for p in data.find_dataset(SHARED / "data" / DATASET).train:
        (good / p.name).symlink_to(p.resolve())
    for name in fed_names:  # "good/<file>": prefixed, a test file may share a name with a training one
        target = (SHARED / "data" / DATASET / "test" / name).resolve(strict=True)
        (good / f"feedback_{Path(name).name}").symlink_to(target)
    exe = shutil.which("yugami-train", path=str(Path(sys.executable).parent)) or "yugami-train"
    cmd = [exe, str(folder / "data"), "--out", str(out), "--seed", str(seed), "--weights", str(WEIGHTS), "--quiet"]
    print("  " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    seconds = time.perf_counter() - t0
    seen = json.loads((out / "manifest.json").read_text())["training"]["data"]["train_images"]
    if seen != len(list(good.iterdir())):
        raise SystemExit(f"{out}: the trainer read {seen} pictures, the folder holds {len(list(good.iterdir()))}")
    took.write_text(f"{seconds:.1f}\n")
    return out, seconds


def bundle_features(bundle: Any, names: np.ndarray, cache: Path) -> dict[str, np.ndarray]:
    """int8 features of the test pictures under a (retrained) bundle, read as the agent reads them."""
    from trainer import data
    from trainer.export import tflite_features

    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    model = (bundle.path / "embedder.tflite").read_bytes()
    spec = bundle.preprocessing
    paths = [SHARED / "data" / DATASET / "test" / n for n in names]
    emb, patch = [], []
    for i in range(0, len(paths), FEATURE_CHUNK):
        x = data.to_model_input(data.load_prepared(paths[i : i + FEATURE_CHUNK], spec), spec)
        e, p = tflite_features(model, x, spec=bundle.embedding)
        emb.append(e)
        patch.append(p)
    out = {"test_emb": np.concatenate(emb), "test_patch": np.concatenate(patch), "test_names": names}
    np.savez(cache, **out)
    return out


def retrain_study(
    seed: int, work: Path, retrain_work: Path, recall: float, ks: list[int], draws: int
) -> list[dict[str, Any]]:
    from agent.bundle import load_bundle

    shipped, feats, base = shipped_scores(seed, work)
    scores = fused(shipped, base)
    goods = np.flatnonzero(feats["test_types"] == "good")
    defects = np.flatnonzero(feats["test_types"] != "good")
    t_op = recall_threshold(scores[defects], recall)
    rows = []
    for draw in range(draws):
        pool, held = (goods[i] for i in split(goods.size, draw))
        alarms = pool[scores[pool] > t_op]
        for k in ks:
            fed = fed_frames(alarms, k, draw)
            folder = retrain_work / f"s{seed}_d{draw}_k{k}"
            folder.mkdir(parents=True, exist_ok=True)
            bundle_dir, seconds = retrain(folder, [str(n) for n in feats["test_names"][fed]], seed)
            new = load_bundle(bundle_dir)
            nf = bundle_features(new, feats["test_names"], folder / "features.npz")
            new_scores = fused(new, components(new, nf["test_emb"], nf["test_patch"]))
            common = {
                "seed": seed,
                "draw": draw,
                "k": k,
                "pool_alarms": int(alarms.size),
                "retrain_s": round(seconds, 1),
            }
            rows += compare((shipped, scores), (new, new_scores), recall, held, defects, fed, common)
            print(
                f"retrained seed {seed} draw {draw} K {k}: {seconds:.0f} s; " + "; ".join(_line(r) for r in rows[-2:]),
                flush=True,
            )
    return rows


def compare(
    before: tuple[Any, np.ndarray],
    after: tuple[Any, np.ndarray],
    recall: float,
    held: np.ndarray,
    defects: np.ndarray,
    fed: np.ndarray,
    common: dict[str, Any],
) -> list[dict[str, Any]]:
    """Two bundles on the same pictures, each at its own shipped threshold and at the recall rule
    recomputed on its own defect scores: one row each."""
    rows = []
    for point in ("shipped", f"recall {recall:.2f}"):
        sides = []
        for bundle, scores in (before, after):
            t = bundle.threshold if point == "shipped" else recall_threshold(scores[defects], recall)
            sides.append((t, figures(scores, held, defects, fed, t)))
        rows.append(
            {
                **common,
                "point": point,
                "threshold_before": sides[0][0],
                "threshold_after": sides[1][0],
                "fed": int(fed.size),
                "held": int(held.size),
                "defects": int(defects.size),
                "expected_far_after": after[0].manifest["threshold"]["expected_false_alarm_rate"]["estimate"],
                **{f"{key}_before": v for key, v in sides[0][1].items()},
                **{f"{key}_after": v for key, v in sides[1][1].items()},
            }
        )
    return rows


def control_study(seeds: list[int], work: Path, recall: float, k: int, draws: int) -> list[dict[str, Any]]:
    """Retraining without feedback: each other seed's shipped bundle (the same 700 pictures, another
    seed) against the first seed's, on the same held-out halves, with the first seed's K fed-back frames
    counted: how far a retraining moves the figures by itself."""
    first, feats0, base0 = shipped_scores(seeds[0], work)
    scores0 = fused(first, base0)
    goods = np.flatnonzero(feats0["test_types"] == "good")
    defects = np.flatnonzero(feats0["test_types"] != "good")
    t_op = recall_threshold(scores0[defects], recall)
    rows = []
    for seed in seeds[1:]:
        other, feats, base = shipped_scores(seed, work)
        if not np.array_equal(feats["test_names"], feats0["test_names"]):
            raise SystemExit(f"seed {seed}: its cached features list other pictures than seed {seeds[0]}'s")
        for draw in range(draws):
            pool, held = (goods[i] for i in split(goods.size, draw))
            alarms = pool[scores0[pool] > t_op]
            fed = fed_frames(alarms, k, draw)
            common = {"seed": seed, "draw": draw, "k": 0, "pool_alarms": int(alarms.size), "retrain_s": None}
            rows += compare((first, scores0), (other, fused(other, base)), recall, held, defects, fed, common)
    return rows


# ---- report --------------------------------------------------------------------------------------


def _line(r: dict[str, Any]) -> str:
    return (
        f"{r['point']}: held-out false alarms {r['held_false_alarms_before']} -> {r['held_false_alarms_after']}, "
        f"defects {r['defects_caught_before']} -> {r['defects_caught_after']}"
    )


def _spread(values: list[float], fmt: str = "{:g}") -> str:
    a = np.asarray(values, np.float64)
    med = fmt.format(float(np.median(a)))
    return med if a.min() == a.max() else f"{med} [{fmt.format(a.min())}-{fmt.format(a.max())}]"


def _rate(rows: list[dict[str, Any]], key: str, n: int) -> str:
    return f"{np.median([r[key] for r in rows]) / n:.1%}"


def summary(rows: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    """One line per (seed, point, K): median [range] over the draws."""
    out = []
    keys = list(dict.fromkeys((r["seed"], r["point"], r["k"]) for r in rows))
    for seed, point, k in keys:
        mine = [r for r in rows if (r["seed"], r["point"], r["k"]) == (seed, point, k)]
        held = mine[0]["held"]

        def col(name: str, fmt: str = "{:g}", mine: list[dict[str, Any]] = mine) -> str:
            return _spread([r[name] for r in mine], fmt)

        out.append(
            {
                "method": method,
                "seed": seed,
                "operating point": point,
                "draws": len(mine),
                "K": k,
                "fed (pool alarms)": f"{col('fed')} ({col('pool_alarms')})",
                f"held-out false alarms (of {held}) before -> after": f"{col('held_false_alarms_before')} -> "
                f"{col('held_false_alarms_after')} ({_rate(mine, 'held_false_alarms_before', held)} -> "
                f"{_rate(mine, 'held_false_alarms_after', held)})",
                f"defects caught (of {mine[0]['defects']}) before -> after": f"{col('defects_caught_before')} -> "
                f"{col('defects_caught_after')}",
                "false alarms removed": _spread(
                    [r["held_false_alarms_before"] - r["held_false_alarms_after"] for r in mine]
                ),
                "defects lost": _spread([r["defects_caught_before"] - r["defects_caught_after"] for r in mine]),
                "fed still alarming": col("fed_alarming_after"),
            }
        )
    return out


def table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--work", type=Path, default=Path("runs/final"), help="bench/decisions.py's folder (bundles, features)"
    )
    p.add_argument("--retrain-work", type=Path, default=Path("runs/feedback_study"), help="retrained bundles (cached)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="shipped bundles (seeds) for the extension")
    p.add_argument("--draws", type=int, default=10, help="random pool / held-out splits of test/good")
    p.add_argument("--ks", nargs="+", type=int, default=[5, 20], help="false alarms fed back")
    p.add_argument(
        "--recalls",
        nargs="+",
        type=float,
        default=[0.95, 0.9],
        help="operating points: defect recall on the test set (the first one is retrained)",
    )
    p.add_argument("--retrain-draws", type=int, default=2, help="draws of the first seed retrained, each K (0: none)")
    p.add_argument("--results", default="feedback_study", help="name of bench/results/NAME.{md,json}")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ext_rows, infos = [], []
    for seed in args.seeds:
        rows, info = extension_study(seed, args.work, args.recalls, args.ks, args.draws)
        ext_rows += rows
        infos.append(info)
        print(table(summary(rows, "extension")), flush=True)
    re_rows = []
    if args.retrain_draws:
        re_rows = retrain_study(
            args.seeds[0], args.work, args.retrain_work, args.recalls[0], args.ks, args.retrain_draws
        )
    command = (
        f"python bench/feedback_study.py --seeds {' '.join(map(str, args.seeds))} --draws {args.draws} "
        f"--ks {' '.join(map(str, args.ks))} --recalls {' '.join(f'{r:g}' for r in args.recalls)} "
        f"--retrain-draws {args.retrain_draws}"
    )
    side = summary([r for r in ext_rows if r["seed"] == args.seeds[0]], "extension")
    side += summary(re_rows, "retrain") if re_rows else []
    control = control_study(args.seeds, args.work, args.recalls[0], max(args.ks), max(args.retrain_draws, 1))
    side += summary(control, "control: other seed, no feedback") if control else []
    others = summary([r for r in ext_rows if r["seed"] != args.seeds[0]], "extension")
    text = report(command, args, side, others, infos, re_rows + control)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.results}.md").write_text(text)
    payload = {
        "command": command,
        "machine": machine(),
        "extension": ext_rows,
        "retrain": re_rows,
        "control": control,
        "info": infos,
    }
    (RESULTS / f"{args.results}.json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
    print(text)
    return 0


def report(command: str, args: Any, side: list, others: list, infos: list, re_rows: list) -> str:
    i0 = infos[0]
    points = ", ".join(
        f"{p}: threshold {t:.3f}, {i0['test_good_alarms'][p]} of 252 test goods alarm, defect recall "
        f"{i0['defect_recall'][p]:.3f}"
        for p, t in i0["thresholds"].items()
    )
    text = "# Feedback study: bank extension against retraining (magnetic tile)\n\n"
    text += f"{json.dumps(machine())}\n\n`{command}`\n\n"
    text += (
        "Shipped bundle: runs/final/magnetic_tile/bundle (yugami-train defaults, fused, epochs 0, seed "
        f"{args.seeds[0]}). Operating points on the whole test set: {points}. The recall points are what an "
        "engineer sets with cmd/set after counting the test defects (the rule of yugami-train --threshold-rule "
        "recall, placed with all 392 defects, which are then also the defects counted below: 'before' catches "
        "the target share by construction). test/good is split at random into a feedback pool (126) and a "
        f"held-out half (126), {args.draws} draws; K of the pool's false alarms at that threshold are fed back "
        "(fewer when the pool has fewer: column 'fed (pool alarms)'). Figures: median [min-max] over draws, on the "
        "held-out normals and all 392 defects; 'fed still alarming' counts the fed-back frames themselves after.\n\n"
        "Extension (agent/feedback.py): each fed-back frame's GeM embedding joins the GeM bank and its patch "
        "cells farther than the bundle's patch.map.floor from the bundle's own patch bank join a second patch "
        "bank (min over both); fusion statistics and threshold as shipped; the agent's own scoring functions on "
        "cached int8 features. "
        "Check against the agent's own path on the pictures (Scorer, agent.feedback.extension_features, "
        f"BankExtension, Scorer.extend, Scorer.score): {i0['check']}. "
        "Patch search per frame (ms, numpy's default BLAS threads, CPU shared with other work): "
        f"{i0['patch_search_ms']}. Rows 're-placed': the "
        "recall rule re-applied to the extended scores (the threshold moves, as it does for the retrained bundle "
        "below), so extension and retrain also compare at equal defect recall.\n\n"
    )
    if re_rows:
        text += (
            f"Retrain: yugami-train defaults on train/good (700) + the K fed-back frames, seed {args.seeds[0]}, "
            f"{args.retrain_draws} draw(s) at the first recall point; 'shipped' compares the shipped bundle at its "
            "threshold with the retrained one at its own; the recall row recomputes the threshold by the same rule "
            "on the retrained bundle's own defect scores. Retrain wall time (s, CPU shared with other work): "
            + ", ".join(
                f"draw {r['draw']} K {r['k']}: {r['retrain_s']:.0f}"
                for r in re_rows
                if r["point"] == "shipped" and r["k"]
            )
            + ". Control: the shipped bundles of the other seeds (the same 700 pictures, another seed: what a "
            "retraining changes by itself) against the first seed's, on the same held-out halves; 'fed still "
            "alarming' counts the first seed's K fed-back frames.\n\n"
        )
    text += f"## Side by side (seed {args.seeds[0]})\n\n" + table(side) + "\n\n"
    if others:
        text += "## The extension on the other seeds' bundles\n\n" + table(others) + "\n\n"
    if re_rows:
        text += (
            "## Retrain and control, per draw (K 0: control)\n\n"
            + table([{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in re_rows])
            + "\n"
        )
    return text


if __name__ == "__main__":
    raise SystemExit(main())
