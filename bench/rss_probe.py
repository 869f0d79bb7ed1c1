"""Where the flood's RSS growth comes from: the real agent under one kind of command at a time.

Starts the agent (as bench/flood.py does) with a folder source at 20 frames/s and, per scenario, samples
VmRSS from /proc/PID/status:

* ``reload``: cmd/reload one at a time, each answered before the next (so each really loads the bundle),
  RSS after 1, 10, 50 and 100 reloads;
* ``gradcam``: floods of cmd/gradcam with distinct ids (3000 in a second), RSS after each;
* ``malformed``: floods of bodies the agent refuses (not JSON, not an object, unknown command);
* ``frames``: nothing but frames, for the drift of inspection alone.

    .venv/bin/python bench/rss_probe.py [reload gradcam malformed frames] [--env MALLOC_ARENA_MAX=2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._service import DEMO_BUNDLE, rss_kb
from bench.flood import BASE, broker_and_frames, publish_all
from tests.integration.conftest import AgentProcess, Recorder, base_config, write_config

Step = tuple[str, float]  # (label, RSS MB)


def _mb(pid: int) -> float:
    return (rss_kb(pid) or 0) / 1024


def _settle(pid: int, seconds: float = 3.0) -> float:
    time.sleep(seconds)
    return _mb(pid)


def reloads(agent: AgentProcess, rec: Recorder) -> list[Step]:
    pid = agent.proc.pid
    topic = f"{BASE}/cmd/reload/result"
    steps: list[Step] = []
    done = 0
    for target in (1, 10, 50, 100):
        while done < target:
            before = len(rec.on(topic))
            rec.publish(f"{BASE}/cmd/reload", json.dumps({"id": f"r{done}"}))
            deadline = time.monotonic() + 60
            while len(rec.on(topic)) <= before:
                if time.monotonic() > deadline or not agent.alive():
                    raise RuntimeError(f"reload {done} not answered:\n{agent.logs()}")
                time.sleep(0.02)
            done += 1
        steps.append((f"after {done} reloads", _settle(pid)))
    return steps


def floods(make: Callable[[int], list[tuple[str, bytes]]], rounds: int = 3) -> Callable[[AgentProcess, Recorder],
                                                                                          list[Step]]:
    def run(agent: AgentProcess, rec: Recorder) -> list[Step]:
        steps: list[Step] = []
        for r in range(rounds):
            publish_all(rec.client, make(r))
            steps.append((f"after flood {r + 1}", _settle(agent.proc.pid, 8.0)))
        return steps
    return run


def gradcam_items(r: int) -> list[tuple[str, bytes]]:
    return [(f"{BASE}/cmd/gradcam", json.dumps({"id": f"g{r}-{i}"}).encode()) for i in range(3000)]


def malformed_items(r: int) -> list[tuple[str, bytes]]:
    kinds = [(f"{BASE}/cmd/reload", b"not json"), (f"{BASE}/cmd/reload", b"[1, 2]"),
             (f"{BASE}/cmd/nope", b"{}"), (f"{BASE}/cmd/gradcam", b'{"frame_id": 5}')]
    return [kinds[i % len(kinds)] for i in range(10000)]


def frames_only(agent: AgentProcess, rec: Recorder) -> list[Step]:
    return [(f"after {s} s more", _settle(agent.proc.pid, 10.0)) for s in (10, 20, 30)]


SCENARIOS: dict[str, Callable[[AgentProcess, Recorder], list[Step]]] = {
    "reload": reloads, "gradcam": floods(gradcam_items), "malformed": floods(malformed_items), "frames": frames_only,
}


def scenario(name: str, work: Path, env: dict[str, str]) -> list[Step]:
    broker, folder, writer = broker_and_frames(work)
    rec = Recorder(broker.port, [f"{BASE}/verdict", f"{BASE}/cmd/+/result"], name=f"probe-{name}")
    cfg = base_config(work, DEMO_BUNDLE, broker.port, str(folder), mqtt={"stats_interval_s": 5})
    agent = AgentProcess(write_config(work / "agent.yaml", **cfg), work / "agent.log", env)
    writer.start()
    try:
        deadline = time.monotonic() + 120
        while len(rec.on(f"{BASE}/verdict")) < 20:
            if time.monotonic() > deadline or not agent.alive():
                raise RuntimeError(f"no verdicts from the agent:\n{agent.logs()}")
            time.sleep(0.2)
        steps = [("start (20 verdicts + 3 s)", _settle(agent.proc.pid))]
        steps += SCENARIOS[name](agent, rec)
        if not agent.alive():
            raise RuntimeError(f"the agent died:\n{agent.logs()}")
        return steps
    finally:
        writer.stop.set()
        agent.stop_quietly()
        rec.close()
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the agent's environment")
    args = parser.parse_args(argv)
    env = dict(e.split("=", 1) for e in args.env)
    for name in args.scenarios:
        with tempfile.TemporaryDirectory(prefix=f"yugami-rss-{name}-") as tmp:
            steps = scenario(name, Path(tmp), env)
        base = steps[0][1]
        print(f"{name} {' '.join(args.env)}".strip())
        for label, mb in steps:
            print(f"  {label:28s} {mb:7.1f} MB  {mb - base:+6.1f}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    threading.excepthook = lambda a: None  # paho's thread at interpreter exit
    sys.exit(main())
