"""Issue 13, item 3: one expansion of every path key, done at load; unset variables and unloadable files
are problems naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import PATH_KEYS, ConfigError, open_file_problems, parse_config


def config(tmp_path: Path, **mqtt: object) -> dict:
    (tmp_path / "bundle").mkdir(exist_ok=True)
    return {
        "device_id": "cam1",
        "bundle": "${YG_ROOT}/bundle",
        "capture": {"source": "~/frames"},
        "storage": {"dir": "${YG_ROOT}/state"},
        "mqtt": {"host": "127.0.0.1", **mqtt},
    }


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("YG_ROOT", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "frames").mkdir(parents=True)
    return tmp_path


def test_every_path_key_is_expanded_once_at_load(env: Path) -> None:
    (env / "pw").write_text("secret\n")
    (env / "tls").mkdir()
    data = config(env, username="u", password_file="~/../pw")
    cfg = parse_config(data, check_files=False)
    assert cfg.bundle == f"{env}/bundle"
    assert cfg.capture.source == f"{env}/home/frames" and cfg.source_kind == "folder"
    assert cfg.storage.dir == f"{env}/state" and cfg.storage_dir == env / "state"
    assert cfg.mqtt.password_file == f"{env}/home/../pw" and cfg.password() == "secret"
    assert set(PATH_KEYS) >= {"mqtt.tls.ca_file", "mqtt.tls.cert_file", "mqtt.tls.key_file", "bundle", "storage.dir"}


def test_tls_paths_are_expanded_and_a_literal_dollar_is_not_expanded_twice(env: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YG_TLS", str(env / "tls"))
    monkeypatch.setenv("YG_ODD", "$HOME")  # a value holding a '$' must not be expanded again
    data = config(env, tls={"enabled": True, "ca_file": "${YG_TLS}/ca.pem", "cert_file": "~/c.pem",
                            "key_file": "${YG_ODD}/k.pem"})
    cfg = parse_config(data, check_files=False)
    assert cfg.mqtt.tls.ca_file == f"{env}/tls/ca.pem"
    assert cfg.mqtt.tls.cert_file == f"{env}/home/c.pem"
    assert cfg.mqtt.tls.key_file == "$HOME/k.pem"


def test_unset_variables_are_reported_per_key_when_files_are_checked(env: Path) -> None:
    data = config(env, username="u", password_file="${CREDENTIALS_DIRECTORY}/mqtt-password",
                  tls={"enabled": True, "ca_file": "${YG_NOPE}/ca.pem"})
    data["bundle"] = "$YG_MISSING/bundle"
    with pytest.raises(ConfigError) as info:
        parse_config(data, check_files=True)
    text = "\n".join(info.value.problems)
    assert "mqtt.password_file: '${CREDENTIALS_DIRECTORY}/mqtt-password' names the unset" in text
    assert "LoadCredential" in text
    assert "mqtt.tls.ca_file: '${YG_NOPE}/ca.pem' names the unset environment variable ${YG_NOPE}" in text
    assert "bundle: '$YG_MISSING/bundle' names the unset environment variable $YG_MISSING" in text
    assert "not a folder" not in text  # one problem per key, not two
    parse_config(data, check_files=False)  # validating elsewhere: not a problem


def test_tls_files_are_loaded_as_the_client_will_and_name_the_key(env: Path) -> None:
    tls = env / "tls"
    tls.mkdir()
    (tls / "ca.pem").write_text("not PEM at all\n")
    (tls / "c.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    (tls / "k.pem").write_text("nope\n")
    data = config(env, tls={"enabled": True, "ca_file": str(tls / "ca.pem"), "cert_file": str(tls / "c.pem"),
                            "key_file": str(tls / "k.pem")})
    cfg = parse_config(data, check_files=False)
    found = open_file_problems(cfg)
    assert any(p.startswith("mqtt.tls.ca_file: ") and "PEM CA certificate" in p for p in found), found
    assert any(p.startswith("mqtt.tls.cert_file / mqtt.tls.key_file: ") for p in found), found
    with pytest.raises(ConfigError, match=r"mqtt\.tls\.ca_file"):
        parse_config(data, check_files=True)


def test_a_folder_where_a_file_should_be_names_the_key(env: Path) -> None:
    (env / "pwdir").mkdir()
    data = config(env, username="u", password_file=str(env / "pwdir"))
    with pytest.raises(ConfigError, match=r"mqtt\.password_file: .* is not a readable file"):
        parse_config(data, check_files=True)


def test_a_set_variable_whose_value_holds_a_dollar_is_not_reported_unset(env: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YG_ODD", str(env / "$weird"))
    (env / "$weird").mkdir()
    (env / "$weird" / "pw").write_text("x\n")
    cfg = parse_config(config(env, username="u", password_file="${YG_ODD}/pw"), check_files=True)
    assert cfg.mqtt.password_file == f"{env}/$weird/pw" and cfg.password() == "x"
