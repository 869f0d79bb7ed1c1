"""Agent config: the issue's minimal config works, every problem is reported with its key path and a fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent.config import (
    EX_CONFIG,
    ConfigError,
    field_docs,
    load_config,
    parse_config,
    read_password,
    source_kind,
)
from agent.service import Agent, main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "systemd" / "agent.example.yaml"


def minimal(tmp_path: Path, **extra: object) -> dict:
    (tmp_path / "bundle").mkdir(exist_ok=True)
    (tmp_path / "frames").mkdir(exist_ok=True)
    data = {
        "device_id": "line1-cam1",
        "bundle": str(tmp_path / "bundle"),
        "capture": {"source": str(tmp_path / "frames")},
        "mqtt": {"host": "127.0.0.1", "port": 1883},
    }
    data.update(extra)
    return data


def problems(data: dict, check_files: bool = False) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, check_files=check_files)
    return info.value.problems


def test_the_issues_minimal_config_works_with_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    cfg = parse_config(minimal(tmp_path))
    assert cfg.mqtt.topic_prefix == "yugami" and cfg.mqtt.qos == 1 and cfg.client_id == "yugami-line1-cam1"
    assert cfg.storage_dir == tmp_path / "state" and cfg.storage_dir.is_dir()
    assert cfg.source_kind == "folder" and cfg.capture.mode == "continuous"
    assert cfg.gradcam.policy == "on_command" and cfg.outbox.max_messages == 100000
    assert cfg.mqtt.homeassistant.enabled and not cfg.metrics.enabled


def test_unknown_keys_are_errors_with_a_suggestion(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["capture"]["sorce"] = "x"
    data["mqtt"]["tls"] = {"enable": True}
    found = problems(data)
    assert "capture.sorce: unknown key; did you mean 'source'?" in found
    assert "mqtt.tls.enable: unknown key; did you mean 'enabled'?" in found


def test_every_problem_is_reported_at_once_with_its_path() -> None:
    found = problems({"mqtt": {"port": "1883x", "qos": 0}, "capture": {"mode": "sometimes"}, "threads": 2.5})
    text = "\n".join(found)
    for path in ("device_id: required", "bundle: required", "capture.source: required", "mqtt.host: required",
                 "mqtt.port: expected a whole number", "capture.mode: 'sometimes' is not allowed",
                 "threads: expected"):
        assert path in text, text


def test_cross_field_rules_explain_the_fix(tmp_path: Path) -> None:
    data = minimal(tmp_path, device_id="line 1/cam#1")
    data["mqtt"].update(qos=0, topic_prefix="a/+/b", password_file="/x")
    data["capture"].update(roi=[0, 0, -5, 10], loop=True)
    text = "\n".join(problems(data))
    assert "device_id:" in text and "MQTT topic level" in text
    assert "mqtt.qos: 0 cannot work with the outbox" in text
    assert "mqtt.topic_prefix:" in text
    assert "mqtt.password_file: a password needs mqtt.username" in text
    assert "capture.roi:" in text and "capture.loop: only applies to a video file" in text


def test_files_are_checked_when_asked(tmp_path: Path) -> None:
    data = minimal(tmp_path, bundle=str(tmp_path / "nope"))
    data["mqtt"].update(username="u", password_file=str(tmp_path / "missing-password"))
    text = "\n".join(problems(data, check_files=True))
    assert "bundle:" in text and "not a folder" in text
    assert "mqtt.password_file:" in text and "not a readable file" in text


def test_password_file_expands_systemd_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mqtt-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    data = minimal(tmp_path, storage={"dir": str(tmp_path / "st")})
    data["mqtt"].update(username="agent", password_file="${CREDENTIALS_DIRECTORY}/mqtt-password")
    cfg = parse_config(data)
    assert cfg.password() == "s3cret"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    text = "\n".join(problems(data, check_files=True))
    assert "unset environment variable" in text and "LoadCredential" in text
    assert read_password(str(tmp_path / "mqtt-password")) == "s3cret"


@pytest.mark.parametrize(
    ("source", "kind"),
    [(0, "device"), ("2", "device"), ("/dev/video0", "device"), ("rtsp://u:p@cam/s", "stream"),
     ("http://cam/mjpeg", "stream"), ("clip.mp4", "video"), ("/no/such/folder", "folder")],
)
def test_source_kind_from_its_form(source: object, kind: str) -> None:
    assert source_kind(source) == kind  # type: ignore[arg-type]


def test_example_config_is_valid_and_documents_every_key() -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    parse_config(data, check_files=False)

    def keys(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            path = f"{prefix}.{k}" if prefix else k
            out.add(path)
            if isinstance(v, dict):
                out |= keys(v, path)
        return out

    assert keys(data) == {path for path, _, _ in field_docs()}


def test_bad_yaml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("device_id: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "absent.yaml")


def test_check_config_exit_codes(tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture) -> None:
    data = minimal(tmp_path, bundle=str(tiny_bundle), storage={"dir": str(tmp_path / "st")})
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(data))
    assert main(["--config", str(good), "--check-config"]) == 0
    assert "config OK" in capsys.readouterr().out

    data["capture"]["max_fps"] = -1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    assert main(["--config", str(bad), "--check-config"]) == EX_CONFIG == 78
    assert "capture.max_fps: must be greater than zero" in capsys.readouterr().err

    # A bundle that fails its checks is a config problem too: systemd must not restart in a loop.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{}")
    data = minimal(tmp_path, bundle=str(broken), storage={"dir": str(tmp_path / "st")})
    worse = tmp_path / "worse.yaml"
    worse.write_text(yaml.safe_dump(data))
    assert main(["--config", str(worse), "--check-config"]) == 78
    assert "bundle" in capsys.readouterr().err
    assert Agent(load_config(worse)).run() == 78


def test_docs_describe_every_key() -> None:
    text = (ROOT / "docs" / "AGENT.md").read_text()
    missing = [path for path, default, _ in field_docs() if default and f"`{path}`" not in text]
    assert not missing, f"docs/AGENT.md lacks {missing}"


def test_capture_roi_replaces_the_bundles_roi(tmp_path: Path, tiny_bundle: Path) -> None:
    from agent.service import load_agent_bundle

    data = minimal(tmp_path, bundle=str(tiny_bundle), threads=1, storage={"dir": str(tmp_path / "st")})
    assert load_agent_bundle(parse_config(data)).preprocessing.roi is None
    data["capture"]["roi"] = [4, 8, 60, 70]
    bundle = load_agent_bundle(parse_config(data))
    assert bundle.preprocessing.roi == (4, 8, 60, 70) and bundle.preprocessing.input_size == (64, 64)
