"""Issue 14, item 2, against the real agent and a real mosquitto: ``yugami-fleet push`` sends a signed demo
bundle in chunks; the box verifies, shadow-scores, switches between two frames (verdict ids stay contiguous,
none lost), keeps it across a restart (installed.json) and goes back on ``yugami-fleet rollback``. A bundle
that calls every frame anomalous is refused by the shadow gate, and with shadow scoring off it is switched in
and rolled back by the watch on its own; an unsigned bundle is refused while the bundle in use stays."""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from demo.synthetic import normal_part
from fleet.cli import main as fleet_main
from fleet.keys import generate_keypair, sign_bundle
from tests.integration.conftest import ROOT, Recorder, base_config, wait_until, write_images

pytestmark = pytest.mark.integration

DEMO = ROOT / "models" / "demo"
BASE = "yugami/cam1"
ID_RE = re.compile(r"^f_(\d+)-")


class DemoFrames(threading.Thread):
    """A new synthetic normal part in the folder every ``period_s``, named f_0000.png, f_0001.png, ..."""

    def __init__(self, folder: Path, period_s: float = 0.15) -> None:
        super().__init__(daemon=True)
        self.folder = folder
        self.period_s = period_s
        rng = np.random.default_rng(7)
        self.images = [normal_part(rng, 256) for _ in range(12)]
        self.stop = threading.Event()
        self.n = 0

    def run(self) -> None:
        while not self.stop.is_set():
            write_images(self.folder, [self.images[self.n % len(self.images)]], prefix="f", start=self.n)
            self.n += 1
            self.stop.wait(self.period_s)


def demo_copy(out: Path, version: str, key: Path | None, threshold: float | None = None) -> Path:
    """The demo bundle with another model.version (and threshold), signed with ``key`` unless None."""
    shutil.copytree(DEMO, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model"]["version"] = version
    if threshold is not None:
        manifest["threshold"]["value"] = threshold
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (out / "signature.json").unlink(missing_ok=True)
    if key is not None:
        sign_bundle(out, key)
    return out


def manifest_sha(bundle: Path) -> str:
    import hashlib

    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


@pytest.fixture()
def fleet_setup(tmp_path: Path, mosquitto: Any, agents: Any) -> Any:
    keys = tmp_path / "keys"
    private, public = generate_keypair(keys, "release")
    v1 = demo_copy(tmp_path / "v1", "1", private)
    folder = tmp_path / "in"
    folder.mkdir()
    frames = DemoFrames(folder)
    rec = Recorder(mosquitto.port, [f"{BASE}/verdict", f"{BASE}/event", f"{BASE}/cmd/+/result"])
    cfg = base_config(tmp_path, v1, mosquitto.port, str(folder),
                      bundle_trust={"public_keys": [str(public)]},
                      fleet={"groups": ["line-2"], "shadow_frames": 8, "watch_frames": 10, "max_anomaly_share": 0.5},
                      service={"recent_frames": 16})
    frames.start()
    yield {"tmp": tmp_path, "key": private, "v1": v1, "cfg": cfg, "rec": rec, "port": mosquitto.port,
           "start": lambda: agents(cfg), "frames": frames}
    frames.stop.set()
    rec.close()


def verdicts(rec: Recorder) -> list[dict[str, Any]]:
    return rec.json_on(f"{BASE}/verdict")


def events(rec: Recorder, name: str) -> list[dict[str, Any]]:
    return [e for e in rec.json_on(f"{BASE}/event") if e["event"] == name]


def more_verdicts(rec: Recorder, agent: Any, n: int, what: str) -> None:
    seen = len(verdicts(rec))
    wait_until(lambda: len(verdicts(rec)) >= seen + n or not agent.alive(), 120, what)
    assert agent.alive(), agent.logs()


def fleet(capsys: Any, *argv: str) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    rc = fleet_main(list(argv))
    return rc, json.loads(capsys.readouterr().out)


def assert_contiguous(rec: Recorder) -> None:
    """Every written frame up to the last inspected one has exactly one verdict: none lost, none twice."""
    numbers = [int(ID_RE.match(v["id"]).group(1)) for v in verdicts(rec)]  # type: ignore[union-attr]
    assert sorted(numbers) == list(range(min(numbers), max(numbers) + 1)), numbers


def test_a_signed_push_switches_between_frames_survives_a_restart_and_rolls_back(fleet_setup: Any,
                                                                                 capsys: Any) -> None:
    s = fleet_setup
    rec, tmp = s["rec"], s["tmp"]
    v2 = demo_copy(tmp / "v2", "2", s["key"])
    old_sha, new_sha = manifest_sha(s["v1"]), manifest_sha(v2)
    agent = s["start"]()
    more_verdicts(rec, agent, 10, "10 verdicts before the push")
    broker = ["--broker", f"127.0.0.1:{s['port']}", "--json", "--timeout", "120"]

    rc, report = fleet(capsys, "push", str(v2), "--device", "cam1", *broker)
    assert rc == 0, (report, agent.logs())
    (box,) = report["boxes"]
    assert box["ok"] and box["before"] == "1" and box["after"] == "2", box
    assert box["shadow"]["frames"] == 8 and box["shadow"]["anomaly_share"] <= 0.5
    assert report["bundle"]["chunks"] == 15 and set(report["times"]) >= {"send_s", "wait_s", "total_s"}
    for name in ("install_started", "install_verified", "install_shadow", "installed"):
        assert events(rec, name), name
    assert events(rec, "installed")[0]["model"]["signer"]["name"] == "release"

    more_verdicts(rec, agent, 12, "12 verdicts after the switch")
    shas = [v["model"]["sha256"] for v in verdicts(rec)]
    switch = shas.index(new_sha)
    assert set(shas[:switch]) == {old_sha} and set(shas[switch:]) == {new_sha}  # one switch, between frames
    assert_contiguous(rec)
    installed = json.loads((tmp / "state" / "bundles" / "installed.json").read_text())
    assert installed["current"].startswith("yugami-demo-parts-2-") and installed["previous"] == str(s["v1"])

    # a restart keeps the installed bundle
    assert agent.terminate() == 0, agent.logs()
    seen = len(verdicts(rec))
    agent = s["start"]()
    wait_until(lambda: len(verdicts(rec)) >= seen + 3 or not agent.alive(), 120, "verdicts after the restart")
    assert {v["model"]["sha256"] for v in verdicts(rec)[seen:]} == {new_sha}, agent.logs()

    # and cmd/rollback goes back to the previous one (loaded from its folder: no watch after a restart)
    rc, report = fleet(capsys, "rollback", "--device", "cam1", *broker)
    assert rc == 0 and report["boxes"][0]["after"] == "1", report
    assert events(rec, "rolled_back")[-1]["reason"] == "cmd/rollback"
    seen = len(verdicts(rec))
    more_verdicts(rec, agent, 5, "verdicts after the rollback")
    assert verdicts(rec)[-1]["model"]["sha256"] == old_sha
    assert_contiguous(rec)
    assert agent.terminate() == 0, agent.logs()


def test_the_health_gate_refuses_or_rolls_back_a_bad_bundle_and_an_unsigned_one_is_refused(fleet_setup: Any,
                                                                                           capsys: Any) -> None:
    s = fleet_setup
    rec, tmp = s["rec"], s["tmp"]
    bad = demo_copy(tmp / "bad", "3", s["key"], threshold=0.0)  # every frame anomalous
    unsigned = demo_copy(tmp / "unsigned", "4", None)
    old_sha = manifest_sha(s["v1"])
    agent = s["start"]()
    more_verdicts(rec, agent, 10, "10 verdicts before the push")
    broker = ["--broker", f"127.0.0.1:{s['port']}", "--json", "--timeout", "120"]

    # to the group: the box knows it is in line-2 from its config, and says so in its stats
    rc, report = fleet(capsys, "push", str(bad), "--group", "line-2", *broker)
    assert rc == 1, report
    (box,) = report["boxes"]
    assert box["device"] == "cam1" and not box["ok"] and "health gate" in box["error"], box
    assert box["shadow"]["anomaly_share"] == 1.0 and box["shadow"]["old_anomaly_share"] <= 0.5
    assert "health gate" in events(rec, "install_refused")[-1]["error"]

    rc, report = fleet(capsys, "push", str(bad), "--device", "cam1", "--no-shadow", *broker)
    assert rc == 0 and report["boxes"][0]["after"] == "3", report  # switched in ...
    rolled = rec.wait_json(f"{BASE}/event", lambda e: e["event"] == "rolled_back", timeout=120,
                           what="the watch's rollback")
    assert "watch" in rolled["reason"] and rolled["model"]["version"] == "1" and rolled["from"]["version"] == "3"
    more_verdicts(rec, agent, 5, "verdicts after the automatic rollback")  # ... and out again by itself
    assert verdicts(rec)[-1]["model"]["sha256"] == old_sha
    bad_verdicts = [v for v in verdicts(rec) if v["model"]["sha256"] == manifest_sha(bad)]
    assert 0 < len(bad_verdicts) <= 10 and {v["verdict"] for v in bad_verdicts} == {"anomaly"}
    installed = json.loads((tmp / "state" / "bundles" / "installed.json").read_text())
    assert installed["current"] == str(s["v1"]) and installed["previous"].startswith("yugami-demo-parts-3-")

    rc, report = fleet(capsys, "push", str(unsigned), "--device", "cam1", *broker)
    assert rc == 1 and "unsigned" in report["boxes"][0]["error"], report
    more_verdicts(rec, agent, 3, "verdicts after the unsigned push")
    assert verdicts(rec)[-1]["model"]["sha256"] == old_sha
    assert_contiguous(rec)
    assert not [p for p in (tmp / "state" / "bundles").iterdir() if p.name.startswith("yugami-demo-parts-4")]
    assert agent.terminate() == 0, agent.logs()


def test_a_group_push_reaches_every_member_once_each(tmp_path: Path, mosquitto: Any, agents: Any, capsys: Any) -> None:
    """cam-off refuses (fleet.install: off) with one answer for the whole transfer, not one per chunk; cam-any
    (install: any, no keys) already runs this very bundle: ok, unchanged, no switch."""
    bundle = demo_copy(tmp_path / "v1", "1", None)
    rec = Recorder(mosquitto.port, ["yugami/+/cmd/install/result", "yugami/+/verdict"])
    writers = []
    for device, install in (("cam-off", "off"), ("cam-any", "any")):
        folder = tmp_path / f"in-{device}"
        folder.mkdir()
        writers.append(DemoFrames(folder))
        cfg = base_config(tmp_path, bundle, mosquitto.port, str(folder), device=device,
                          storage={"dir": str(tmp_path / f"state-{device}")},
                          fleet={"groups": ["line-2"], "install": install, "shadow_frames": 4})
        agents(cfg, name=device)
    for w in writers:
        w.start()
    try:
        for device in ("cam-off", "cam-any"):
            wait_until(lambda d=device: len(rec.on(f"yugami/{d}/verdict")) >= 5, 120, f"verdicts of {device}")
        rc, report = fleet(capsys, "push", str(bundle), "--group", "line-2", "--broker", f"127.0.0.1:{mosquitto.port}",
                           "--json", "--timeout", "60")
        assert rc == 1, report
        boxes = {b["device"]: b for b in report["boxes"]}
        assert set(boxes) == {"cam-off", "cam-any"}, report
        assert not boxes["cam-off"]["ok"] and "fleet.install is 'off'" in boxes["cam-off"]["error"]
        assert boxes["cam-any"]["ok"] and boxes["cam-any"]["after"] == "1"
        assert len(rec.on("yugami/cam-off/cmd/install/result")) == 1
        (answer,) = rec.json_on("yugami/cam-any/cmd/install/result")
        assert answer["unchanged"] is True
        sha = manifest_sha(bundle)
        assert {v["model"]["sha256"] for v in rec.json_on("yugami/cam-any/verdict")} == {sha}
    finally:
        for w in writers:
            w.stop.set()
        rec.close()


def test_an_installed_bundle_that_no_longer_loads_falls_back_to_the_configs(tmp_path: Path, mosquitto: Any,
                                                                            agents: Any) -> None:
    bundle = demo_copy(tmp_path / "v1", "1", None)
    broken = demo_copy(tmp_path / "state" / "bundles" / "yugami-demo-parts-2-0123456789ab", "2", None)
    (broken / "bank.npz").write_bytes(b"damaged")
    (tmp_path / "state" / "bundles" / "installed.json").write_text(json.dumps(
        {"current": broken.name, "previous": None, "config_bundle": str(bundle)}))
    folder = tmp_path / "in"
    folder.mkdir()
    frames = DemoFrames(folder)
    rec = Recorder(mosquitto.port, [f"{BASE}/verdict", f"{BASE}/event"])
    agent = agents(base_config(tmp_path, bundle, mosquitto.port, str(folder), fleet={"install": "any"}))
    frames.start()
    try:
        event = rec.wait_json(f"{BASE}/event", lambda e: e["event"] == "install_fallback", timeout=120,
                              what="install_fallback")
        assert "no longer loads" in event["error"] and "bank.npz" in event["error"], event
        more_verdicts(rec, agent, 3, "verdicts with the config's bundle")
        assert {v["model"]["sha256"] for v in verdicts(rec)} == {manifest_sha(bundle)}
        installed = json.loads((tmp_path / "state" / "bundles" / "installed.json").read_text())
        assert installed["current"] == str(bundle) and installed["previous"] == broken.name
        assert agent.terminate() == 0, agent.logs()
    finally:
        frames.stop.set()
        rec.close()
