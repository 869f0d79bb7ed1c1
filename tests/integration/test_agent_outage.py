"""Nothing lost while the broker is away: a 20 s outage mid-run, and the same with the agent SIGKILLed
and restarted during it. Every frame's verdict must arrive, in frame order; a repeat is allowed only as a
redelivery of the same frame id, and the tests count them."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tests.builders import plain_part_images
from tests.integration.conftest import Recorder, base_config, wait_until, write_images

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASE = "yugami/cam1"
FRAMES = 125  # at 5 frames/s the run lasts at least 25 s, so it spans the whole 20 s outage
FPS = 5
OUTAGE_S = 20.0


def outbox_depth(state: Path) -> int:
    db = state / "outbox.sqlite3"
    if not db.exists():
        return 0
    with sqlite3.connect(str(db), timeout=5) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])


def check_delivery(verdicts: list[dict[str, Any]], names: list[str]) -> int:
    """Assert every frame arrived in frame order; return how many repeats (same id again) there were."""
    first_source: dict[str, str] = {}
    order: list[str] = []
    repeats = 0
    for v in verdicts:
        name = Path(v["source"]).name
        if v["id"] in first_source:
            assert first_source[v["id"]] == name, f"id {v['id']} reused for another frame"
            repeats += 1
            continue
        first_source[v["id"]] = name
        order.append(name)
    assert order == names, "verdicts missing or out of frame order"
    return repeats


def ts_epoch(ts: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def setup_run(tmp_path: Path, tiny_bundle: Path, mosquitto) -> tuple[list[str], Recorder, dict[str, Any]]:
    folder = tmp_path / "in"
    names = write_images(folder, plain_part_images(FRAMES, seed=21))
    # A persistent session: the broker keeps (and saves across its restart) what arrives while we are away.
    rec = Recorder(mosquitto.port, [f"{BASE}/verdict"], persistent=True, name="outage-recorder")
    cfg = base_config(tmp_path, tiny_bundle, mosquitto.port, str(folder), capture={"max_fps": FPS},
                      mqtt={"stats_interval_s": 30})
    return names, rec, cfg


def test_broker_down_20s_every_verdict_arrives_in_order(tmp_path: Path, tiny_bundle: Path, mosquitto,
                                                          agents, record_property) -> None:
    names, rec, cfg = setup_run(tmp_path, tiny_bundle, mosquitto)
    agent = agents(cfg)
    wait_until(lambda: len(rec.on(f"{BASE}/verdict")) >= 10, 60, "the first 10 verdicts")
    mosquitto.stop()
    t_down = time.time()
    wait_until(lambda: outbox_depth(tmp_path / "state") >= 20, 30, "verdicts piling up in the outbox")
    time.sleep(max(0.0, t_down + OUTAGE_S - time.time()))  # the outage itself is the experiment
    mosquitto.start()
    t_up = time.time()
    wait_until(lambda: len({v["id"] for v in rec.json_on(f"{BASE}/verdict")}) >= FRAMES, 120,
               f"all {FRAMES} verdicts after the broker came back")
    verdicts = rec.json_on(f"{BASE}/verdict")
    repeats = check_delivery(verdicts, names)
    record_property("redeliveries", repeats)
    print(f"broker outage: {len(verdicts)} messages for {FRAMES} frames, {repeats} redelivered")
    during = [v for v in verdicts if t_down < ts_epoch(v["ts"]) < t_up]
    assert len(during) >= 20, "the agent should have kept inspecting while the broker was down"
    assert agent.terminate() == 0, agent.logs()
    assert outbox_depth(tmp_path / "state") == 0
    rec.close()


def test_agent_sigkilled_while_broker_down_loses_nothing(tmp_path: Path, tiny_bundle: Path, mosquitto,
                                                         agents, record_property) -> None:
    names, rec, cfg = setup_run(tmp_path, tiny_bundle, mosquitto)
    state = tmp_path / "state"
    first = agents(cfg)
    wait_until(lambda: len(rec.on(f"{BASE}/verdict")) >= 10, 60, "the first 10 verdicts")
    mosquitto.stop()
    t_down = time.time()
    wait_until(lambda: outbox_depth(state) >= 10, 30, "verdicts piling up in the outbox")
    first.kill()
    left_behind = outbox_depth(state)
    second = agents(cfg)
    # The new agent keeps the old rows and goes on with the folder where the first one stopped.
    wait_until(lambda: outbox_depth(state) >= left_behind + 10, 60, "the restarted agent inspecting")
    time.sleep(max(0.0, t_down + OUTAGE_S - time.time()))
    mosquitto.start()
    wait_until(lambda: len({v["id"] for v in rec.json_on(f"{BASE}/verdict")}) >= FRAMES, 120,
               f"all {FRAMES} verdicts after the broker came back")
    verdicts = rec.json_on(f"{BASE}/verdict")
    repeats = check_delivery(verdicts, names)
    record_property("redeliveries", repeats)
    print(f"SIGKILL during outage: {len(verdicts)} messages for {FRAMES} frames, {repeats} redelivered, "
          f"{left_behind} left in the outbox by the killed agent")
    assert second.terminate() == 0, second.logs()
    assert outbox_depth(state) == 0
    rec.close()
