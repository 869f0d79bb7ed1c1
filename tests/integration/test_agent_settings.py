"""Issue 14, item 3, against the real agent and a real mosquitto: cmd/set changes the threshold, max_fps and
the Grad-CAM policy of a running box at once, cmd/get reports them, they survive a restart, and a threshold
set for one model is not applied to another (``setting_dropped``) but applies again when its model returns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.builders import plain_part_images
from tests.integration.conftest import ROOT, Recorder, base_config, wait_until, write_images
from tests.integration.test_agent_mqtt import BASE, manifest_sha

pytestmark = pytest.mark.integration

DEMO = ROOT / "models" / "demo"


class Box:
    """The recorder's view of one agent: commands with answers, and what came after a point."""

    def __init__(self, rec: Recorder, folder: Path) -> None:
        self.rec = rec
        self.folder = folder
        self.written = 0

    def command(self, name: str, body: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        return self.rec.command(BASE, name, body, timeout)

    def frames(self, count: int) -> list[str]:
        """Write ``count`` new pictures into the watched folder; their file names."""
        names = write_images(self.folder, plain_part_images(count, seed=self.written), start=self.written)
        self.written += count
        return names

    def verdicts_of(self, names: list[str], timeout: float = 60.0) -> list[dict[str, Any]]:
        def found() -> list[dict[str, Any]] | None:
            by_name = {Path(v["source"]).name: v for v in self.rec.json_on(f"{BASE}/verdict")}
            return [by_name[n] for n in names] if all(n in by_name for n in names) else None

        return wait_until(found, timeout, f"the verdicts of {names}")

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.rec.json_on(f"{BASE}/event") if e["event"] == name]

    def stats_after(self, mark: int, predicate: Any, what: str) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((s for s in self.rec.json_on(f"{BASE}/stats")[mark:] if predicate(s)), None)

        return wait_until(found, 30, what)


def test_a_threshold_set_over_mqtt_applies_at_once_and_survives_a_restart(tmp_path: Path, mosquitto,
                                                                           agents, recorders) -> None:
    bundle_threshold = json.loads((DEMO / "manifest.json").read_text())["threshold"]["value"]
    rec = recorders(mosquitto.port, [f"{BASE}/#"])
    box = Box(rec, tmp_path / "in")
    cfg = base_config(tmp_path, DEMO, mosquitto.port, str(box.folder))
    agent = agents(cfg)

    first = box.verdicts_of(box.frames(1))[0]
    assert first["threshold"] == round(bundle_threshold, 6)
    got = box.command("get", {})
    assert got["ok"] is True and got["settings"]["threshold"] == {"value": bundle_threshold, "source": "bundle"}
    assert got["settings"]["gradcam_policy"] == {"value": "on_command", "source": "config"}

    # A threshold of 0: every frame (each scores above 0) is now an anomaly.
    answer = box.command("set", {"threshold": 0})
    assert answer["ok"] is True and answer["settings"]["threshold"] == {"value": 0.0, "source": "set"}
    assert answer["changed"] == {"threshold": {"old": bundle_threshold, "new": 0.0}}
    changed = wait_until(lambda: box.events("settings_changed"), 10, "the settings_changed event")[0]
    assert changed["changed"]["threshold"] == {"old": bundle_threshold, "new": 0.0}
    for v in box.verdicts_of(box.frames(3)):
        assert (v["threshold"], v["verdict"]) == (0.0, "anomaly") and v["score"] > 0
    assert box.command("get", {})["settings"]["threshold"] == {"value": 0.0, "source": "set"}
    stored = json.loads((tmp_path / "state" / "settings.json").read_text())
    assert stored["threshold"] == {"value": 0, "model_sha256": manifest_sha(DEMO)}

    # Refusals change nothing and say why.
    bad = box.command("set", {"threshold": 0.5, "sensitivity": 2})
    assert bad["ok"] is False and "unknown setting(s) 'sensitivity'; known: threshold, max_fps, gradcam_policy" \
        in bad["error"]
    assert box.command("set", {"max_fps": -1})["ok"] is False

    # Stop, start again on the same state folder: the threshold still applies, and stats say where it comes from.
    assert agent.terminate() == 0, agent.logs()
    mark = len(rec.json_on(f"{BASE}/stats"))
    agents(cfg)
    for v in box.verdicts_of(box.frames(2)):
        assert (v["threshold"], v["verdict"]) == (0.0, "anomaly")
    stats = box.stats_after(mark, lambda s: s["frames"] >= 1, "stats of the restarted agent")
    assert stats["threshold"] == {"value": 0.0, "source": "set"}
    assert stats["settings"]["max_fps"] == {"value": None, "source": "config"}

    # A huge threshold: every frame is ok. Null clears it back to the bundle's.
    assert box.command("set", {"threshold": 1e6})["ok"] is True
    for v in box.verdicts_of(box.frames(2)):
        assert (v["threshold"], v["verdict"]) == (1e6, "ok")
    cleared = box.command("set", {"threshold": None})
    assert cleared["settings"]["threshold"] == {"value": bundle_threshold, "source": "bundle"}
    assert box.verdicts_of(box.frames(1))[0]["threshold"] == round(bundle_threshold, 6)


def test_max_fps_and_the_gradcam_policy_apply_at_once(tmp_path: Path, mosquitto, agents, recorders) -> None:
    rec = recorders(mosquitto.port, [f"{BASE}/#"])
    box = Box(rec, tmp_path / "in")
    agents(base_config(tmp_path, DEMO, mosquitto.port, str(box.folder)))
    last = box.verdicts_of(box.frames(1))[0]

    # gradcam_policy off: cmd/gradcam is refused; cleared: the config's on_command allows it again.
    off = box.command("set", {"gradcam_policy": "off"})
    assert off["ok"] is True and off["settings"]["gradcam_policy"] == {"value": "off", "source": "set"}
    refused = box.command("gradcam", {"frame_id": last["id"]})
    assert refused["ok"] is False and "policy is 'off'" in refused["error"]
    assert box.command("set", {"gradcam_policy": None})["settings"]["gradcam_policy"]["source"] == "config"
    allowed = box.command("gradcam", {"frame_id": last["id"]}, timeout=60)
    assert allowed["ok"] is True and allowed["frame_id"] == last["id"]

    # max_fps of one frame in 1000 s, counted from the last inspected frame: new pictures wait (three stats go by,
    # no frame is inspected); cleared, they come.
    assert box.command("set", {"max_fps": 0.001})["settings"]["max_fps"] == {"value": 0.001, "source": "set"}
    mark = len(rec.json_on(f"{BASE}/stats"))
    inspected = len(rec.on(f"{BASE}/verdict"))
    waiting = box.frames(3)
    wait_until(lambda: len(rec.json_on(f"{BASE}/stats")) >= mark + 3, 30, "three stats messages")
    assert len(rec.on(f"{BASE}/verdict")) == inspected
    assert box.command("get", {})["settings"]["max_fps"] == {"value": 0.001, "source": "set"}
    assert box.command("set", {"max_fps": None})["settings"]["max_fps"] == {"value": None, "source": "config"}
    assert len(box.verdicts_of(waiting)) == 3


def test_a_threshold_is_bound_to_its_model(tmp_path: Path, mosquitto, agents, recorders) -> None:
    """Another bundle in use: the threshold set for the first is not applied (setting_dropped); the first
    back: it applies again (setting_applied). Also at start: a damaged settings.json is reported, not fatal."""
    bundle = tmp_path / "bundle"
    shutil.copytree(DEMO, bundle)
    other = tmp_path / "other"
    shutil.copytree(DEMO, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["threshold"]["value"] = 0.321  # the same model files; another manifest, so another sha256
    (other / "manifest.json").write_text(json.dumps(manifest, indent=1))
    state = tmp_path / "state"
    state.mkdir()
    (state / "settings.json").write_text('{"format": 1, "threshold": {"value": ')  # damaged

    rec = recorders(mosquitto.port, [f"{BASE}/#"])
    box = Box(rec, tmp_path / "in")
    agents(base_config(tmp_path, bundle, mosquitto.port, str(box.folder)))
    box.verdicts_of(box.frames(1))
    unreadable = wait_until(lambda: box.events("settings_unreadable"), 10, "the settings_unreadable event")[0]
    assert "is not valid JSON" in unreadable["error"]
    assert box.command("set", {"threshold": 0})["ok"] is True  # replaces the damaged file

    def swap_to(src: Path) -> dict[str, Any]:
        old = tmp_path / "old"
        bundle.rename(old)
        shutil.copytree(src, bundle)
        shutil.rmtree(old)
        return box.command("reload", {}, timeout=60)

    a_copy = tmp_path / "a"
    shutil.copytree(DEMO, a_copy)
    assert swap_to(other)["ok"] is True
    dropped = wait_until(lambda: box.events("setting_dropped"), 10, "the setting_dropped event")[0]
    assert dropped["setting"] == "threshold" and dropped["value"] == 0
    assert dropped["set_for"] == {"sha256": manifest_sha(DEMO)} and dropped["model"]["sha256"] == manifest_sha(other)
    assert box.verdicts_of(box.frames(1))[0]["threshold"] == 0.321
    got = box.command("get", {})
    assert got["settings"]["threshold"] == {"value": 0.321, "source": "bundle"}
    assert got["stored"]["threshold"] == {"value": 0, "model_sha256": manifest_sha(DEMO)}

    assert swap_to(a_copy)["ok"] is True
    wait_until(lambda: box.events("setting_applied"), 10, "the setting_applied event")
    assert box.verdicts_of(box.frames(1))[0]["threshold"] == 0.0
