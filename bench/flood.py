"""Command flood against the running service: 10,000 commands published in about a second while a folder
source keeps producing frames (issue 13, item 4).

Measures the longest gap between verdicts (target < 2 s), the longest gap between watchdog pings (target
< WatchdogSec / 2 = 15 s; the agent is told WATCHDOG_USEC=2 s, so it pings every second and a gap shows how
long the loop was held), the time from SIGTERM (sent during a second flood) to exit (target < 2 s), and RSS
before and after. Writes bench/results/flood.md.

    .venv/bin/python bench/flood.py [--commands 10000] [--bundle models/demo]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._service import DEMO_BUNDLE, ROOT, RssSampler, VerdictCounter, machine, rss_kb
from tests.integration.conftest import AgentProcess, Mosquitto, base_config, write_config
from tests.integration.test_agent_flood import FrameWriter, WatchdogListener

BASE = "yugami/cam1"
OUT = ROOT / "bench" / "results" / "flood.md"


def longest_gap(times: list[float], start: float, end: float) -> float:
    points = [start, *[t for t in times if start <= t <= end], end]
    return max(b - a for a, b in itertools.pairwise(points))


def payloads(n: int) -> list[tuple[str, bytes]]:
    """The issue's mix: reloads without and with ids (coalesced / bounded) and next-frame gradcam requests."""
    reload, gradcam = f"{BASE}/cmd/reload", f"{BASE}/cmd/gradcam"
    out = [(reload, b"{}")] * (n * 4 // 10)
    out += [(reload, json.dumps({"id": i}).encode()) for i in range(n * 3 // 10)]
    out += [(gradcam, json.dumps({"id": f"g{i}"}).encode()) for i in range(n - len(out))]
    return out


def publish_all(client: object, items: list[tuple[str, bytes]], seconds: float = 1.0) -> float:
    """Publish ``items`` evenly over about ``seconds`` (in 100 batches); the seconds it took."""
    started = time.monotonic()
    batch = max(1, len(items) // 100)
    for i in range(0, len(items), batch):
        for topic, body in items[i:i + batch]:
            client.publish(topic, body, qos=0)  # type: ignore[attr-defined]
        time.sleep(max(0.0, started + seconds * (i + batch) / len(items) - time.monotonic()))
    return time.monotonic() - started


def broker_and_frames(work: Path) -> tuple[Mosquitto, Path, FrameWriter]:
    """A started mosquitto in WORK/broker and a writer (not yet started) of 20 frames/s into WORK/in."""
    broker_dir = work / "broker"
    broker_dir.mkdir()
    broker = Mosquitto(broker_dir)
    broker.start()
    folder = work / "in"
    folder.mkdir()
    return broker, folder, FrameWriter(folder, period_s=0.05)


def run(commands: int, bundle: Path, work: Path) -> dict[str, float]:
    broker, folder, writer = broker_and_frames(work)
    watchdog = WatchdogListener(work / "notify.sock")
    watchdog.start()
    counter = VerdictCounter(broker.port, [f"{BASE}/verdict", f"{BASE}/cmd/+/result"])
    cfg = base_config(work, bundle, broker.port, str(folder), mqtt={"stats_interval_s": 5})
    env = {"NOTIFY_SOCKET": str(work / "notify.sock"), "WATCHDOG_USEC": "2000000"}
    agent = AgentProcess(write_config(work / "agent.yaml", **cfg), work / "agent.log", env)
    writer.start()
    try:
        deadline = time.monotonic() + 120
        while counter.count("/verdict") < 20:
            if time.monotonic() > deadline or not agent.alive():
                raise RuntimeError(f"no verdicts from the agent:\n{agent.logs()}")
            time.sleep(0.2)
        time.sleep(3)  # settle
        rss_before = rss_kb(agent.proc.pid) or 0
        sampler = RssSampler(agent.proc.pid, 0.5)
        sampler.start()
        start = time.monotonic()
        took = publish_all(counter.client, payloads(commands))
        time.sleep(max(0.0, start + 20 - time.monotonic()))
        end = time.monotonic()
        with counter.lock:
            times = list(counter.verdict_times)
        verdict_gap = longest_gap(times, start, end)
        ping_gap = longest_gap(watchdog.pings, start, end)
        verdicts = len([t for t in times if start <= t <= end])
        rss_after = rss_kb(agent.proc.pid) or 0
        rss_peak = max(kb for _, kb in sampler.samples)
        results = counter.count("/result")

        time.sleep(10)
        rss_later = rss_kb(agent.proc.pid) or 0
        storm = threading.Thread(target=publish_all, args=(counter.client, payloads(commands)))
        storm.start()
        time.sleep(0.1)
        sent = time.monotonic()
        rc = agent.terminate(timeout=60)
        stop_s = time.monotonic() - sent
        storm.join(60)
        sampler.stop.set()
    finally:
        writer.stop.set()
        watchdog.stop.set()
        agent.stop_quietly()
        counter.close()
        broker.stop()
    return {"commands": commands, "publish_s": took, "verdicts_20s": verdicts, "verdict_gap_s": verdict_gap,
            "watchdog_gap_s": ping_gap, "sigterm_exit_s": stop_s, "exit_code": rc, "results": results,
            "rss_before_mb": rss_before / 1024, "rss_peak_mb": rss_peak / 1024, "rss_after_mb": rss_after / 1024,
            "rss_later_mb": rss_later / 1024}


def report(r: dict[str, float], command: str) -> str:
    def met(ok: bool) -> str:
        return "met" if ok else "**missed**"

    return "\n".join([
        "# Command flood against the running service",
        "",
        f"`{command}` on {machine()} (shared). Folder source fed 20 frames/s; {r['commands']:,} commands "
        f"(40 % `reload {{}}`, 30 % `reload` with distinct ids, 30 % `gradcam` with distinct ids) published "
        f"in {r['publish_s']:.2f} s at QoS 0; watched for 20 s from the first command. The agent was told "
        "WATCHDOG_USEC=2 s (it pings every second), so the gap shows how long the loop was held.",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| longest gap between verdicts | {r['verdict_gap_s']:.2f} s | < 2 s: {met(r['verdict_gap_s'] < 2)} |",
        f"| verdicts in those 20 s | {r['verdicts_20s']} | |",
        f"| longest gap between watchdog pings | {r['watchdog_gap_s']:.2f} s | < 15 s (WatchdogSec / 2): "
        f"{met(r['watchdog_gap_s'] < 15)} |",
        f"| SIGTERM (0.1 s into a second flood) to exit | {r['sigterm_exit_s']:.2f} s (exit {r['exit_code']}) | "
        f"< 2 s: {met(r['sigterm_exit_s'] < 2 and r['exit_code'] == 0)} |",
        f"| command answers published | {r['results']} | far fewer than commands (coalesced, rate-limited) |",
        f"| RSS before / peak / after the flood | {r['rss_before_mb']:.1f} / {r['rss_peak_mb']:.1f} / "
        f"{r['rss_after_mb']:.1f} MB | |",
        f"| RSS 10 s later | {r['rss_later_mb']:.1f} MB | |",
        f"| RSS growth (10 s later - before) | {r['rss_later_mb'] - r['rss_before_mb']:+.1f} MB | |",
        "",
        "The growth is a one-off plateau, not a leak (`python bench/rss_probe.py`: one kind of command at a "
        "time, demo bundle). The first Grad-CAM costs about 14 MB (agent.gradcam and its OpenCV work, loaded on "
        "first use), later floods of 3,000 add < 1 MB; the first reload about 11 MB (old and new bundle are both "
        "alive during a swap), 100 reloads +12.5 MB in all, because the agent hands the freed heap back after "
        "each reload (malloc_trim; without it +23.5 MB, flat from 50 to 100 reloads). 10,000 malformed "
        "commands: +1.4 MB, frames alone drift about as much. No old bundle outlives its reload "
        "(tests/unit/test_reload_memory.py).",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commands", type=int, default=10000)
    parser.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="yugami-flood-") as tmp:
        r = run(args.commands, args.bundle.resolve(), Path(tmp))
    command = "python bench/flood.py" + (f" --commands {args.commands}" if args.commands != 10000 else "")
    text = report(r, command)
    print(text)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
