"""Issue 15, item 3: frames back to the workstation, with a real mosquitto and a real agent on the demo bundle.

Frames are inspected and saved as evidence; one is labelled good and one defect with cmd/feedback;
``yugami-fleet collect`` (a subprocess) brings them back into the trainer's layout with matching sha256, a
second run transfers nothing, a cut ``.part`` file is continued, and ``yugami-eval`` runs on the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import ROOT, Recorder, base_config, wait_until, write_images

pytestmark = pytest.mark.integration

DEMO_BUNDLE = ROOT / "models" / "demo"
DEVICE = "line1-cam"
BASE = f"yugami/{DEVICE}"
COLLECT = [sys.executable, "-m", "fleet.cli", "collect"]  # yugami-fleet collect


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def frames() -> list[np.ndarray]:
    from demo.synthetic import defective_part, normal_part

    rng = np.random.default_rng(11)
    return [normal_part(rng, 256), defective_part(rng, 256, "scratch"), normal_part(rng, 256),
            defective_part(rng, 256, "dent")]


def collect(port: int, out: Path, *extra: str) -> tuple[dict, str, int]:
    cmd = [*COLLECT, "--device", DEVICE, "--out", str(out), "--broker",
           f"127.0.0.1:{port}", "--timeout", "5", "--chunk-bytes", "16384", "--json", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True,
                          text=True, timeout=180)
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout), proc.stderr, proc.returncode


def test_collect_brings_labelled_frames_and_evidence_back(tmp_path: Path, mosquitto, agents) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    state = tmp_path / "state"
    cfg = base_config(tmp_path, DEMO_BUNDLE, mosquitto.port, str(folder), device=DEVICE,
                      storage={"dir": str(state), "save_normal_every": 1, "image_format": "png"})
    rec = Recorder(mosquitto.port, [f"{BASE}/verdict", f"{BASE}/available", f"{BASE}/cmd/+/result"])
    agent = agents(cfg)
    try:
        wait_until(lambda: b"online" in rec.on(f"{BASE}/available") or not agent.alive(), 90, "the agent online")
        assert agent.alive(), agent.logs()
        names = write_images(folder, frames(), prefix="part")
        verdicts = wait_until(lambda: len(rec.json_on(f"{BASE}/verdict")) >= 4 and rec.json_on(f"{BASE}/verdict"),
                              90, "four verdicts")
        by_name = {Path(v["source"]).name: v for v in verdicts}
        good_id, defect_id = by_name[names[0]]["id"], by_name[names[1]]["id"]
        rec.publish(f"{BASE}/cmd/feedback", json.dumps({"id": "fb1", "frame_id": good_id, "label": "good",
                                                        "note": "glare on the belt"}))
        rec.publish(f"{BASE}/cmd/feedback", json.dumps({"id": "fb2", "frame_id": defect_id, "label": "defect"}))
        for rid in ("fb1", "fb2"):
            answer = rec.wait_json(f"{BASE}/cmd/feedback/result", lambda m, r=rid: m.get("request_id") == r, 30)
            assert answer["ok"], answer

        out = tmp_path / "data"
        summary, err, rc = collect(mosquitto.port, out, "--test-good")
        assert rc == 0, err
        (dev,) = summary["devices"]
        assert dev["answered"] and dev["listed"] == 4 and dev["fetched"] == 4 and dev["failed"] == 0, (dev, err)
        assert dev["labels"] == {"good": 1, "defect": 1, "unlabelled": 2}
        good = out / "train" / "good" / f"{DEVICE}_{good_id}.png"
        defect = out / "test" / "defect" / f"{DEVICE}_{defect_id}.png"
        assert sha256(good) == sha256(state / "feedback" / f"{good_id}.png")
        assert sha256(defect) == sha256(state / "feedback" / f"{defect_id}.png")
        assert (out / "test" / "good" / good.name).read_bytes() == good.read_bytes()
        unlabelled = sorted((out / "unlabelled").iterdir())
        on_box = {sha256(p) for p in (state / "evidence").rglob("*.png")}
        assert len(unlabelled) == 2 and {sha256(p) for p in unlabelled} <= on_box
        record = json.loads((out / "collected.json").read_text())["frames"][f"{DEVICE}/{good_id}"]
        assert record["label"] == "good" and record["note"] == "glare on the belt"
        assert record["verdict"]["id"] == good_id and record["sha256"] == sha256(good)
        assert record["source"]["store"] == "feedback"

        # Again: everything is there already, nothing is transferred.
        summary, err, rc = collect(mosquitto.port, out, "--test-good")
        assert rc == 0, err
        (dev,) = summary["devices"]
        assert dev["fetched"] == 0 and dev["present"] == 4 and dev["bytes"] == 0, dev

        # An interrupted transfer: the picture half there as a .part; the next run continues it.
        whole = good.read_bytes()
        good.unlink()
        part = good.with_name(good.name + ".part")
        part.write_bytes(whole[: len(whole) // 2])
        summary, err, rc = collect(mosquitto.port, out, "--test-good")
        assert rc == 0, err
        assert f"continuing {part.name} at {len(whole) // 2}" in err
        assert good.read_bytes() == whole and not part.exists()
        (dev,) = summary["devices"]
        assert dev["fetched"] == 1 and 0 < dev["bytes"] < len(whole), dev
    finally:
        rec.close()

    # yugami-eval reads the collected folder (train/good, test/good, test/defect) with the demo bundle.
    from trainer.cli import eval_main

    report = tmp_path / "eval.json"
    assert eval_main([str(DEMO_BUNDLE), str(out), "--json", str(report), "--quiet"]) == 0
    result = json.loads(report.read_text())
    assert result["manifest_sha256"] and "auroc" in json.dumps(result)


def test_collect_says_when_a_box_does_not_answer(tmp_path: Path, mosquitto) -> None:
    summary, err, rc = collect(mosquitto.port, tmp_path / "data", "--retries", "0", "--timeout", "1")
    assert rc == 1
    (dev,) = summary["devices"]
    assert not dev["answered"] and "did not answer cmd/collect_list" in err
