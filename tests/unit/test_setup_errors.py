"""Issue 13, item 7: TLS and password files that fail while the MQTT client is set up are ConfigErrors naming
the key (the config check reads them first; this covers a file changed or damaged in between)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.config import ConfigError, parse_config
from agent.mqtt import LinkCallbacks, MqttLink, Topics
from agent.service import Agent


def config(tmp_path: Path, bundle: Path, **mqtt: object) -> dict:
    (tmp_path / "in").mkdir(exist_ok=True)
    return {"device_id": "cam1", "bundle": str(bundle), "capture": {"source": str(tmp_path / "in")},
            "storage": {"dir": str(tmp_path / "state")}, "mqtt": {"host": "127.0.0.1", **mqtt}}


def test_a_damaged_ca_file_at_setup_names_its_key(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    cfg = parse_config(config(tmp_path, tmp_path, tls={"enabled": True, "ca_file": str(ca)}), check_files=False)
    with pytest.raises(ConfigError) as info:
        MqttLink(cfg, Topics.from_config(cfg), LinkCallbacks(on_command=lambda c: None))
    assert info.value.problems[0].startswith(f"mqtt.tls.ca_file: {ca} holds no usable PEM CA certificate")


def test_a_vanished_password_file_at_setup_names_its_key(tmp_path: Path) -> None:
    cfg = parse_config(config(tmp_path, tmp_path, username="u", password_file=str(tmp_path / "gone")),
                       check_files=False)
    with pytest.raises(ConfigError, match=r"mqtt\.password_file: cannot read .*gone"):
        MqttLink(cfg, Topics.from_config(cfg), LinkCallbacks(on_command=lambda c: None))


def test_agent_setup_closes_the_outbox_and_raises_config_error(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("nope\n")
    cfg = parse_config(config(tmp_path, tmp_path, tls={"enabled": True, "ca_file": str(ca)}), check_files=False)
    agent = Agent(cfg)
    with pytest.raises(ConfigError, match=r"mqtt\.tls\.ca_file"):
        agent._setup()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        agent.outbox.outbox._db.execute("SELECT 1")
