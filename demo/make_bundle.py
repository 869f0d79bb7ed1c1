"""``python -m demo.make_bundle``: regenerate ``models/demo/``, the demo's committed model bundle.

It draws the synthetic training set (normal parts only are trained on; the test split with the four
defect kinds is for the report), trains with the project's own trainer (``yugami-train``, run as a
child process so this module never imports TensorFlow), evaluates the bundle with ``yugami-eval``
and checks that it stays small enough to commit.

The pictures go through the same MJPG encode and decode as the demo video (``--format mjpg``), so
the bundle learns what that compression does to a normal part instead of flagging it.
Needs the trainer's packages: ``pip install -e '.[train]'``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from demo.synthetic import write_dataset

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "models" / "demo"
WEIGHTS_NAME = "mobilenet_v2_1.0_224_no_top.h5"
MAX_BUNDLE_BYTES = 4 * 1024 * 1024  # the limit for a bundle committed to git

# The settings the committed bundle was made with; docs/DEMO.md repeats them.
TRAIN_ARGS = {
    "--input-size": "224",
    "--alpha": "1.0",
    "--epochs": "10",
    "--projection": "128",
    "--pooling": "avg",  # the committed bundle predates GeM; a projection needs average pooling
    "--seed": "0",
    "--name": "yugami-demo-parts",
}
DATASET = {"n_train": 300, "n_test_good": 40, "n_test_defect": 10, "size": 256, "seed": 0}


def default_weights() -> str:
    """The shared MobileNetV2 ImageNet weights beside the checkout, else Keras' download."""
    shared = Path(os.environ.get("YUGAMI_SHARED", ROOT.parent / "shared"))
    path = shared / "weights" / WEIGHTS_NAME
    return str(path) if path.is_file() else "imagenet"


def tool(name: str, function: str) -> list[str]:
    """A console script from this interpreter's environment, else its entry function (``trainer.cli:train_main``)."""
    script = Path(sys.executable).parent / name
    if script.is_file():
        return [str(script)]
    module, func = function.split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]


def bundle_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.iterdir() if p.is_file())


def make(out: Path, data: Path, weights: str, extra: Sequence[str]) -> dict[str, object]:
    t0 = time.monotonic()
    counts = write_dataset(data, image_format="mjpg", **DATASET)
    t_data = time.monotonic() - t0
    args = [a for kv in TRAIN_ARGS.items() for a in kv]
    cmd = [
        *tool("yugami-train", "trainer.cli:train_main"),
        str(data),
        "--out",
        str(out),
        "--weights",
        weights,
        *args,
        *extra,
    ]
    print("training:", " ".join(cmd), flush=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    t1 = time.monotonic()
    subprocess.run(cmd, check=True, env=env)
    t_train = time.monotonic() - t1
    eval_json = Path(tempfile.mkstemp(suffix=".json")[1])
    evaluate = [*tool("yugami-eval", "trainer.cli:eval_main"), str(out), str(data), "--json", str(eval_json), "--quiet"]
    subprocess.run(evaluate, check=True, env=env, stdout=subprocess.DEVNULL)
    result = json.loads(eval_json.read_text())
    eval_json.unlink()
    return {
        "bundle": str(out),
        "bytes": bundle_bytes(out),
        "dataset": counts,
        "seconds": {"dataset": round(t_data, 1), "train": round(t_train, 1)},
        "image_auroc": result.get("image_auroc"),
        "per_defect_auroc": result.get("per_defect_auroc"),
        "false_alarm_rate": result.get("false_alarm_rate"),
        "miss_rate": result.get("miss_rate"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m demo.make_bundle",
        description=(
            "Regenerate the demo bundle: draw synthetic parts (MJPG-compressed like the demo video), train "
            "with yugami-train, evaluate with yugami-eval on the held-back test split, check the size."
        ),
        epilog="Arguments after -- go to yugami-train unchanged (e.g. -- --epochs 5).",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="bundle folder, replaced (default models/demo)")
    p.add_argument("--data", type=Path, default=None, help="keep the generated data set here (default: a temp dir)")
    p.add_argument("--weights", default=None, help=f"MobileNetV2 no-top .h5 (default ../shared/weights/{WEIGHTS_NAME})")
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    weights = args.weights or default_weights()
    try:
        if args.data is not None:
            report = make(args.out, args.data, weights, extra)
        else:
            with tempfile.TemporaryDirectory(prefix="yugami-demo-data-") as tmp:
                report = make(args.out, Path(tmp), weights, extra)
    except subprocess.CalledProcessError as exc:
        print(f"demo.make_bundle: {exc.cmd[0]} failed with status {exc.returncode}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    if int(report["bytes"]) > MAX_BUNDLE_BYTES:  # type: ignore[call-overload]
        print(
            f"demo.make_bundle: the bundle is {report['bytes']} bytes, over the {MAX_BUNDLE_BYTES} allowed in git; "
            "use a smaller --projection or input size",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
