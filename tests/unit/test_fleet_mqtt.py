"""fleet.mqtt: broker options and topic parsing (pure), and a clear error when no broker listens."""

from __future__ import annotations

import argparse
import socket

import pytest

from fleet.mqtt import BrokerError, add_broker_arguments, connect, device_of, parse_broker


def test_parse_broker_forms() -> None:
    assert parse_broker("central.local") == ("central.local", 1883)
    assert parse_broker("10.0.0.5:18830") == ("10.0.0.5", 18830)
    assert parse_broker("[::1]:1884") == ("::1", 1884)
    assert parse_broker("::1") == ("::1", 1883)
    for bad in ("", ":1883", "host:0", "host:http", "host:70000"):
        with pytest.raises(ValueError, match="--broker"):
            parse_broker(bad)


def test_broker_arguments_defaults_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_broker_arguments(parser)
    args = parser.parse_args([])
    assert args.broker == ("localhost", 1883)
    assert args.prefix == "yugami"
    args = parser.parse_args(["--broker", "site-a:1884", "--prefix", "plant"])
    assert args.broker == ("site-a", 1884)
    with pytest.raises(SystemExit):
        parser.parse_args(["--broker", "site-a:x"])
    assert "port must be a number" in capsys.readouterr().err


def test_device_of() -> None:
    assert device_of("yugami", "yugami/cam1/stats") == ("cam1", "stats")
    assert device_of("yugami", "yugami/cam1/cmd/set/result") == ("cam1", "cmd/set/result")
    assert device_of("yugami", "other/cam1/stats") is None
    assert device_of("yugami", "yugami/group/line-2/cmd/install") is None
    assert device_of("yugami", "yugami/cam1") is None


def test_connect_names_the_broker_when_nothing_listens() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    parser = argparse.ArgumentParser()
    add_broker_arguments(parser)
    args = parser.parse_args(["--broker", f"127.0.0.1:{port}"])
    with pytest.raises(BrokerError, match=f"127.0.0.1:{port}.*check --broker"):
        connect(args, "test")
