"""agent.settings: the cmd/set body, the model, the file, and the threshold bound to one model."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from agent.bundle import load_bundle
from agent.commands import CommandError, parse_command_body
from agent.scoring import Scorer
from agent.settings import (
    KEYS,
    Settings,
    SettingsError,
    apply_changes,
    differences,
    effective,
    load_settings,
    parse_changes,
    save_settings,
)
from tests.builders import plain_part_images

ROOT = Path(__file__).resolve().parents[2]
SHA_A = "a" * 64
SHA_B = "b" * 64


def eff(settings: Settings, sha: str = SHA_A):
    return effective(settings, bundle_threshold=0.25, model_sha256=sha, config_max_fps=None,
                     config_gradcam_policy="on_command")


def test_a_body_may_set_or_clear_each_known_key() -> None:
    assert parse_changes({"id": "r1", "threshold": 0.3}) == {"threshold": 0.3}
    assert parse_changes({"threshold": None, "max_fps": 2, "gradcam_policy": "off"}) == {
        "threshold": None, "max_fps": 2.0, "gradcam_policy": "off"}
    assert parse_changes({"threshold": -1}) == {"threshold": -1.0}  # fused scores can be below 0


def test_unknown_keys_are_refused_naming_the_known_ones() -> None:
    with pytest.raises(SettingsError, match=re.escape(
            "unknown setting(s) 'gradcam.policy', 'sensitivity'; known: threshold, max_fps, gradcam_policy")):
        parse_changes({"threshold": 0.2, "sensitivity": 3, "gradcam.policy": "off"})
    with pytest.raises(SettingsError, match="nothing to set; send one or more of threshold, max_fps"):
        parse_changes({"id": 4})


@pytest.mark.parametrize(("body", "message"), [
    ({"threshold": math.nan}, "'threshold' must be a finite number"),
    ({"threshold": math.inf}, "'threshold' must be a finite number"),
    ({"threshold": "0.3"}, "'threshold' must be a finite number"),
    ({"threshold": True}, "'threshold' must be a finite number"),
    ({"max_fps": 0}, "'max_fps' must be a number above 0"),
    ({"max_fps": -2}, "'max_fps' must be a number above 0"),
    ({"max_fps": 1e9}, "at most 1000"),
    ({"gradcam_policy": "always"}, "'gradcam_policy' must be one of off, on_command, every_anomaly"),
])
def test_bad_values_are_refused_saying_what_is_wrong(body: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        parse_changes(body)


def test_every_problem_of_a_body_is_named_at_once() -> None:
    with pytest.raises(SettingsError) as info:
        parse_changes({"threshold": "x", "max_fps": 0})
    assert "'threshold'" in str(info.value) and "'max_fps'" in str(info.value)


def test_the_mqtt_layer_refuses_a_bad_set_before_it_is_queued() -> None:
    with pytest.raises(CommandError, match=re.escape(
            "unknown setting(s) 'fps'; known: " + ", ".join(KEYS))) as info:
        parse_command_body("set", b'{"id": "r9", "fps": 3}', 1000)
    assert info.value.request_id == "r9"
    # NaN is a token Python's JSON reader accepts; it is still no threshold
    with pytest.raises(CommandError, match="finite number"):
        parse_command_body("set", b'{"threshold": NaN}', 1000)
    assert parse_command_body("get", b"", 1000).name == "get"


def test_a_threshold_applies_only_to_the_model_it_was_set_for() -> None:
    s = apply_changes(Settings(), {"threshold": 0.5, "max_fps": 3.0}, SHA_A)
    assert s.threshold_model == SHA_A and s.threshold_for(SHA_A) == 0.5 and s.threshold_for(SHA_B) is None
    a, b = eff(s, SHA_A), eff(s, SHA_B)
    assert a.as_dict()["threshold"] == {"value": 0.5, "source": "set"}
    assert b.as_dict()["threshold"] == {"value": 0.25, "source": "bundle"}  # another model: the bundle's
    assert a.as_dict()["max_fps"] == b.as_dict()["max_fps"] == {"value": 3.0, "source": "set"}
    assert a.as_dict()["gradcam_policy"] == {"value": "on_command", "source": "config"}
    # set again under model B: the threshold now belongs to B
    s2 = apply_changes(s, {"threshold": 0.7}, SHA_B)
    assert s2.threshold_for(SHA_B) == 0.7 and s2.threshold_for(SHA_A) is None
    # null clears back to the bundle's / config's values
    cleared = apply_changes(s2, {"threshold": None, "max_fps": None}, SHA_B)
    assert cleared == Settings()
    assert differences(eff(s2, SHA_B), eff(cleared, SHA_B)) == {
        "threshold": {"old": 0.7, "new": 0.25}, "max_fps": {"old": 3.0, "new": None}}


def test_the_file_round_trips_and_is_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "state" / "settings.json"
    assert load_settings(path) == (Settings(), None)  # none yet: no problem
    s = Settings(threshold=0.125, threshold_model=SHA_A, max_fps=2.5, gradcam_policy="every_anomaly")
    save_settings(path, s)
    assert load_settings(path) == (s, None)
    assert json.loads(path.read_text())["threshold"] == {"value": 0.125, "model_sha256": SHA_A}
    assert sorted(os.listdir(path.parent)) == ["settings.json"]  # no temporary file left behind
    save_settings(path, Settings())
    assert load_settings(path) == (Settings(), None)


@pytest.mark.parametrize(("content", "message"), [
    (b'{"format": 1, "threshold": {"val', "is not valid JSON"),
    (b"\xff\xfe", "is not valid JSON"),
    (b"[]", "must be a JSON object"),
    (b'{"format": 7}', "'format' must be 1"),
    (b'{"format": 1, "threshold": {"value": NaN, "model_sha256": "x"}}', "'threshold' must be a finite number"),
    (b'{"format": 1, "threshold": 0.3}', "'threshold' must be null or"),
    (b'{"format": 1, "max_fps": -1}', "'max_fps' must be a number above 0"),
    (b'{"format": 1, "gradcam_policy": "loud"}', "'gradcam_policy' must be one of"),
])
def test_a_damaged_file_means_no_settings_and_says_why(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "settings.json"
    path.write_bytes(content)
    settings, problem = load_settings(path)
    assert settings == Settings()
    assert problem is not None and str(path) in problem and message in problem


def test_an_unreadable_file_means_no_settings_and_says_why(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.mkdir()  # a folder where the file should be: reading fails with an OSError
    settings, problem = load_settings(path)
    assert settings == Settings() and "cannot be read" in problem and "IsADirectoryError" in problem


def test_the_scorer_decides_with_the_threshold_set() -> None:
    bundle = load_bundle(ROOT / "models" / "demo", num_threads=1)
    frame = plain_part_images(1, seed=5)[0]
    plain = Scorer(bundle)
    assert plain.threshold == bundle.threshold
    result, _ = plain.score(frame)
    low = Scorer(bundle, threshold=-1.0)  # below every score: an anomaly
    high = Scorer(bundle, threshold=1e6)  # above every score: ok
    r_low, r_high = low.score(frame)[0], high.score(frame)[0]
    assert (r_low.verdict, r_low.threshold) == ("anomaly", -1.0)
    assert (r_high.verdict, r_high.threshold) == ("ok", 1e6)
    assert r_low.score == pytest.approx(result.score) and r_low.confidence > 0.99 and r_high.confidence > 0.99
    high.threshold_override = None  # cleared: the bundle's again
    assert high.threshold == bundle.threshold and high.score(frame)[0].threshold == bundle.threshold
