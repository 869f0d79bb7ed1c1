"""Issue 15, item 1 (the loop's first half) against a real mosquitto and the agent as a subprocess: a false
alarm, cmd/feedback "good", the same picture again scores below the threshold at once; feedback_list shows
it; feedback_undo brings the alarm back; after a restart the extension is still applied, and a frame that
left memory is labelled from the evidence folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from tests.builders import plain_part_images
from tests.integration.conftest import ROOT, Recorder, base_config, wait_until
from tests.integration.test_agent_mqtt import BASE

pytestmark = pytest.mark.integration

DEMO = ROOT / "models" / "demo"


def false_alarm_bundle(out: Path, picture: np.ndarray) -> tuple[Path, float]:
    """The demo bundle with its threshold at half the picture's score: the picture (a good part) is a false
    alarm. Editing the manifest changes its sha256, as any new model would (the bundle is unsigned)."""
    from agent.bundle import load_bundle
    from agent.scoring import Scorer

    score = Scorer(load_bundle(DEMO, num_threads=1)).score(picture)[0].score
    shutil.copytree(DEMO, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["threshold"]["value"] = threshold = round(score / 2, 6)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out, threshold


class Box:
    def __init__(self, rec: Recorder, folder: Path) -> None:
        self.rec, self.folder = rec, folder
        folder.mkdir(parents=True, exist_ok=True)

    def command(self, name: str, body: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        return self.rec.command(BASE, name, body, timeout)

    def inspect(self, picture: np.ndarray, name: str) -> dict[str, Any]:
        """Write the picture under a new name (as a camera writer does) and wait for its verdict."""
        ok, data = cv2.imencode(".png", picture)
        assert ok
        tmp = self.folder / f".{name}.tmp"
        tmp.write_bytes(data.tobytes())
        os.replace(tmp, self.folder / name)
        return self.rec.wait_json(f"{BASE}/verdict", lambda v: Path(v["source"]).name == name, 60,
                                  f"the verdict of {name}")

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.rec.json_on(f"{BASE}/event") if e["event"] == name]


def test_a_false_alarm_labelled_good_stops_at_once_and_stays_stopped_after_a_restart(
        tmp_path: Path, mosquitto, agents) -> None:
    picture = plain_part_images(1, seed=3)[0]
    bundle, threshold = false_alarm_bundle(tmp_path / "bundle", picture)
    rec = Recorder(mosquitto.port, [f"{BASE}/#"])
    box = Box(rec, tmp_path / "in")
    cfg = base_config(tmp_path, bundle, mosquitto.port, str(box.folder))
    agent = agents(cfg)

    alarm = box.inspect(picture, "a.png")
    assert alarm["verdict"] == "anomaly" and alarm["threshold"] == threshold and alarm["evidence"] is True
    assert list((tmp_path / "state" / "evidence").glob(f"*/*_{alarm['id']}.jpg"))  # evidence: true, file there

    answer = box.command("feedback", {"frame_id": alarm["id"], "label": "good", "note": "glare, part is fine"})
    assert answer["ok"] is True, answer
    assert answer["extension"] is True and answer["origin"] == "recent" and answer["replaced"] is None
    assert answer["score"]["after"] < threshold < answer["score"]["before"]
    assert answer["counts"] == {"good": 1, "defect": 0, "extension_frames": 1}
    added = wait_until(lambda: box.events("feedback_added"), 10, "the feedback_added event")[0]
    assert added["frame_id"] == alarm["id"] and added["label"] == "good" and added["note"] == "glare, part is fine"
    extended = wait_until(lambda: box.events("bank_extended"), 10, "the bank_extended event")[0]
    assert extended["frame_id"] == alarm["id"] and extended["frames"] == 1 and extended["gem_rows"] == 1
    kept = tmp_path / "state" / "feedback"
    assert (kept / f"{alarm['id']}.png").is_file() and (kept / "extension.npz").is_file()
    doc = json.loads((kept / f"{alarm['id']}.json").read_text())
    assert doc["label"] == "good" and doc["verdict"]["id"] == alarm["id"] and doc["extension"] is True
    print("feedback result:", json.dumps(answer))
    print("bank_extended event:", json.dumps(extended))

    # the same picture again, under a new name: below the threshold now
    again = box.inspect(picture, "b.png")
    assert again["verdict"] == "ok" and again["score"] < threshold and again["evidence"] is False

    listing = box.command("feedback_list", {})
    assert listing["ok"] is True and [i["frame_id"] for i in listing["items"]] == [alarm["id"]]
    assert listing["items"][0]["label"] == "good" and listing["items"][0]["extension"] is True
    assert listing["extension"]["frames"] == 1 and listing["extension"]["applied"] is True
    mark = len(rec.on(f"{BASE}/stats"))
    wait_until(lambda: any(s.get("feedback") == {"good": 1, "defect": 0, "extension_frames": 1}
                           for s in rec.json_on(f"{BASE}/stats")[mark:]), 30, "stats.feedback with the label")

    # undo: the alarm comes back
    undone = box.command("feedback_undo", {"frame_id": alarm["id"]})
    assert undone["ok"] is True and undone["extension_removed"] is True
    undone_event = wait_until(lambda: box.events("feedback_undone"), 10, "the feedback_undone event")[0]
    assert undone_event["frame_id"] == alarm["id"]
    back = box.inspect(picture, "c.png")
    assert back["verdict"] == "anomaly" and back["evidence"] is True
    assert box.command("feedback_undo", {"frame_id": alarm["id"]})["ok"] is False

    # label it again, then restart the agent: the extension is read back and applied to the same model
    assert box.command("feedback", {"frame_id": alarm["id"], "label": "good"})["extension"] is True
    assert agent.terminate() == 0
    agents(cfg, name="restarted")
    after_restart = box.inspect(picture, "d.png")
    assert after_restart["verdict"] == "ok" and after_restart["score"] < threshold
    assert wait_until(lambda: box.events("bank_extension_applied"), 10, "bank_extension_applied at start")

    # a frame no longer in memory is labelled from the evidence folder; an unknown one is refused
    from_evidence = box.command("feedback", {"frame_id": back["id"], "label": "defect", "note": "a real one"})
    assert from_evidence["ok"] is True and from_evidence["origin"] == "evidence"
    assert from_evidence["extension"] is False and from_evidence["counts"]["defect"] == 1
    unknown = box.command("feedback", {"frame_id": "no-such-frame", "label": "good"})
    assert unknown["ok"] is False and "service.recent_frames" in unknown["error"]
    bad = box.command("feedback", {"frame_id": alarm["id"], "label": "maybe"})
    assert bad["ok"] is False and "'label'" in bad["error"]
    rec.close()
