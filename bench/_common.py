"""Shared pieces of the benchmark scripts: real frames, percentiles, markdown tables, resumable results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("YUGAMI_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "bench" / "results"


def real_frames(n: int, size: tuple[int, int] = (640, 480)) -> list[np.ndarray]:
    """``n`` real MVTec screw pictures (good and defective) brought to camera-frame size (BGR)."""
    folders = [SHARED / "data/mvtec_screw/test/good", SHARED / "data/mvtec_screw/test/defect"]
    paths = sorted(p for f in folders for p in f.glob("*.png"))
    if not paths:
        raise SystemExit(f"no screw images under {SHARED}/data/mvtec_screw; set YUGAMI_SHARED")
    frames = []
    # At most 40 distinct pictures, repeated: holding hundreds of 640x480 frames would swell the RSS we report.
    for p in paths[: min(n, 40)]:
        grey = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        frames.append(cv2.cvtColor(cv2.resize(grey, size, interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR))
    while len(frames) < n:
        frames.extend(frames[: n - len(frames)])
    return frames


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    return {
        "n": int(a.size),
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "fps": float(1000.0 / a.mean()),
    }


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "date": time.strftime("%F")}


def run_worker(script: Path, args: list[str], timeout: float = 1800) -> dict[str, Any]:
    """Run ``script --worker ...`` in a fresh process (so frameworks and RSS do not leak between runs)."""
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def load_npz(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a cached .npz (never pickled objects), or None when there is no cache yet."""
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
