"""Issue 13, item 3: every path in the config is expanded once (``${VAR}``, ``~``), and the expanded path is
what the running agent opens; ``--check-config`` opens each file the agent will open and names the key."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.builders import plain_part_images
from tests.integration.conftest import (
    MOSQUITTO,
    ROOT,
    Mosquitto,
    Recorder,
    base_config,
    wait_until,
    write_config,
    write_images,
)
from tests.integration.test_agent_mqtt import BASE, make_tls_files

pytestmark = pytest.mark.integration


def check_config(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.service", "--config", str(config), "--check-config"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_tls_and_password_paths_with_variables_and_tilde_are_what_the_agent_opens(
    tmp_path: Path, tiny_bundle: Path, agents
) -> None:
    if not Path(MOSQUITTO).exists() or shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto / mosquitto_passwd are not installed")
    ca, cert, key = make_tls_files(tmp_path / "tls")
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "agent", "pw-2"], check=True, timeout=30)
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    broker = Mosquitto(broker_dir, [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}",
                                    "allow_anonymous false", f"password_file {passwd}"])
    broker.start()
    try:
        home = tmp_path / "home"
        (home / "secrets").mkdir(parents=True)
        (home / "secrets" / "mqtt-password").write_text("pw-2\n")
        bundles = tmp_path / "bundles"
        bundles.mkdir()
        shutil.copytree(tiny_bundle, bundles / "current")
        folder = tmp_path / "in"
        write_images(folder, plain_part_images(2, seed=21))
        env = {"HOME": str(home), "YUGAMI_TLS": str(tmp_path / "tls"), "YUGAMI_BUNDLES": str(bundles),
               "YUGAMI_STATE": str(tmp_path / "state")}
        cfg = base_config(tmp_path, tiny_bundle, broker.port, str(folder),
                          storage={"dir": "${YUGAMI_STATE}"},
                          mqtt={"username": "agent", "password_file": "~/secrets/mqtt-password",
                                "tls": {"enabled": True, "ca_file": "${YUGAMI_TLS}/ca.crt"}})
        cfg["bundle"] = "${YUGAMI_BUNDLES}/current"

        checked = check_config(write_config(tmp_path / "check.yaml", **cfg), {**_base_env(), **env})
        assert checked.returncode == 0, checked.stderr
        assert str(tmp_path / "state") in checked.stdout

        rec = Recorder(broker.port, [f"{BASE}/verdict"], ca_file=ca, auth=("agent", "pw-2"))
        agent = agents(cfg, env=env)
        wait_until(lambda: len(rec.on(f"{BASE}/verdict")) >= 2 or not agent.alive(), 90,
                   "2 verdicts over TLS with expanded paths")
        assert agent.alive(), agent.logs()
        assert (tmp_path / "state" / "outbox.sqlite3").exists()  # storage.dir expanded too
        assert agent.terminate() == 0, agent.logs()
        rec.close()
    finally:
        broker.stop()


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}


def test_check_config_opens_each_file_and_names_the_key(tmp_path: Path, tiny_bundle: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    tls = tmp_path / "tls"
    tls.mkdir()
    (tls / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    cfg = base_config(tmp_path, tiny_bundle, 8883, str(folder),
                      mqtt={"tls": {"enabled": True, "ca_file": "${YUGAMI_TLS}/ca.crt"}})
    config = write_config(tmp_path / "agent.yaml", **cfg)
    env = {**_base_env(), "YUGAMI_TLS": str(tls)}

    bad_ca = check_config(config, env)
    assert bad_ca.returncode == 78, bad_ca.stderr
    assert "mqtt.tls.ca_file" in bad_ca.stderr and str(tls / "ca.crt") in bad_ca.stderr
    assert "Traceback" not in bad_ca.stderr

    unset = check_config(config, _base_env())
    assert unset.returncode == 78
    assert "mqtt.tls.ca_file" in unset.stderr and "${YUGAMI_TLS}" in unset.stderr
    assert "unset environment variable" in unset.stderr

    # The service itself refuses the same file at start with the same message, not a traceback.
    start = subprocess.run([sys.executable, "-m", "agent.service", "--config", str(config)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert start.returncode == 78 and "mqtt.tls.ca_file" in start.stderr and "Traceback" not in start.stderr
