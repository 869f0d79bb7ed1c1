"""yugami-fleet status and fleet.mqtt's command round trip against real agents on a real mosquitto."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.mqtt import Results, add_broker_arguments, close, connect, request
from tests.builders import plain_part_images
from tests.integration.conftest import ROOT, base_config, wait_until, write_images

pytestmark = pytest.mark.integration

DEMO_BUNDLE = ROOT / "models" / "demo"


def fleet_status(port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    """`yugami-fleet status` in its own process."""
    return subprocess.run([sys.executable, "-m", "fleet.cli", "status", "--broker", f"127.0.0.1:{port}", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def broker_args(port: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_broker_arguments(parser)
    return parser.parse_args(["--broker", f"127.0.0.1:{port}"])


def test_status_lists_every_box_and_commands_reach_them(tmp_path: Path, mosquitto, agents) -> None:
    started = {}
    for n, device in enumerate(("cam1", "cam2")):
        folder = tmp_path / f"in-{device}"
        write_images(folder, plain_part_images(3, seed=n))
        cfg = base_config(tmp_path / device, DEMO_BUNDLE, mosquitto.port, str(folder), device=device)
        started[device] = agents(cfg, name=device)

    def both_scored() -> list[dict] | None:
        proc = fleet_status(mosquitto.port, "--json", "--wait", "1.5")
        rows = json.loads(proc.stdout or "[]")
        ok = len(rows) == 2 and all(r["online"] and r["frames"] == 3 for r in rows)
        return rows if ok else None

    rows = wait_until(lambda: both_scored() or not all(a.alive() for a in started.values()), 120,
                      "both boxes online with 3 frames each in yugami-fleet status")
    assert all(a.alive() for a in started.values()), [a.logs() for a in started.values()]
    assert [r["device"] for r in rows] == ["cam1", "cam2"]
    for r in rows:
        assert r["model"] and r["sha256"] and r["backlog"] == 0 and r["threshold"] is not None
        assert r["last_seen_s"] is not None and r["last_seen_s"] < 60

    table = fleet_status(mosquitto.port)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("DEVICE") and lines[1].startswith("cam1") and lines[2].startswith("cam2")

    # One command to both boxes and one to a box that does not exist: answers matched by request id.
    client = connect(broker_args(mosquitto.port), "test")
    try:
        answers = request(client, "yugami", ["cam1", "cam2", "nobody"], "reload", timeout=30)
        assert answers["cam1"]["ok"] and answers["cam2"]["ok"], answers
        assert answers["nobody"] is None
        with Results(client, "yugami", "reload") as results:
            rid = results.send("cam1", {})
            got = results.wait(30)
        assert got["cam1"]["request_id"] == rid
    finally:
        close(client)

    # A box that stops says offline (retained): it stays in the table, marked so.
    assert started["cam2"].terminate() == 0
    proc = fleet_status(mosquitto.port, "--json", "--wait", "0.5")
    rows = {r["device"]: r for r in json.loads(proc.stdout)}
    assert rows["cam2"]["online"] is False and rows["cam1"]["online"] is True


def test_status_names_the_broker_it_cannot_reach(tmp_path: Path) -> None:
    from tests.integration.conftest import free_port

    port = free_port()
    proc = fleet_status(port)
    assert proc.returncode == 1
    assert f"127.0.0.1:{port}" in proc.stderr and "check --broker" in proc.stderr
