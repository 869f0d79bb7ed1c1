"""``yugami-fleet set`` against two real agents on a real mosquitto: each box applies the settings and answers,
the table shows them with their source, a box that does not answer fails the run (exit 1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.cli import main as fleet_main
from fleet.settings import changes_of, format_table
from tests.builders import plain_part_images
from tests.integration.conftest import ROOT, base_config, wait_until, write_images

pytestmark = pytest.mark.integration

DEMO = ROOT / "models" / "demo"


def fleet(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleet.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_the_options_make_the_body() -> None:
    import argparse

    from agent import settings as box_settings
    from fleet.settings import GRADCAM_POLICIES, add_arguments

    assert GRADCAM_POLICIES == box_settings.GRADCAM_POLICIES  # the CLI's copy (no numpy at start) is the box's list

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--device", "a", "--threshold", "-0.5", "--clear-max-fps", "--gradcam-policy", "off"])
    assert changes_of(args) == {"threshold": -0.5, "max_fps": None, "gradcam_policy": "off"}
    assert changes_of(parser.parse_args(["--device", "a"])) == {}  # nothing to set: cmd/get
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "a", "--threshold", "1", "--clear-threshold"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "a", "--threshold", "nan"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "a", "--max-fps", "0"])
    table = format_table({"a": {"ok": True, "settings": {"threshold": {"value": 0.5, "source": "set"}}}, "b": None})
    assert "0.5 (set)" in table and "no answer" in table


def test_fleet_set_changes_each_box_and_prints_its_answer(tmp_path: Path, mosquitto, agents,
                                                        recorders) -> None:
    rec = recorders(mosquitto.port, ["yugami/+/verdict", "yugami/+/event"])
    folders = {d: tmp_path / d / "in" for d in ("cam1", "cam2")}
    for device, folder in folders.items():
        agents(base_config(tmp_path / device, DEMO, mosquitto.port, str(folder), device=device), name=device)
        write_images(folder, plain_part_images(1, seed=1))
    wait_until(lambda: len(rec.on("yugami/cam1/verdict")) and len(rec.on("yugami/cam2/verdict")), 90,
               "a verdict from each box")
    broker = f"127.0.0.1:{mosquitto.port}"

    done = fleet("set", "--device", "cam1", "cam2", "--threshold", "0", "--max-fps", "50", "--broker", broker)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "OK", "THRESHOLD"]
    for device in ("cam1", "cam2"):
        line = next(x for x in lines if x.startswith(device))
        assert "yes" in line and "0 (set)" in line and "50 (set)" in line and "on_command (config)" in line
        write_images(folders[device], plain_part_images(1, seed=2), start=1)
        verdict = wait_until(lambda d=device: [v for v in map(json.loads, rec.on(f"yugami/{d}/verdict"))
                                               if v["source"].endswith("img_0001.png")], 60, f"{device}'s verdict")[0]
        assert (verdict["threshold"], verdict["verdict"]) == (0.0, "anomaly")

    shown = fleet("set", "--device", "cam2", "--json", "--broker", broker)  # no setting: cmd/get
    assert shown.returncode == 0, shown.stderr
    answer = json.loads(shown.stdout)["cam2"]
    assert answer["cmd"] == "get" and answer["settings"]["threshold"] == {"value": 0.0, "source": "set"}

    # Cleared on one box; then a box that is not there: named, exit 1, the others still apply it.
    assert fleet_main(["set", "--device", "cam1", "--clear-threshold", "--broker", broker]) == 0
    missing = fleet("set", "--device", "cam1", "cam9", "--gradcam-policy", "off", "--timeout", "3", "--broker", broker)
    assert missing.returncode == 1
    assert "no answer" in missing.stdout and "cam9" in missing.stderr
    assert "off (set)" in next(x for x in missing.stdout.splitlines() if x.startswith("cam1"))
