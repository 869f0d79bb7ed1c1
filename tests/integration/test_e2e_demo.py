"""End to end: the demo's path (synthetic video -> yugami-agent -> MQTT) against a real mosquitto, read by
``mosquitto_sub``, a client nobody on this project wrote; and ``python -m demo.run`` with its embedded broker.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, Mosquitto, wait_until

pytestmark = pytest.mark.integration

DEMO_BUNDLE = ROOT / "models" / "demo"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
BASE = "yugami/demo-cam"
FRAMES, EVERY = 12, 3  # frames 2, 5, 8, 11 are defective: scratch, dent, missing, stain
VERDICT_FIELDS = [
    "v",
    "id",
    "ts",
    "device",
    "source",
    "score",
    "threshold",
    "verdict",
    "confidence",
    "model",
    "latency_ms",
    "evidence",
]
FRAME_LINE = re.compile(r"^frame +(\d+) ")


@pytest.fixture(scope="module")
def demo_bundle() -> Path:
    if not (DEMO_BUNDLE / "manifest.json").is_file():
        pytest.fail(f"{DEMO_BUNDLE} is missing; it is committed, or regenerate it: python -m demo.make_bundle")
    return DEMO_BUNDLE


def run_demo(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "demo.run",
        "--out",
        str(out),
        "--frames",
        str(FRAMES),
        "--anomaly-every",
        str(EVERY),
        "--fps",
        "20",
        "--timeout",
        "90",
        *extra,
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)


class MosquittoSub:
    """``mosquitto_sub -v`` on yugami/#, every output line kept. The Grad-CAM JPEG (binary) is filtered out
    with -T: ``-v`` prints payloads raw, one message per line, which only holds for text payloads."""

    def __init__(self, port: int) -> None:
        cmd = [
            MOSQUITTO_SUB,
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-q",
            "1",
            "-t",
            "yugami/#",
            "-T",
            f"{BASE}/gradcam",
            "-T",
            f"{BASE}/gradcam/+",  # the same JPEG again, under its frame id
            "-v",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self.lock:
                self.lines.append(raw.decode("utf-8", errors="replace").rstrip("\n"))  # never die on a binary payload

    def messages(self) -> list[tuple[str, str]]:
        with self.lock:
            return [tuple(line.split(" ", 1)) if " " in line else (line, "") for line in self.lines]  # type: ignore[misc]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.reader.join(5)


def subscribed(sub: MosquittoSub, port: int) -> bool:
    """Publish a probe until mosquitto_sub prints it: from then on it sees everything."""
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", "yugami/probe", "-m", "probe"],
        check=True,
        timeout=10,
    )
    return any(t == "yugami/probe" for t, _ in sub.messages())


def check_verdict(payload: dict, sha256: str) -> None:
    assert list(payload) == VERDICT_FIELDS, f"fields {list(payload)}"
    assert payload["v"] == 1
    assert payload["device"] == "demo-cam"
    assert payload["verdict"] in ("ok", "anomaly")
    assert isinstance(payload["id"], str) and payload["id"]
    when = dt.datetime.fromisoformat(payload["ts"].replace("Z", "+00:00"))
    assert when.tzinfo is not None and when.utcoffset() == dt.timedelta(0)
    for key in ("score", "threshold", "latency_ms"):
        assert isinstance(payload[key], (int, float)), key
    assert 0.0 <= payload["confidence"] <= 1.0
    assert payload["confidence"] >= 0.5  # the confidence in the verdict given
    assert (payload["verdict"] == "anomaly") == (payload["score"] > payload["threshold"])
    assert set(payload["model"]) == {"name", "sha256"} and payload["model"]["sha256"] == sha256
    assert re.fullmatch(r"parts\.avi#\d+", Path(payload["source"]).name)


def test_demo_against_mosquitto_read_by_mosquitto_sub(mosquitto: Mosquitto, demo_bundle: Path, tmp_path: Path) -> None:
    from agent.bundle import load_bundle

    sha256 = load_bundle(demo_bundle).manifest_sha256
    sub = MosquittoSub(mosquitto.port)
    try:
        wait_until(lambda: subscribed(sub, mosquitto.port), 20, "mosquitto_sub to receive a probe")
        result = run_demo(tmp_path / "out", "--mqtt-host", "127.0.0.1", "--mqtt-port", str(mosquitto.port))
        assert result.returncode == 0, result.stdout + result.stderr
        wait_until(lambda: (f"{BASE}/available", "offline") in sub.messages(), 20, "the agent's 'offline'")
    finally:
        sub.stop()
    messages = [(t, p) for t, p in sub.messages() if t != "yugami/probe"]
    assert messages, "mosquitto_sub received nothing"
    by_topic: dict[str, list[str]] = {}
    for topic, payload in messages:
        assert topic.startswith(BASE + "/"), topic
        by_topic.setdefault(topic[len(BASE) + 1 :], []).append(payload)
    # Every message parses and carries the documented fields.
    verdicts = [json.loads(p) for p in by_topic.pop("verdict")]
    for v in verdicts:
        check_verdict(v, sha256)
    for p in by_topic.pop("state", []):
        check_verdict(json.loads(p), sha256)
    assert by_topic.pop("available") == ["online", "offline"]
    for p in by_topic.pop("cmd/gradcam", []):  # the demo's own command, seen on the way in
        assert "frame_id" in json.loads(p)
    results = [json.loads(p) for p in by_topic.pop("cmd/gradcam/result", [])]
    assert results and all(r["cmd"] == "gradcam" and r["ok"] is True and r["frame_id"] for r in results)
    for p in by_topic.pop("stats", []):
        stats = json.loads(p)
        assert stats["v"] == 1 and stats["device"] == "demo-cam"
    for p in by_topic.pop("event", []):
        event = json.loads(p)
        assert event["v"] == 1 and event["device"] == "demo-cam" and event["event"]
    assert not by_topic, f"undocumented topics: {sorted(by_topic)}"
    # One verdict per frame, in frame order, and both verdicts appear.
    indexes = [int(v["source"].rsplit("#", 1)[1]) for v in verdicts]
    assert sorted(set(indexes)) == list(range(FRAMES))
    assert len({v["id"] for v in verdicts}) == len(set(indexes))  # a repeat is only a redelivery
    assert {v["verdict"] for v in verdicts} == {"ok", "anomaly"}
    # The demo printed the same verdicts and saved a real JPEG of the first anomaly.
    printed = [int(m.group(1)) for m in map(FRAME_LINE.match, result.stdout.splitlines()) if m]
    assert printed == list(range(FRAMES))
    [jpeg] = list((tmp_path / "out").glob("gradcam_*.jpg"))
    assert jpeg.read_bytes()[:3] == b"\xff\xd8\xff"


def test_demo_run_with_the_embedded_broker(demo_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("amqtt", reason="the demo extra is not installed: pip install -e '.[demo]'")
    import cv2

    result = run_demo(tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert [int(m.group(1)) for m in map(FRAME_LINE.match, out.splitlines()) if m] == list(range(FRAMES))
    assert " ANOMALY " in out and " ok " in out
    assert "agent is offline" in out  # SIGTERM: the agent said goodbye before disconnecting
    summary = re.search(r"summary: (\d+)/(\d+) frames inspected", out)
    assert summary and summary.group(1) == summary.group(2) == str(FRAMES)
    [jpeg] = list((tmp_path / "out").glob("gradcam_*.jpg"))
    picture = cv2.imread(str(jpeg))
    assert picture is not None and picture.shape[0] >= 64
    # The broker child is gone: the demo stopped what it started.
    pid = int(re.search(r"embedded amqtt on [\d.]+:\d+ \(pid (\d+)\)", out).group(1))  # type: ignore[union-attr]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
