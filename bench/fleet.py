"""The fleet on bridged brokers (issue 14, item 6): a site mosquitto bridged to a central one, N agent processes
on the site broker, ``yugami-fleet`` on the central broker.

1. Two mosquitto brokers: the site broker runs mosquitto's own bridge (``connection`` ... ``topic yugami/# both
   1``, ``cleansession false``) to the central broker.
2. N agents (default 50) on the site broker, each reading the same small looping video (synthetic parts from
   demo/synthetic.py, one defect in ten) at ``capture.max_fps``, one TFLite thread, the demo bundle (models/demo)
   signed as version 1; every box trusts the bench's key and is in the group ``site-a``.
3. ``yugami-fleet status`` on the central broker: all N online.
4. A signed rollout of version 2 to the group (``yugami-fleet push --group site-a`` on the central broker).
5. A bad bundle (version 3, threshold 0: every frame an anomaly), signed: with shadow scoring every box refuses
   it; with ``--no-shadow`` every box switches, fails its watch and rolls back by itself to version 2.

Meanwhile a subscriber on the central broker (QoS 1) keeps every verdict id, so verdicts produced (the agents'
frame counters from their stats) are compared with verdicts received at the central broker, per box and
per phase, and each box's ids are checked for gaps. Figures: rollout wall times, produced vs received, each
box's model version after each phase, broker RSS (both) and agent RSS. Writes bench/results/fleet.md.

    .venv/bin/python bench/fleet.py [--boxes 50] [--fps 0.5]

tests/integration/test_fleet_bridge.py runs the same scenario (this module's :func:`run_scenario`) at N=3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench._service import DEMO_BUNDLE, ROOT, machine, rss_kb
from tests.integration.conftest import AgentProcess, Mosquitto, wait_until, write_config

logger = logging.getLogger("bench.fleet")

PREFIX = "yugami"
GROUP = "site-a"
OUT = ROOT / "bench" / "results" / "fleet.md"
VIDEO_FRAMES = 20  # one defect in ten (demo.synthetic.video_schedule)


# --- brokers ------------------------------------------------------------------------------------------------


# The bridge's topics, as docs/FLEET.md gives them: everything under the prefix both ways, or the narrower form
# where telemetry only goes out and commands only come in.
BRIDGE_TOPICS = {
    "both": [f"topic {PREFIX}/# both 1"],
    "narrow": [
        *(f"topic {PREFIX}/+/{t} out 1" for t in ("verdict", "state", "stats", "available", "event", "cmd/+/result")),
        f"topic {PREFIX}/+/gradcam/# out 0",
        f"topic {PREFIX}/+/cmd/+ in 1",
        f"topic {PREFIX}/group/# in 1",
    ],
}
PROBE = f"{PREFIX}/_bench/probe"


def bridge_lines(central_port: int, name: str = "site-a", topics: str = "both") -> list[str]:
    """mosquitto.conf lines that bridge this broker to the central one at QoS 1, with a persistent session on
    the central broker (cleansession false) so messages for the site queue there while the link is down."""
    return [
        f"connection {name}",
        f"address 127.0.0.1:{central_port}",
        *BRIDGE_TOPICS[topics],
        f"topic {PROBE} out 1",  # the bench's own check that the bridge is up
        "cleansession false",
        f"remote_clientid bridge-{name}",
        "bridge_protocol_version mqttv311",
        "try_private true",
        "restart_timeout 1 5",
        "notifications false",
    ]


def start_brokers(work: Path, topics: str = "both") -> tuple[Mosquitto, Mosquitto]:
    """(central, site), both started; the site broker's bridge to the central one carries messages."""
    (work / "central").mkdir(parents=True)
    (work / "site").mkdir()
    central = Mosquitto(work / "central")
    site = Mosquitto(work / "site")
    # Bridge options go last: mosquitto reads every line after 'connection' as that bridge's.
    site.conf.write_text(site.conf.read_text() + "\n".join(bridge_lines(central.port, topics=topics)) + "\n")
    try:
        central.start()
        site.start()
        wait_until(lambda: _bridge_carries(site.port, central.port), 30, "the site broker's bridge to the central one",
                   interval=0.5)
    except AssertionError:
        _stop(site, central)
        raise RuntimeError(f"the bridge did not come up:\n{site.log.read_text()[-2000:]}") from None
    except BaseException:
        _stop(site, central)
        raise
    return central, site


def _stop(*brokers: Mosquitto) -> None:
    for broker in brokers:
        broker.stop()  # a no-op for one not started


def _client(port: int, name: str, clean: bool = True) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}-{time.time_ns()}",
                         clean_session=clean)
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    return client


def _bridge_carries(site_port: int, central_port: int) -> bool:
    """A message published on the site broker reaches a subscriber on the central broker."""
    got = threading.Event()
    subscribed = threading.Event()
    topic = PROBE
    central = _client(central_port, "probe-sub")
    central.on_subscribe = lambda *a: subscribed.set()
    central.on_message = lambda *a: got.set()
    central.subscribe(topic, 1)
    site = _client(site_port, "probe-pub")
    try:
        subscribed.wait(5)
        site.publish(topic, b"x", qos=1)
        return got.wait(1.0)
    finally:
        for c in (central, site):
            c.disconnect()
            c.loop_stop()


# --- bundles, frames, agents -----------------------------------------------------------------------------------


@dataclass
class Bundles:
    key: Path
    public: Path
    v1: Path
    v2: Path
    bad: Path


def _variant(src: Path, dest: Path, key: Path, version: str, threshold: float | None = None) -> Path:
    """A copy of ``src`` with model.version (and the threshold) changed, signed with ``key``."""
    from fleet.keys import sign_bundle

    shutil.copytree(src, dest)
    (dest / "signature.json").unlink(missing_ok=True)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["model"]["version"] = version
    if threshold is not None:
        manifest["threshold"]["value"] = threshold
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    sign_bundle(dest, key, "bench")
    return dest


def make_bundles(work: Path, src: Path = DEMO_BUNDLE) -> Bundles:
    """A key pair and three signed bundles from ``src``: version 1 (what the boxes start with), 2 (the good
    rollout) and 3 with threshold 0 (every frame an anomaly: fails any health gate)."""
    from fleet.keys import generate_keypair

    key, public = generate_keypair(work / "keys", "bench")
    return Bundles(key, public, _variant(src, work / "bundles" / "v1", key, "1"),
                   _variant(src, work / "bundles" / "v2", key, "2"),
                   _variant(src, work / "bundles" / "v3-bad", key, "3", threshold=0.0))


def make_video(work: Path) -> Path:
    """The clip every agent loops over: synthetic parts, one in ten defective."""
    from demo.synthetic import write_video

    path = work / "parts.avi"
    write_video(path, n_frames=VIDEO_FRAMES, anomaly_every=10, size=256, fps=10.0, seed=0)
    return path


def device_name(i: int) -> str:
    return f"box{i:02d}"


def agent_config(work: Path, device: str, port: int, video: Path, bundles: Bundles, fps: float) -> dict[str, Any]:
    return {
        "device_id": device,
        "bundle": str(bundles.v1),
        "threads": 1,
        "capture": {"source": str(video), "kind": "video", "loop": True, "max_fps": fps, "settle_s": 0},
        "mqtt": {"host": "127.0.0.1", "port": port, "topic_prefix": PREFIX, "stats_interval_s": 2,
                 "reconnect_min_s": 1, "reconnect_max_s": 5, "keepalive_s": 30,
                 "homeassistant": {"enabled": False}},
        "storage": {"dir": str(work / "state" / device)},
        "service": {"ready_timeout_s": 120, "log_level": "info"},
        "bundle_trust": {"public_keys": [str(bundles.public)]},
        # The gate looks at 8 recent frames before a switch and at the first 6 after one: at a frame every
        # two seconds, a bad bundle switched in without shadow scoring is rolled back in about 12 s.
        "fleet": {"groups": [GROUP], "shadow_frames": 8, "watch_frames": 6},
    }


def start_agents(work: Path, n: int, port: int, video: Path, bundles: Bundles, fps: float,
                 agents: list[AgentProcess]) -> None:
    """Start N agents, each appended to ``agents`` as it starts (so a failure part way leaves them to stop)."""
    (work / "agents").mkdir(exist_ok=True)
    for i in range(n):
        device = device_name(i)
        cfg = write_config(work / "agents" / f"{device}.yaml", **agent_config(work, device, port, video, bundles, fps))
        agents.append(AgentProcess(cfg, work / "agents" / f"{device}.log", {"OMP_NUM_THREADS": "1"}))


# --- the central broker's view -------------------------------------------------------------------------------


@dataclass
class BoxView:
    runs: dict[str, set[int]] = field(default_factory=dict)  # run id -> frame sequence numbers received
    duplicates: int = 0
    stats: dict[str, Any] | None = None
    stats_at: float = 0.0  # monotonic time the latest stats arrived
    events: list[dict[str, Any]] = field(default_factory=list)
    available: str | None = None


class CentralLedger:
    """A QoS 1 subscriber on the central broker keeping every verdict id, the latest stats and the events of
    every box."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.boxes: dict[str, BoxView] = {}
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ledger-{os.getpid()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [(f"{PREFIX}/+/{t}", 1) for t in ("verdict", "stats", "event", "available")])
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.max_inflight_messages_set(100)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not self.subscribed.wait(15):
            raise RuntimeError("the central broker's ledger could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        if len(parts) != 3:
            return
        device, kind = parts[1], parts[2]
        with self.lock:
            box = self.boxes.setdefault(device, BoxView())
            if kind == "available":
                box.available = msg.payload.decode()
                return
            body = json.loads(msg.payload)
            if kind == "verdict":
                run, _, seq = body["id"].rpartition("-")
                seqs = box.runs.setdefault(run, set())
                if int(seq) in seqs:
                    box.duplicates += 1
                seqs.add(int(seq))
            elif kind == "stats":
                box.stats, box.stats_at = body, time.monotonic()
            elif kind == "event":
                box.events.append(body)

    def view(self, device: str) -> BoxView:
        with self.lock:
            return self.boxes.setdefault(device, BoxView())

    def fresh_stats(self, devices: list[str], since: float, timeout: float = 60) -> dict[str, dict[str, Any]]:
        """Each box's first stats that arrived after ``since`` (monotonic)."""

        def all_fresh() -> dict[str, dict[str, Any]] | None:
            with self.lock:
                boxes = [self.boxes.get(d) for d in devices]
                if all(b is not None and b.stats is not None and b.stats_at > since for b in boxes):
                    return {d: dict(b.stats) for d, b in zip(devices, boxes, strict=True)}  # type: ignore[union-attr]
            return None

        return wait_until(all_fresh, timeout, f"fresh stats from all {len(devices)} boxes", interval=0.2)

    def frames(self, devices: list[str], timeout: float = 60) -> dict[str, int]:
        stats = self.fresh_stats(devices, time.monotonic(), timeout)
        return {d: int(s["frames"]) for d, s in stats.items()}

    def received(self, device: str, after: int, upto: int) -> int:
        """Verdicts of the box's current run with after < sequence number <= upto, received here."""
        with self.lock:
            box = self.boxes.get(device)
            if box is None or not box.runs:
                return 0
            seqs = box.runs[max(box.runs, key=lambda r: len(box.runs[r]))]
            return sum(1 for s in seqs if after < s <= upto)

    def gaps(self, device: str) -> dict[str, Any]:
        with self.lock:
            box = self.boxes.get(device) or BoxView()
            return {"runs": len(box.runs), "duplicates": box.duplicates,
                    "missing": sum(max(s) - min(s) + 1 - len(s) for s in box.runs.values() if s),
                    "first": {r: min(s) for r, s in box.runs.items() if s}}

    def events(self, device: str, name: str) -> list[dict[str, Any]]:
        with self.lock:
            box = self.boxes.get(device)
            return [e for e in box.events if e.get("event") == name] if box else []

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- yugami-fleet on the central broker -----------------------------------------------------------------------


def fleet(port: int, *args: str, timeout: float = 900) -> tuple[int, Any, float]:
    """``yugami-fleet ARGS --broker central --json`` in its own process: (exit status, parsed JSON, wall s)."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fleet.cli", *args, "--broker", f"127.0.0.1:{port}", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - started
    try:
        body = json.loads(proc.stdout)
    except ValueError:
        raise RuntimeError(f"yugami-fleet {' '.join(args)} printed no JSON (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}") from None
    return proc.returncode, body, wall


def versions(ledger: CentralLedger, devices: list[str], since: float) -> dict[str, str | None]:
    stats = ledger.fresh_stats(devices, since)
    return {d: (s.get("model") or {}).get("version") for d, s in stats.items()}


# --- the scenario ---------------------------------------------------------------------------------------------


@dataclass
class Fleet:
    work: Path
    central: Mosquitto
    site: Mosquitto
    bundles: Bundles
    agents: list[AgentProcess]
    devices: list[str]
    ledger: CentralLedger

    def stop(self) -> dict[str, int]:
        """SIGTERM every agent, then the brokers; the agents' exit codes."""
        for a in self.agents:
            if a.alive():
                a.proc.send_signal(15)
        codes = {}
        for d, a in zip(self.devices, self.agents, strict=True):
            try:
                codes[d] = a.proc.wait(60)
            except subprocess.TimeoutExpired:
                a.kill()
                codes[d] = -9
        self.ledger.close()
        self.site.stop()
        self.central.stop()
        return codes

    def dead(self) -> list[str]:
        return [d for d, a in zip(self.devices, self.agents, strict=True) if not a.alive()]


def start_fleet(work: Path, n: int, fps: float, bridge: str = "both") -> Fleet:
    bundles = make_bundles(work)
    video = make_video(work)
    central, site = start_brokers(work, bridge)
    try:
        ledger = CentralLedger(central.port)  # before any agent: every verdict is counted from the first
    except BaseException:
        _stop(site, central)
        raise
    devices = [device_name(i) for i in range(n)]
    f = Fleet(work, central, site, bundles, [], devices, ledger)
    try:
        start_agents(work, n, site.port, video, bundles, fps, f.agents)
    except BaseException:  # the agents started so far, the ledger and the brokers go too
        f.devices = f.devices[:len(f.agents)]
        f.stop()
        raise
    return f


def wait_ready(f: Fleet, min_frames: int, timeout: float) -> None:
    """Every box online with enough frames inspected to shadow-score a bundle."""

    def ready() -> bool:
        if f.dead():
            raise RuntimeError(f"agents exited: {f.dead()}; see {f.work}/agents/*.log")
        for d in f.devices:
            box = f.ledger.view(d)
            if box.available != "online" or not box.stats or box.stats.get("frames", 0) < min_frames:
                return False
        return True

    wait_until(ready, timeout, f"all {len(f.devices)} boxes online with {min_frames} frames", interval=0.5)


def _phase(f: Fleet, name: str, push_args: list[str], report: dict[str, Any], settle: Any = None) -> dict[str, Any]:
    """One rollout: frames before, ``yugami-fleet push``, optional wait for the boxes to settle, frames after."""
    before = f.ledger.frames(f.devices)
    t0 = time.monotonic()
    rc, body, wall = fleet(f.central.port, "push", *push_args, "--group", GROUP, "--timeout", "600")
    settled_s = settle() - t0 if settle else None
    after_t = time.monotonic()
    versions_after = versions(f.ledger, f.devices, after_t)
    after = f.ledger.frames(f.devices)
    boxes = body.get("boxes", [])
    phase = {
        "name": name, "rc": rc, "wall_s": round(wall, 2), "times": body.get("times", {}),
        "answered": sum(1 for b in boxes if b.get("answered")), "ok": sum(1 for b in boxes if b.get("ok")),
        "box_wall_s": sorted(b["wall_s"] for b in boxes if b.get("wall_s") is not None),
        "errors": sorted({(b.get("error") or b.get("reason") or "")[:160] for b in boxes if not b.get("ok")}),
        "settled_s": None if settled_s is None else round(settled_s, 2),
        "versions": versions_after, "frames_before": before, "frames_after": after,
        "answered_versions": {b["device"]: b.get("after") for b in boxes},  # the model each box answered with
    }
    report["phases"].append(phase)
    return phase


def count_delivery(f: Fleet, phases: list[dict[str, Any]], timeout: float = 120) -> dict[str, Any]:
    """Produced (stats frame counters) vs received at the central broker, for the span of every rollout
    phase, once the stragglers have crossed the bridge."""
    first = phases[0]["frames_before"]
    last = phases[-1]["frames_after"]

    def caught_up() -> bool:
        return all(f.ledger.received(d, first[d], last[d]) >= last[d] - first[d] for d in f.devices)

    with contextlib.suppress(AssertionError):  # not caught up in time: reported as lost below
        wait_until(caught_up, timeout, "verdicts to reach the central broker", interval=0.5)
    out: dict[str, Any] = {"phases": []}
    for p in phases:
        produced = sum(p["frames_after"][d] - p["frames_before"][d] for d in f.devices)
        received = sum(f.ledger.received(d, p["frames_before"][d], p["frames_after"][d]) for d in f.devices)
        out["phases"].append({"name": p["name"], "produced": produced, "received": received})
    out["produced"] = sum(last[d] - first[d] for d in f.devices)
    out["received"] = sum(f.ledger.received(d, first[d], last[d]) for d in f.devices)
    gaps = {d: f.ledger.gaps(d) for d in f.devices}
    out["boxes_with_gaps"] = sorted(d for d, g in gaps.items() if g["missing"])
    out["missing"] = sum(g["missing"] for g in gaps.values())
    out["duplicates"] = sum(g["duplicates"] for g in gaps.values())
    out["restarted"] = sorted(d for d, g in gaps.items() if g["runs"] > 1)
    out["ids_from_1"] = all(list(g["first"].values()) == [1] for g in gaps.values())
    return out


def memory(f: Fleet) -> dict[str, Any]:
    agents = [kb for a in f.agents if (kb := rss_kb(a.proc.pid)) is not None]
    peaks = [kb for a in f.agents if (kb := rss_kb(a.proc.pid, "VmHWM")) is not None]
    mb = 1024.0
    return {
        "central_mb": round((rss_kb(f.central.proc.pid) or 0) / mb, 1),
        "site_mb": round((rss_kb(f.site.proc.pid) or 0) / mb, 1),
        "agent_median_mb": round(statistics.median(agents) / mb, 1) if agents else None,
        "agent_max_mb": round(max(agents) / mb, 1) if agents else None,
        "agent_peak_max_mb": round(max(peaks) / mb, 1) if peaks else None,
        "agents_total_mb": round(sum(agents) / mb, 1),
    }


def run_scenario(work: Path, n: int, fps: float, log: Any = print, bridge: str = "both") -> dict[str, Any]:
    """The whole run; returns the figures (and raises if a step cannot be carried out at all)."""
    report: dict[str, Any] = {"boxes": n, "fps": fps, "bridge": BRIDGE_TOPICS[bridge], "phases": []}
    t0 = time.monotonic()
    f = start_fleet(work, n, fps, bridge)
    try:
        wait_ready(f, min_frames=10, timeout=120 + 6 * n + 20 / fps)
        report["startup_s"] = round(time.monotonic() - t0, 1)
        log(f"{n} boxes online and inspecting after {report['startup_s']} s")

        rc, rows, wall = fleet(f.central.port, "status", "--wait", "3")
        report["status"] = {"rc": rc, "seen": len(rows), "online": sum(1 for r in rows if r["online"]),
                            "wall_s": round(wall, 2), "versions": sorted({str(r["version"]) for r in rows}),
                            "signers": sorted({str(r["signer"]) for r in rows})}
        log(f"yugami-fleet status on the central broker: {report['status']}")

        good = _phase(f, "good (v2)", [str(f.bundles.v2)], report)
        log(f"good rollout: {good['ok']}/{n} ok in {good['wall_s']} s")
        bad = _phase(f, "bad (v3, threshold 0), shadow on", [str(f.bundles.bad)], report)
        log(f"bad rollout, shadow: {bad['ok']}/{n} installed, {n - bad['ok']} refused in {bad['wall_s']} s")

        earlier = {d: len(f.ledger.events(d, "rolled_back")) for d in f.devices}

        def rolled_back() -> float:
            def done() -> bool:
                if f.dead():
                    raise RuntimeError(f"agents exited: {f.dead()}")
                return all(len(f.ledger.events(d, "rolled_back")) > earlier[d] for d in f.devices)

            wait_until(done, 120 + 40 / fps, "every box to roll back by itself", interval=0.2)
            return time.monotonic()

        unshadowed = _phase(f, "bad (v3), --no-shadow", [str(f.bundles.bad), "--no-shadow"], report,
                            settle=rolled_back)
        log(f"bad rollout, no shadow: {unshadowed['ok']}/{n} switched, all rolled back "
            f"{unshadowed['settled_s']} s after the push started")
        report["rollback_reasons"] = sorted({str(e.get("reason"))[:160] for d in f.devices
                                             for e in f.ledger.events(d, "rolled_back")})
        report["delivery"] = count_delivery(f, report["phases"])
        log(f"delivery: {report['delivery']}")
        report["memory"] = memory(f)
        report["dead"] = f.dead()
    finally:
        report["exit_codes"] = f.stop()
    return report


# --- output -----------------------------------------------------------------------------------------------------


def _versions_line(vs: dict[str, str | None]) -> str:
    counts: dict[str, int] = {}
    for v in vs.values():
        counts[str(v)] = counts.get(str(v), 0) + 1
    return ", ".join(f"{n} x " + (f"v{v}" if v != "None" else "none") for v, n in sorted(counts.items()))


def write_markdown(report: dict[str, Any], command: str, out: Path) -> str:
    n = report["boxes"]
    d = report["delivery"]
    m = report["memory"]
    lines = [
        f"# The fleet on bridged brokers: {n} agents (issue 14, item 6)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}; {time.strftime('%Y-%m-%d', time.gmtime())}. Two mosquitto brokers (site bridged "
        f"to central: `{'`, `'.join(report['bridge'])}`, `cleansession false`), {n} agent processes on the site broker "
        f"(looping synthetic video at {report['fps']} frames/s each, 1 TFLite thread, demo bundle signed as v1, "
        f"group `{GROUP}`), `yugami-fleet` on the central broker.",
        "",
        f"- Start-up: all {n} online and inspecting after {report['startup_s']} s.",
        f"- `yugami-fleet status` (central broker): {report['status']['online']} of {n} online, "
        f"versions {report['status']['versions']}, signers {report['status']['signers']}.",
        "",
        "| rollout | push exit | boxes ok | push wall time | first / median / last box answer | model in "
        "the answers | versions after (stats) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in report["phases"]:
        walls = p["box_wall_s"]
        spread = f"{walls[0]:.1f} / {statistics.median(walls):.1f} / {walls[-1]:.1f} s" if walls else "-"
        ok = f"{p['ok']} of {n}" + ("" if p["answered"] == n else f" ({p['answered']} answered)")
        lines.append(f"| {p['name']} | {p['rc']} | {ok} | {p['wall_s']:.1f} s | {spread} | "
                     f"{_versions_line(p['answered_versions'])} | {_versions_line(p['versions'])} |")
    last = report["phases"][-1]
    lines += [
        "",
        f"- Refusals of the bad bundle with shadow scoring: {report['phases'][1]['errors'] or '-'}",
        f"- Without shadow scoring: every box switched and rolled back by itself; the last one "
        f"{last['settled_s']} s after the push started. Reason: {report['rollback_reasons']}",
        "",
        "Verdicts produced (sum of the agents' frame counters from their stats) vs received by a QoS 1 subscriber on "
        "the central broker (verdict ids by box, sequence numbers between the counters before and after):",
        "",
        "| span | produced | received | lost |",
        "|---|---|---|---|",
    ]
    for p in d["phases"]:
        lines.append(f"| {p['name']} | {p['produced']} | {p['received']} | {p['produced'] - p['received']} |")
    lines += [
        f"| all three rollouts | {d['produced']} | {d['received']} | {d['produced'] - d['received']} |",
        "",
        f"Whole run, every box's ids: {d['missing']} missing between the first and the last received, "
        f"{d['duplicates']} duplicates, ids start at 1: {d['ids_from_1']}, "
        f"boxes restarted: {d['restarted'] or 'none'}.",
        "",
        f"Memory (RSS at the end): central broker {m['central_mb']} MB, site broker {m['site_mb']} MB; agents median "
        f"{m['agent_median_mb']} MB, max {m['agent_max_mb']} MB (peak {m['agent_peak_max_mb']} MB), "
        f"{m['agents_total_mb']} MB for all {n}.",
        f"Agent exit codes after SIGTERM: {sorted(set(report['exit_codes'].values()))}.",
        "",
    ]
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=50, help="agent processes (default 50)")
    parser.add_argument("--fps", type=float, default=0.5, help="capture.max_fps of each agent (default 0.5)")
    parser.add_argument("--bridge", choices=sorted(BRIDGE_TOPICS), default="both",
                        help="the bridge's topics: yugami/# both ways, or the narrower out/in form (default both)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, configs, state)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="yugami-fleet-bench-"))
    try:
        report = run_scenario(work, args.boxes, args.fps, bridge=args.bridge)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder kept: {work}")
    command = " ".join(["bench/fleet.py", *(argv if argv is not None else sys.argv[1:])]).strip()
    print(write_markdown(report, f".venv/bin/python {command}", args.out))
    (args.out.with_suffix(".json")).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
