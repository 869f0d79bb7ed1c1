"""Issue 13, item 6, against the real agent: the disk refuses writes while the broker is away, frames keep
coming, and still every verdict arrives, in frame order.

How the disk is made to fail: the tests run as root, for whom permissions (chmod) change nothing. `chattr +i`
on the outbox files kills the process with SIGBUS (SQLite maps its -shm file), which is no test of the
agent; a bind mount remounted read-only does not stop writes through files already open. What root cannot
escape is the kernel's file-size limit: with RLIMIT_FSIZE lowered to 1 byte on the running agent (prlimit),
every write past the first byte fails with EFBIG, which SQLite reports as "disk I/O error", exactly as it
reports a full or failing disk; raising the limit again is the disk recovering. (The agent ignores SIGXFSZ,
so the limit is a write error, not a kill; systemd's LimitFSIZE= would behave the same.)"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import pytest

from tests.builders import plain_part_images
from tests.integration.conftest import Recorder, base_config, wait_until, write_images
from tests.integration.test_agent_outage import check_delivery, outbox_depth

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASE = "yugami/cam1"
FRAMES = 150
FPS = 5
DOWN_S = 6.0


def disk_fails(pid: int) -> None:
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, hard))


def disk_recovers(pid: int) -> None:
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))


def distinct(rec: Recorder) -> int:
    return len({v["id"] for v in rec.json_on(f"{BASE}/verdict")})


def events(rec: Recorder, name: str) -> list[dict]:
    return [e for e in rec.json_on(f"{BASE}/event") if e["event"] == name]


def test_disk_failing_while_the_broker_is_down_loses_no_verdict(tmp_path: Path, tiny_bundle: Path, mosquitto,
                                                                agents, record_property) -> None:
    folder = tmp_path / "in"
    names = write_images(folder, plain_part_images(FRAMES, seed=61))
    state = tmp_path / "state"
    rec = Recorder(mosquitto.port, [f"{BASE}/verdict", f"{BASE}/event"], persistent=True, name="disk-recorder")
    cfg = base_config(tmp_path, tiny_bundle, mosquitto.port, str(folder), capture={"max_fps": FPS},
                      mqtt={"stats_interval_s": 30}, outbox={"retry_s": 1.0})
    agent = agents(cfg)
    pid = agent.proc.pid
    wait_until(lambda: distinct(rec) >= 10, 90, "the first 10 verdicts")

    # 1. Broker away and disk failing: verdicts wait in memory; the broker back first takes them from there.
    mosquitto.stop()
    disk_fails(pid)
    frozen = outbox_depth(state)
    time.sleep(DOWN_S)
    assert agent.alive(), agent.logs()
    assert outbox_depth(state) == frozen, "nothing can have been written to the outbox"
    mosquitto.start()
    wait_until(lambda: events(rec, "outbox_degraded"), 30, "the outbox_degraded event")
    during = distinct(rec)
    wait_until(lambda: distinct(rec) >= during + 10, 30, "verdicts from memory with the disk still failing")
    disk_recovers(pid)
    wait_until(lambda: events(rec, "outbox_recovered"), 30, "the outbox_recovered event")

    # 2. Broker away and disk failing again; the disk recovers first: the held verdicts are written to it.
    mosquitto.stop()
    disk_fails(pid)
    time.sleep(DOWN_S)
    before = outbox_depth(state)
    disk_recovers(pid)
    wait_until(lambda: outbox_depth(state) >= before + 10, 30, "held verdicts re-persisted into the outbox")
    mosquitto.start()

    wait_until(lambda: distinct(rec) >= FRAMES, 120, f"all {FRAMES} verdicts")
    verdicts = rec.json_on(f"{BASE}/verdict")
    repeats = check_delivery(verdicts, names)
    degraded = events(rec, "outbox_degraded")
    record_property("redeliveries", repeats)
    print(f"disk failing twice with the broker away: {len(verdicts)} messages for {FRAMES} frames, "
          f"{repeats} redelivered, {len(degraded)} outbox_degraded events")
    assert len(degraded) == 2 and "disk I/O error" in degraded[0]["error"]
    assert agent.terminate() == 0, agent.logs()
    assert outbox_depth(state) == 0
    rec.close()
