"""Soak: N frames through the real service with the demo bundle, RSS sampled from /proc every second.

A looping video file is the source (a folder of 10^5 files would measure the folder's own "inspected" list,
which grows by design); verdicts are counted on the broker. Growth is the RSS at the end (median of the last
10 samples) minus the RSS after warm-up (median of the 10 samples after the first 10 % of frames); target
< 5 MB. Writes bench/results/soak.md.

    .venv/bin/python bench/soak.py [--frames 100000] [--bundle models/demo]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._service import DEMO_BUNDLE, ROOT, RssSampler, VerdictCounter, machine
from tests.builders import plain_part_images, scratched
from tests.integration.conftest import AgentProcess, Mosquitto, base_config, write_config

BASE = "yugami/cam1"
OUT = ROOT / "bench" / "results" / "soak.md"


def make_video(path: Path, frames: int = 100) -> Path:
    """640x480 MJPG clip of plain parts, every tenth scratched (so evidence is written too)."""
    parts = plain_part_images(frames, seed=71, size=480)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (640, 480))
    if not writer.isOpened():
        raise RuntimeError("OpenCV cannot write an MJPG video here")
    for i, img in enumerate(parts):
        img = scratched(img, seed=i) if i % 10 == 0 else img
        writer.write(cv2.copyMakeBorder(img, 0, 0, 80, 80, cv2.BORDER_CONSTANT, value=(40, 40, 40)))
    writer.release()
    return path


def run(frames: int, bundle: Path, work: Path) -> dict[str, float]:
    broker_dir = work / "broker"
    broker_dir.mkdir()
    broker = Mosquitto(broker_dir)
    broker.start()
    video = make_video(work / "clip.avi")
    counter = VerdictCounter(broker.port, [f"{BASE}/verdict"])
    cfg = base_config(work, bundle, broker.port, str(video), capture={"loop": True},
                      mqtt={"stats_interval_s": 5}, threads=1)
    agent = AgentProcess(write_config(work / "agent.yaml", **cfg), work / "agent.log")
    sampler = RssSampler(agent.proc.pid, 1.0)
    sampler.start()
    started = time.monotonic()
    warm_at = None
    try:
        while counter.count("/verdict") < frames:
            if not agent.alive():
                raise RuntimeError(f"the agent stopped:\n{agent.logs()}")
            if warm_at is None and counter.count("/verdict") >= frames // 10:
                warm_at = time.monotonic() - sampler.started
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        rc = agent.terminate(timeout=60)
    finally:
        sampler.stop.set()
        agent.stop_quietly()
        counter.close()
        broker.stop()
    samples = sampler.samples
    warm = [kb for t, kb in samples if t >= (warm_at or 0)][:10]
    end = [kb for _, kb in samples][-10:]
    after_warm = [kb for t, kb in samples if t >= (warm_at or 0)]
    return {"frames": frames, "seconds": elapsed, "fps": frames / elapsed, "exit_code": rc,
            "warm_mb": statistics.median(warm) / 1024, "end_mb": statistics.median(end) / 1024,
            "peak_mb": max(kb for _, kb in samples) / 1024, "max_after_warm_mb": max(after_warm) / 1024,
            "min_after_warm_mb": min(after_warm) / 1024, "samples": len(samples), "warm_s": warm_at or 0.0}


def report(r: dict[str, float], command: str) -> str:
    growth = r["end_mb"] - r["warm_mb"]
    met = "met" if growth < 5 else "**missed**"
    return "\n".join([
        "# Soak: frames through the real service, RSS sampled",
        "",
        f"`{command}` on {machine()} (shared). Demo bundle (`models/demo`, 224 px), one TFLite thread, a looping "
        "640x480 MJPG clip (every tenth part scratched, so evidence is written), verdicts counted on a real "
        "mosquitto; RSS from `/proc/PID/status` every second.",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| frames (verdicts received) | {r['frames']:,} in {r['seconds']:.0f} s ({r['fps']:.1f} frames/s) | |",
        f"| RSS after warm-up (first 10 % of frames, {r['warm_s']:.0f} s; median of 10 samples) | "
        f"{r['warm_mb']:.1f} MB | |",
        f"| RSS at the end (median of the last 10 samples) | {r['end_mb']:.1f} MB | |",
        f"| growth after warm-up | {growth:+.2f} MB | < 5 MB: {met} |",
        f"| min / max after warm-up, peak overall | {r['min_after_warm_mb']:.1f} / {r['max_after_warm_mb']:.1f}, "
        f"{r['peak_mb']:.1f} MB | |",
        f"| samples | {r['samples']} | |",
        f"| exit after SIGTERM | {r['exit_code']} | 0 |",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100000)
    parser.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="yugami-soak-") as tmp:
        r = run(args.frames, args.bundle.resolve(), Path(tmp))
    command = "python bench/soak.py" + (f" --frames {args.frames}" if args.frames != 100000 else "")
    text = report(r, command)
    print(text)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
