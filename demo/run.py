"""``python -m demo.run`` (what ``make demo`` runs): the whole product on one machine, no camera, no broker.

1. draw a short video of synthetic parts, some of them defective (the sidecar says which);
2. start the embedded MQTT broker (amqtt, a child process), unless ``--mqtt-host`` names a real one;
3. write an agent config and run ``yugami-agent`` on the video, paced like a camera;
4. subscribe to the agent's topics and print each verdict as it arrives, next to the truth;
5. ask the agent for a Grad-CAM picture of the first anomaly (``cmd/gradcam``) and save the JPEG;
6. stop the agent (SIGTERM: it publishes ``offline``), the subscriber and the broker; print a summary.

Only the agent's packages and amqtt are needed, never TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from demo.synthetic import write_video

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "models" / "demo"
DEFAULT_OUT = ROOT / "out" / "demo"
DEVICE_ID = "demo-cam"
PREFIX = "yugami"
REGENERATE_HINT = "regenerate it with: python -m demo.make_bundle (needs the trainer: pip install -e '.[train]')"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_SETUP = 2


class DemoError(RuntimeError):
    """Something the demo needs is missing or did not start; the message says what to do."""


@dataclass
class Tally:
    """What the subscriber saw, frame by frame."""

    truth: list[str | None]
    verdicts: dict[int, dict[str, Any]] = field(default_factory=dict)
    unmatched: list[dict[str, Any]] = field(default_factory=list)
    first_anomaly: dict[str, Any] | None = None
    gradcam_path: Path | None = None
    gradcam_error: str | None = None
    availability: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        flagged = {i for i, v in self.verdicts.items() if v["verdict"] == "anomaly"}
        defective = {i for i, k in enumerate(self.truth) if k is not None}
        seen = set(self.verdicts)
        return {
            "frames": len(self.truth),
            "verdicts": len(self.verdicts),
            "flagged": len(flagged),
            "defective": len(defective),
            "caught": len(flagged & defective),
            "missed": len((defective & seen) - flagged),
            "false_alarms": len(flagged - defective),
        }


def frame_index(source: str) -> int | None:
    """The frame index from a video verdict's ``source`` (``<file>#<index>``)."""
    _, sep, tail = source.rpartition("#")
    return int(tail) if sep and tail.isdigit() else None


def agent_command() -> list[str]:
    """``yugami-agent`` from this interpreter's environment, else the module itself."""
    script = Path(sys.executable).parent / "yugami-agent"
    if script.is_file():
        return [str(script)]
    found = shutil.which("yugami-agent")
    return [found] if found else [sys.executable, "-m", "agent.service"]


def write_agent_config(path: Path, *, bundle: Path, video: Path, host: str, port: int, fps: float, state: Path) -> Path:
    """The agent's YAML for the demo: the minimal config plus pacing, Grad-CAM on command and a state folder."""
    cfg = {
        "device_id": DEVICE_ID,
        "bundle": str(bundle),
        "capture": {"source": str(video), "kind": "video", "loop": False, "max_fps": fps},
        "mqtt": {
            "host": host,
            "port": port,
            "topic_prefix": PREFIX,
            "stats_interval_s": 5.0,
            # No Home Assistant discovery: a demo should leave no retained device on a real broker.
            "homeassistant": {"enabled": False},
        },
        # Frames are kept long enough for the subscriber to ask for one by id.
        "gradcam": {"policy": "on_command", "keep_frames": 64},
        "storage": {"dir": str(state), "save_anomalies": True},
        "service": {"log_level": "info"},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class Subscriber:
    """paho-mqtt 2.x client that hands every message on the device's topics to a queue."""

    def __init__(self, host: str, port: int, base: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.base = base
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.subscribed = queue.Queue[bool]()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"yugami-demo-viewer-{os.getpid()}")
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self.subscribed.put(True)
        self.client.on_message = lambda _c, _u, msg: self.inbox.put((msg.topic, bytes(msg.payload)))
        self.host, self.port = host, port

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason_code: Any, _p: Any) -> None:
        if reason_code.is_failure:
            logger.error("broker refused the demo subscriber: %s", reason_code)
            return
        client.subscribe(f"{self.base}/#", qos=1)

    def start(self, timeout: float = 10.0) -> None:
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise DemoError(f"cannot reach the MQTT broker at {self.host}:{self.port} ({exc})") from exc
        self.client.loop_start()
        try:
            self.subscribed.get(timeout=timeout)
        except queue.Empty as exc:
            raise DemoError(f"the broker at {self.host}:{self.port} did not confirm the subscription") from exc

    def command(self, name: str, body: dict[str, Any]) -> None:
        self.client.publish(f"{self.base}/cmd/{name}", json.dumps(body), qos=1)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def verdict_line(index: int | None, v: dict[str, Any], truth: str | None) -> str:
    flagged = v["verdict"] == "anomaly"
    # (truly defective, flagged) -> how the verdict fared
    mark = {(False, False): "right", (False, True): "FALSE ALARM", (True, True): "right", (True, False): "MISSED"}[
        (truth is not None, flagged)
    ]
    frame = f"{index:3d}" if index is not None else "  ?"
    return (
        f"frame {frame}  {v['id']:<28} {v['verdict'].upper() if flagged else v['verdict']:<8} "
        f"score {v['score']:.4f} (threshold {v['threshold']:.4f})  confidence {v['confidence']:.2f}  "
        f"truth: {truth or 'good':<8} {mark}"
    )


def handle(topic: str, payload: bytes, tally: Tally, sub: Subscriber, out: Path) -> None:
    """Print and record one message from the agent."""
    leaf = topic[len(sub.base) + 1 :]
    if leaf == "verdict":
        v = json.loads(payload)
        index = frame_index(str(v.get("source", "")))
        if index is None or index >= len(tally.truth):
            tally.unmatched.append(v)
            print(verdict_line(None, v, None), flush=True)
            return
        if index in tally.verdicts:
            return  # a QoS 1 redelivery of the same frame
        tally.verdicts[index] = v
        print(verdict_line(index, v, tally.truth[index]), flush=True)
        if v["verdict"] == "anomaly" and tally.first_anomaly is None:
            tally.first_anomaly = v
            sub.command("gradcam", {"id": "demo-first-anomaly", "frame_id": v["id"]})
    elif leaf == "gradcam" and tally.first_anomaly is not None and tally.gradcam_path is None:
        path = out / f"gradcam_{tally.first_anomaly['id']}.jpg"
        path.write_bytes(payload)
        tally.gradcam_path = path
    elif leaf == "cmd/gradcam/result":
        result = json.loads(payload)
        if not result.get("ok"):
            tally.gradcam_error = str(result.get("error"))
            print(f"Grad-CAM refused: {tally.gradcam_error}", flush=True)
    elif leaf == "available":
        state = payload.decode(errors="replace")
        tally.availability.append(state)
        print(f"agent is {state}", flush=True)
    elif leaf == "event":
        e = json.loads(payload)
        if e.get("event") in ("bad_frame", "source_down", "degraded", "outbox_dropped"):
            print(f"agent event: {json.dumps(e)}", flush=True)


def done(tally: Tally) -> bool:
    all_in = len(tally.verdicts) == len(tally.truth)
    cam_settled = tally.first_anomaly is None or tally.gradcam_path is not None or tally.gradcam_error is not None
    return all_in and cam_settled


def stop_process(proc: subprocess.Popen[bytes], name: str, timeout: float = 15.0) -> int:
    """SIGTERM (a clean stop: the agent publishes offline and flushes), then SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0f s of SIGTERM; killing it", name, timeout)
            proc.kill()
            proc.wait()
    return proc.returncode


def watch(tally: Tally, sub: Subscriber, agent: subprocess.Popen[bytes], out: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done(tally):
        if time.monotonic() > deadline:
            print(f"timed out after {timeout:.0f} s waiting for verdicts", flush=True)
            return
        if agent.poll() is not None and sub.inbox.empty():
            log = (out / "agent.log").read_text(errors="replace").strip().splitlines()[-8:]
            print(f"yugami-agent exited early with status {agent.returncode}; its log ends:", flush=True)
            print("\n".join(f"  | {line}" for line in log), flush=True)
            return
        try:
            topic, payload = sub.inbox.get(timeout=0.2)
        except queue.Empty:
            continue
        try:
            handle(topic, payload, tally, sub, out)
        except (ValueError, KeyError, TypeError) as exc:
            print(f"unreadable message on {topic}: {exc}", flush=True)


def drain(tally: Tally, sub: Subscriber, out: Path, seconds: float) -> None:
    """Read what is still arriving (the agent's 'offline' after SIGTERM) for a moment."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            topic, payload = sub.inbox.get(timeout=0.1)
        except queue.Empty:
            if tally.availability[-1:] == ["offline"]:
                return
            continue
        handle(topic, payload, tally, sub, out)


def summary(tally: Tally, out: Path, agent_rc: int | None, seconds: float) -> str:
    c = tally.counts()
    lines = [
        "",
        f"summary: {c['verdicts']}/{c['frames']} frames inspected in {seconds:.1f} s; "
        f"{c['flagged']} flagged as anomalies, {c['defective']} truly defective: "
        f"{c['caught']} caught, {c['missed']} missed, {c['false_alarms']} false alarm(s)",
    ]
    if tally.gradcam_path is not None:
        lines.append(f"Grad-CAM of the first anomaly ({tally.first_anomaly['id']}): {tally.gradcam_path}")
    elif tally.first_anomaly is None:
        lines.append("no anomaly was flagged, so no Grad-CAM picture")
    else:
        lines.append(f"no Grad-CAM picture: {tally.gradcam_error or 'it did not arrive'}")
    lines.append(f"agent exit status {agent_rc}; logs, config and saved evidence in {out}")
    return "\n".join(lines)


@dataclass
class Options:
    out: Path
    bundle: Path
    frames: int
    anomaly_every: int
    fps: float
    size: int
    seed: int
    mqtt_host: str | None
    mqtt_port: int
    timeout: float


def prepare(opts: Options) -> tuple[Path, list[str | None]]:
    if not (opts.bundle / "manifest.json").is_file():
        raise DemoError(f"no model bundle at {opts.bundle}; {REGENERATE_HINT}")
    if opts.out.exists():
        shutil.rmtree(opts.out)  # a fresh outbox and evidence folder each run
    opts.out.mkdir(parents=True)
    video = opts.out / "parts.avi"
    side = write_video(video, opts.frames, opts.anomaly_every, opts.size, opts.fps, opts.seed)
    truth = json.loads(side.read_text())["defects"]
    return video, truth


def run(opts: Options) -> int:
    t0 = time.monotonic()
    video, truth = prepare(opts)
    print(
        f"video: {video} ({opts.frames} frames, defective: "
        f"{', '.join(f'{i}={k}' for i, k in enumerate(truth) if k) or 'none'})",
        flush=True,
    )
    broker = None
    host, port = opts.mqtt_host or "127.0.0.1", opts.mqtt_port
    if opts.mqtt_host is None:
        from demo.broker import EmbeddedBroker

        broker = EmbeddedBroker(log_file=opts.out / "broker.log").start()
        port = broker.port
        print(f"broker: embedded amqtt on {host}:{port} (pid {broker.proc.pid if broker.proc else '?'})", flush=True)
    else:
        print(f"broker: {host}:{port}", flush=True)
    sub = agent = None
    tally = Tally(truth)
    agent_rc: int | None = None
    try:
        sub = Subscriber(host, port, f"{PREFIX}/{DEVICE_ID}")
        sub.start()
        config = write_agent_config(
            opts.out / "agent.yaml",
            bundle=opts.bundle.resolve(),
            video=video.resolve(),
            host=host,
            port=port,
            fps=opts.fps,
            state=(opts.out / "agent-state").resolve(),
        )
        cmd = [*agent_command(), "--config", str(config)]
        print(f"agent: {' '.join(cmd)} (log: {opts.out / 'agent.log'})", flush=True)
        with open(opts.out / "agent.log", "wb") as log:
            agent = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        print(
            "verdicts as the subscriber receives them (frame index, frame id, verdict, score against the "
            "threshold, confidence in the verdict, and what the generator drew):",
            flush=True,
        )
        watch(tally, sub, agent, opts.out, opts.timeout)
        agent_rc = stop_process(agent, "yugami-agent")
        drain(tally, sub, opts.out, 3.0)
    finally:
        if agent is not None and agent.poll() is None:
            agent_rc = stop_process(agent, "yugami-agent")
        if sub is not None:
            sub.stop()
        if broker is not None:
            broker.stop()
    print(summary(tally, opts.out, agent_rc, time.monotonic() - t0), flush=True)
    c = tally.counts()
    return EXIT_OK if c["verdicts"] == c["frames"] and agent_rc == 0 else EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m demo.run",
        description=(
            "The yugami demo: synthetic parts on a video, the agent inspecting them, verdicts over MQTT "
            "printed as they arrive, and a Grad-CAM picture of the first anomaly. Starts an embedded broker "
            "unless --mqtt-host is given."
        ),
        epilog="See docs/DEMO.md for a real camera and broker.",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder, replaced (default {DEFAULT_OUT})")
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="model bundle (default models/demo)")
    p.add_argument("--frames", type=int, default=40, help="frames in the video (default 40)")
    p.add_argument("--anomaly-every", type=int, default=4, help="every N-th part is defective (default 4)")
    p.add_argument("--fps", type=float, default=5.0, help="inspection pace, frames per second (default 5)")
    p.add_argument("--size", type=int, default=256, help="frame side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=1, help="seed of the video (default 1; the bundle was trained on 0)")
    p.add_argument("--mqtt-host", default=None, help="use this broker instead of the embedded one")
    p.add_argument("--mqtt-port", type=int, default=1883, help="port of --mqtt-host (default 1883)")
    p.add_argument("--timeout", type=float, default=180.0, help="give up waiting for verdicts after this (s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.frames < 1 or args.fps <= 0:
        print("demo: --frames must be 1 or more and --fps above 0", file=sys.stderr)
        return EXIT_SETUP
    opts = Options(
        out=args.out,
        bundle=args.bundle,
        frames=args.frames,
        anomaly_every=args.anomaly_every,
        fps=args.fps,
        size=args.size,
        seed=args.seed,
        mqtt_host=args.mqtt_host,
        mqtt_port=args.mqtt_port,
        timeout=args.timeout,
    )
    try:
        return run(opts)
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        print("demo: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
