"""Issue 15, "Must show": the whole loop once, with a real mosquitto, a real agent and the real trainer.

A good part is a false alarm on the box; the operator says "good" (cmd/feedback) and the same picture scores
below the threshold at once (bank extension). ``yugami-fleet collect`` brings the labelled frames back into a
data folder, ``yugami-eval`` runs on it, ``yugami-train`` retrains on the original normals plus the collected
ones and signs the bundle, and ``yugami-fleet push`` installs it on the box, which then judges with it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from tests.builders import plain_part_images, scratched
from tests.integration.conftest import ROOT, Recorder, base_config, wait_until
from tests.integration.test_agent_feedback import Box, false_alarm_bundle
from tests.integration.test_agent_mqtt import BASE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WEIGHTS = "weights/mobilenet_v2_1.0_224_no_top.h5"
DEVICE = BASE.split("/")[1]


def fleet(*args: str) -> subprocess.CompletedProcess[str]:
    """``yugami-fleet ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "fleet.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=300)


def test_false_alarm_feedback_collect_eval_retrain_sign_and_push(tmp_path: Path, mosquitto, agents,
                                                                 shared_dir: Path, capsys) -> None:
    from fleet.keys import generate_keypair, sign_bundle
    from trainer.cli import eval_main, train_main

    parts = plain_part_images(26, seed=21, size=128)
    normals, picture = parts[:24], parts[24]
    key, pub = generate_keypair(tmp_path / "keys", "line")
    v1, threshold = false_alarm_bundle(tmp_path / "v1", picture)  # the demo model, too strict for this part
    sign_bundle(v1, key)

    rec = Recorder(mosquitto.port, [f"{BASE}/#"])
    box = Box(rec, tmp_path / "in")
    cfg = base_config(tmp_path, v1, mosquitto.port, str(box.folder), device=DEVICE,
                      bundle_trust={"public_keys": [str(pub)]}, fleet={"install": "signed"})
    agents(cfg)
    try:
        # 1. a false alarm; the operator says "good"; the same picture is ok at once
        alarm = box.inspect(picture, "part-a.png")
        assert alarm["verdict"] == "anomaly" and alarm["score"] > threshold
        answer = box.command("feedback", {"frame_id": alarm["id"], "label": "good", "note": "fine part"})
        assert answer["ok"] is True and answer["extension"] is True, answer
        again = box.inspect(picture, "part-b.png")
        assert again["verdict"] == "ok" and again["score"] < threshold
        # ... and a real defect, labelled so
        defect = box.inspect(scratched(parts[25], seed=1), "part-c.png")
        assert box.command("feedback", {"frame_id": defect["id"], "label": "defect"})["ok"] is True

        # 2. the labelled frames come back to the workstation; yugami-eval reads the folder
        data = tmp_path / "collected"
        got = fleet("collect", "--device", DEVICE, "--out", str(data), "--broker", f"127.0.0.1:{mosquitto.port}",
                    "--labels", "good,defect", "--test-good", "--json")
        assert got.returncode == 0, got.stderr
        back = data / "train" / "good" / f"{DEVICE}_{alarm['id']}.png"
        assert back.is_file() and (data / "test" / "defect" / f"{DEVICE}_{defect['id']}.png").is_file()
        assert eval_main([str(v1), str(data), "--json", str(tmp_path / "eval.json"), "--quiet"]) == 0

        # 3. retrain on the line's normals plus the collected one, signed with a higher version
        retrain = tmp_path / "retrain" / "train" / "good"
        retrain.mkdir(parents=True)
        for i, img in enumerate(normals):
            cv2.imwrite(str(retrain / f"normal_{i:02d}.png"), img)
        shutil.copy(back, retrain / back.name)
        v2 = tmp_path / "v2"
        rc = train_main([str(retrain.parent.parent), "--out", str(v2), "--input-size", "96", "--weights",
                         str(shared_dir / WEIGHTS), "--model-version", "2", "--sign-key", str(key), "--quiet"])
        assert rc == 0, capsys.readouterr().err

        # 4. pushed to the box: verified, shadow-scored on its recent frames, switched in
        pushed = fleet("push", str(v2), "--device", DEVICE, "--broker", f"127.0.0.1:{mosquitto.port}", "--json")
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
        from agent.bundle import load_bundle

        v2_sha = load_bundle(v2).manifest_sha256
        after = box.inspect(picture, "part-d.png")
        assert after["model"]["sha256"] == v2_sha and after["verdict"] == "ok", after
        installed = wait_until(lambda: box.events("installed"), 10, "the installed event")[0]
        assert installed["model"]["version"] == "2" and installed["previous"]["version"] == "1"
    finally:
        rec.close()
