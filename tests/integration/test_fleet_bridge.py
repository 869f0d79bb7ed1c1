"""The fleet on bridged brokers at N=3 (bench/fleet.py's scenario, the same code): a site mosquitto bridged to a
central one, three agents on the site broker, yugami-fleet on the central broker. Status sees all three; a
signed rollout reaches all three; a bundle that fails the health gate is refused by each (shadow on) and, with
--no-shadow, switched in and rolled back by each; no verdict is lost across the bridge meanwhile. Both bridge
configurations docs/FLEET.md gives are run: yugami/# both ways, and the narrower out/in topics."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fleet import run_scenario
from tests.integration.conftest import MOSQUITTO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 3


@pytest.mark.parametrize("bridge", ["both", "narrow"])
def test_bridged_fleet_rollout_refusal_and_rollback(tmp_path: Path, bridge: str) -> None:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    report = run_scenario(tmp_path, N, fps=2.0, log=lambda *a: None, bridge=bridge)
    assert report["status"]["rc"] == 0 and report["status"]["online"] == N, report["status"]
    assert report["status"]["versions"] == ["1"]
    assert report["status"]["signers"] == [s for s in report["status"]["signers"] if s.startswith("bench/")]

    good, refused, unshadowed = report["phases"]
    assert good["rc"] == 0 and good["ok"] == N, good
    assert set(good["versions"].values()) == {"2"}
    assert refused["rc"] == 1 and refused["answered"] == N and refused["ok"] == 0, refused
    assert set(refused["versions"].values()) == {"2"}  # the bundle in use stays
    assert unshadowed["answered"] == N, unshadowed
    assert set(unshadowed["versions"].values()) == {"2"}  # switched, then rolled back by itself
    assert report["rollback_reasons"] and all(r != "None" for r in report["rollback_reasons"])

    delivery = report["delivery"]
    assert delivery["produced"] > 0
    assert delivery["received"] == delivery["produced"], delivery
    assert delivery["missing"] == 0 and delivery["duplicates"] == 0 and not delivery["restarted"], delivery
    assert report["dead"] == [] and set(report["exit_codes"].values()) == {0}, report["exit_codes"]
