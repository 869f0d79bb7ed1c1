"""The agent as a real subprocess against a real mosquitto: payloads, will, commands, sources, notify."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import sqlite3
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.builders import plain_part_images
from tests.integration.conftest import (
    Recorder,
    base_config,
    free_port,
    wait_until,
    write_images,
)

pytestmark = pytest.mark.integration

VERDICT_KEYS = ["v", "id", "ts", "device", "source", "score", "threshold", "verdict", "confidence", "model",
                "latency_ms", "evidence"]
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
BASE = "yugami/cam1"


def white() -> np.ndarray:
    """Far from every plain part: scores about 0.48 against the tiny bundle's threshold of about 1e-4."""
    return np.full((96, 96, 3), 255, np.uint8)


def outbox_rows(state: Path) -> int:
    db = state / "outbox.sqlite3"
    if not db.exists():
        return 0
    with sqlite3.connect(str(db), timeout=5) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])


def manifest_sha(bundle: Path) -> str:
    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


def test_folder_source_end_to_end(tmp_path: Path, tiny_bundle: Path, mosquitto, agents) -> None:
    folder = tmp_path / "in"
    parts = plain_part_images(4, seed=11)
    names = write_images(folder, [parts[0], parts[1], white()])  # img_0000..img_0002
    (folder / "img_0003.png").write_bytes(b"not a png")  # a bad frame
    rec = Recorder(mosquitto.port, [f"{BASE}/#", "homeassistant/#"])
    metrics_port = free_port()
    cfg = base_config(tmp_path, tiny_bundle, mosquitto.port, str(folder),
                      metrics={"enabled": True, "port": metrics_port}, gradcam={"policy": "every_anomaly"})
    agent = agents(cfg)
    try:
        wait_until(lambda: len(rec.on(f"{BASE}/verdict")) >= 3, 60, "3 verdicts")
        # A file that appears while the agent runs is inspected too.
        names += write_images(folder, [parts[2]], start=4)
        wait_until(lambda: len(rec.on(f"{BASE}/verdict")) >= 4, 30, "the verdict of a new file")
        verdicts = rec.json_on(f"{BASE}/verdict")
        assert [Path(v["source"]).name for v in verdicts] == names
        for v in verdicts:
            assert list(v) == VERDICT_KEYS
            assert v["v"] == 1 and v["device"] == "cam1" and TS_RE.match(v["ts"])
            assert v["model"] == {"name": "tiny-test", "sha256": manifest_sha(tiny_bundle)}
            assert v["verdict"] in ("ok", "anomaly") and 0.5 <= v["confidence"] <= 1.0
            assert v["latency_ms"] > 0 and v["threshold"] > 0
            assert (v["verdict"] == "anomaly") == (v["score"] > v["threshold"])
            saved = list((tmp_path / "state" / "evidence").glob(f"*/*_{v['id']}.jpg"))
            assert v["evidence"] is (v["verdict"] == "anomaly") and bool(saved) is v["evidence"]  # named by its id
        assert len({v["id"] for v in verdicts}) == 4
        assert verdicts[2]["verdict"] == "anomaly"

        bad = rec.wait_json(f"{BASE}/event", lambda e: e["event"] == "bad_frame", what="the bad_frame event")
        assert bad["source"].endswith("img_0003.png") and "not a readable image" in bad["error"]
        stats = rec.wait_json(f"{BASE}/stats", lambda s: s["frames"] == 4 and s["errors"] == 1, what="stats")
        for key in ("fps", "anomalies", "latency_ms", "model", "uptime_s", "reconnects", "outbox"):
            assert key in stats
        anomalies = [v["id"] for v in verdicts if v["verdict"] == "anomaly"]
        assert stats["anomalies"] == len(anomalies) and stats["latency_ms"]["p50"] is not None
        # gradcam.policy every_anomaly: one overlay JPEG per anomalous frame.
        jpegs = wait_until(lambda: len(rec.on(f"{BASE}/gradcam")) >= len(anomalies) and rec.on(f"{BASE}/gradcam"),
                           10, "a Grad-CAM JPEG per anomaly")
        assert len(jpegs) == len(anomalies) and all(j[:2] == b"\xff\xd8" for j in jpegs)
        for fid, jpeg in zip(anomalies, jpegs, strict=True):  # each also under its verdict's id
            assert wait_until(lambda f=fid: rec.on(f"{BASE}/gradcam/{f}"), 10, f"the heat map of {fid}") == [jpeg]
        assert rec.json_on(f"{BASE}/state")[-1]["id"] == verdicts[-1]["id"]

        # Home Assistant discovery: retained, and announced again when Home Assistant comes online.
        config_topic = "homeassistant/device/yugami_cam1/config"
        wait_until(lambda: rec.on(config_topic), 10, "the discovery config")
        discovery = json.loads(rec.on(config_topic)[0])
        assert discovery["availability_topic"] == f"{BASE}/available"
        assert discovery["components"]["anomaly"]["state_topic"] == f"{BASE}/state"
        before = len(rec.on(config_topic))
        rec.publish("homeassistant/status", "online")
        wait_until(lambda: len(rec.on(config_topic)) > before, 10, "discovery announced again")

        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'yugami_frames_total{device="cam1"} 4' in body
        assert 'yugami_frame_errors_total{device="cam1"} 1' in body

        rec.publish(f"{BASE}/cmd/trigger", "{}")
        refused = rec.wait_json(f"{BASE}/cmd/trigger/result", lambda r: True, what="the trigger result")
        assert refused["ok"] is False and "continuous" in refused["error"]
    finally:
        rc = agent.terminate()
    assert rc == 0, agent.logs()
    wait_until(lambda: rec.on(f"{BASE}/available")[-1:] == [b"offline"], 10, "'offline' after a clean stop")
    # Evidence: each anomalous frame (the white one at least) with its verdict JSON.
    saved = {json.loads(p.read_text())["id"] for p in (tmp_path / "state" / "evidence").glob("*/*.json")}
    assert saved == set(anomalies) and verdicts[2]["id"] in saved
    rec.close()


def test_last_will_turns_available_offline_on_sigkill(tmp_path: Path, tiny_bundle: Path, mosquitto, agents) -> None:
    folder = tmp_path / "in"
    write_images(folder, plain_part_images(1, seed=3))
    rec = Recorder(mosquitto.port, [f"{BASE}/available"])
    agent = agents(base_config(tmp_path, tiny_bundle, mosquitto.port, str(folder)))
    wait_until(lambda: rec.on(f"{BASE}/available")[-1:] == [b"online"], 60, "'online'")
    agent.kill()
    wait_until(lambda: rec.on(f"{BASE}/available")[-1:] == [b"offline"], 30, "the last will 'offline'")
    rec.close()
    # Retained: a client arriving later learns the device is offline.
    late = Recorder(mosquitto.port, [f"{BASE}/available"], name="late")
    wait_until(lambda: late.on(f"{BASE}/available") == [b"offline"], 10, "the retained 'offline'")
    late.close()


def test_commands_and_bad_commands(tmp_path: Path, tiny_bundle: Path, mosquitto, agents) -> None:
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    folder = tmp_path / "in"
    write_images(folder, [*plain_part_images(3, seed=5), white()])
    rec = Recorder(mosquitto.port, [f"{BASE}/#"])
    cfg = base_config(tmp_path, bundle, mosquitto.port, str(folder), mqtt={"max_command_bytes": 256},
                      capture={"mode": "trigger"})
    agent = agents(cfg)
    wait_until(lambda: rec.on(f"{BASE}/available")[-1:] == [b"online"], 60, "'online'")

    def result(name: str, rid: str) -> dict:
        return rec.wait_json(f"{BASE}/cmd/{name}/result", lambda r: r.get("request_id") == rid,
                             what=f"the result of {name} {rid}")

    # trigger: one frame per command, answered with its verdict.
    rec.publish(f"{BASE}/cmd/trigger", json.dumps({"id": "t1"}))
    t1 = result("trigger", "t1")
    assert t1["ok"] is True and t1["verdict"] in ("ok", "anomaly")
    wait_until(lambda: rec.on(f"{BASE}/verdict"), 10, "the verdict of the triggered frame")
    assert [v["id"] for v in rec.json_on(f"{BASE}/verdict")] == [t1["frame_id"]]

    # gradcam for a frame id: the JPEG on the frame's own gradcam topic (the topic in the result) and on the
    # plain one Home Assistant reads, the frame id in the result.
    rec.publish(f"{BASE}/cmd/gradcam", json.dumps({"id": "g1", "frame_id": t1["frame_id"]}))
    g1 = result("gradcam", "g1")
    assert g1["ok"] is True and g1["frame_id"] == t1["frame_id"] and g1["topic"] == f"{BASE}/gradcam/{t1['frame_id']}"
    jpegs = wait_until(lambda: rec.on(f"{BASE}/gradcam"), 10, "the Grad-CAM JPEG")
    assert jpegs[0][:2] == b"\xff\xd8" and len(jpegs[0]) == g1["bytes"]
    assert wait_until(lambda: rec.on(g1["topic"]), 10, "the JPEG on the frame's topic")[0] == jpegs[0]
    assert cv2.imdecode(np.frombuffer(jpegs[0], np.uint8), cv2.IMREAD_COLOR) is not None

    # gradcam for the next frame: answered when the next trigger brings one.
    rec.publish(f"{BASE}/cmd/gradcam", json.dumps({"id": "g2"}))
    rec.publish(f"{BASE}/cmd/trigger", json.dumps({"id": "t2"}))
    t2 = result("trigger", "t2")
    assert result("gradcam", "g2")["frame_id"] == t2["frame_id"]
    rec.publish(f"{BASE}/cmd/gradcam", json.dumps({"id": "g3", "frame_id": "no-such-frame"}))
    assert result("gradcam", "g3")["ok"] is False

    # reload: a good bundle is taken; a damaged one is refused and the old one kept.
    rec.publish(f"{BASE}/cmd/reload", json.dumps({"id": "r1"}))
    assert result("reload", "r1")["ok"] is True
    bank = bundle / "bank.npz"
    bank.write_bytes(bank.read_bytes()[:-10] + b"0123456789")
    rec.publish(f"{BASE}/cmd/reload", json.dumps({"id": "r2"}))
    r2 = result("reload", "r2")
    assert r2["ok"] is False and "sha256" in r2["error"] and r2["model"]["name"] == "tiny-test"
    rec.publish(f"{BASE}/cmd/trigger", json.dumps({"id": "t3"}))
    assert result("trigger", "t3")["ok"] is True  # still inspecting with the old model

    # Malformed, unknown and oversized commands get error results, and the agent lives on.
    rec.publish(f"{BASE}/cmd/trigger", b"{not json")
    rec.publish(f"{BASE}/cmd/trigger", b"[1, 2]")
    rec.publish(f"{BASE}/cmd/selfdestruct", b"{}")
    rec.publish(f"{BASE}/cmd/gradcam", json.dumps({"id": "big", "pad": "x" * 400}))
    wait_until(lambda: len(rec.json_on(f"{BASE}/cmd/trigger/result")) >= 5, 10, "two trigger errors")
    errors = [r for r in rec.json_on(f"{BASE}/cmd/trigger/result") if r["ok"] is False]
    assert any("not valid JSON" in r["error"] for r in errors)
    assert any("JSON object" in r["error"] for r in errors)
    unknown = rec.wait_json(f"{BASE}/cmd/selfdestruct/result", lambda r: True, what="unknown command result")
    assert unknown["ok"] is False and "unknown command" in unknown["error"]
    big = rec.wait_json(f"{BASE}/cmd/gradcam/result", lambda r: "over the limit" in r.get("error", ""),
                        what="oversized command result")
    assert big["ok"] is False

    # SIGHUP with the damaged bundle: refused, reported, still alive.
    agent.proc.send_signal(1)
    refused = rec.wait_json(f"{BASE}/event", lambda e: e["event"] == "reload_refused", what="reload_refused")
    assert "sha256" in refused["error"]
    rec.publish(f"{BASE}/cmd/trigger", json.dumps({"id": "t4"}))
    assert result("trigger", "t4")["ok"] is True
    assert agent.alive()
    assert agent.terminate() == 0, agent.logs()
    rec.close()


def test_notify_socket_gets_ready_watchdog_stopping(tmp_path: Path, tiny_bundle: Path, mosquitto, agents) -> None:
    folder = tmp_path / "in"
    write_images(folder, plain_part_images(2, seed=4))
    sock_path = tmp_path / "notify.sock"
    received: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(0.5)

        def got(line: str) -> bool:
            with contextlib.suppress(TimeoutError):  # nothing this half second: poll again
                received.extend(sock.recv(4096).decode().splitlines())
            return line in received

        env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"}
        agent = agents(base_config(tmp_path, tiny_bundle, mosquitto.port, str(folder)), env=env)
        wait_until(lambda: got("READY=1"), 60, "READY=1", interval=0)
        wait_until(lambda: got("WATCHDOG=1"), 30, "WATCHDOG=1", interval=0)
        agent.proc.send_signal(15)
        wait_until(lambda: got("STOPPING=1"), 30, "STOPPING=1", interval=0)
        assert agent.proc.wait(30) == 0, agent.logs()
    assert received.index("READY=1") < received.index("STOPPING=1")
    assert any(line.startswith("STATUS=") for line in received)


def test_ready_after_the_timeout_when_the_broker_is_unreachable(tmp_path: Path, tiny_bundle: Path, agents) -> None:
    folder = tmp_path / "in"
    write_images(folder, plain_part_images(2, seed=6))
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(60)
        cfg = base_config(tmp_path, tiny_bundle, free_port(), str(folder), service={"ready_timeout_s": 1})
        agent = agents(cfg, env={"NOTIFY_SOCKET": str(sock_path)})
        lines: list[str] = []
        while "READY=1" not in lines:
            lines = sock.recv(4096).decode().splitlines()
        assert any(line.startswith("STATUS=degraded") and "broker" in line for line in lines), lines
        # Inspection went on without the broker: the verdicts wait in the outbox.
        wait_until(lambda: outbox_rows(tmp_path / "state") == 2, 30, "2 verdicts waiting in the outbox")
        assert agent.terminate() == 0, agent.logs()


def test_video_file_source_end_to_end(tmp_path: Path, tiny_bundle: Path, mosquitto, agents) -> None:
    video = tmp_path / "clip.avi"
    frames = plain_part_images(12, seed=8)
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (96, 96))
    assert writer.isOpened()
    for f in frames:
        writer.write(f)
    writer.release()
    rec = Recorder(mosquitto.port, [f"{BASE}/#"])
    agent = agents(base_config(tmp_path, tiny_bundle, mosquitto.port, str(video)))
    rec.wait_json(f"{BASE}/event", lambda e: e["event"] == "source_ended", timeout=60, what="source_ended")
    wait_until(lambda: len(rec.on(f"{BASE}/verdict")) >= 12, 20, "12 verdicts")
    verdicts = rec.json_on(f"{BASE}/verdict")
    assert [v["source"] for v in verdicts] == [f"{video}#{i}" for i in range(12)]
    assert len({v["id"] for v in verdicts}) == 12
    assert agent.alive()  # a finished file leaves the service up, idle
    assert agent.terminate() == 0, agent.logs()
    rec.close()


def test_bad_config_exits_78_naming_the_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("device_id: cam1\nbundle: /nowhere\ncapture: {source: 0}\nmqtt: {host: h, port: x}\n")
    proc = subprocess.run([sys.executable, "-m", "agent.service", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78
    assert "mqtt.port" in proc.stderr


def make_tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl command."""
    import shutil
    import subprocess

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    folder.mkdir()
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2", "-subj", "/CN=yugami test CA")
    run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    san = folder / "san.cnf"
    san.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(san))
    return ca, cert, key


def test_tls_and_password_from_systemd_credentials(tmp_path: Path, tiny_bundle: Path, agents) -> None:
    import shutil
    import subprocess

    from tests.integration.conftest import MOSQUITTO, Mosquitto

    if not Path(MOSQUITTO).exists() or shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto / mosquitto_passwd are not installed")
    ca, cert, key = make_tls_files(tmp_path / "tls")
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "agent", "s3cret-pw"], check=True, timeout=30)
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    broker = Mosquitto(broker_dir, [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}",
                                    "allow_anonymous false", f"password_file {passwd}"])
    broker.start()
    try:
        creds = tmp_path / "credentials"
        creds.mkdir()
        (creds / "mqtt-password").write_text("s3cret-pw\n")
        folder = tmp_path / "in"
        write_images(folder, plain_part_images(2, seed=7))
        rec = Recorder(broker.port, [f"{BASE}/verdict"], ca_file=ca, auth=("agent", "s3cret-pw"))
        cfg = base_config(tmp_path, tiny_bundle, broker.port, str(folder),
                          mqtt={"username": "agent", "password_file": "${CREDENTIALS_DIRECTORY}/mqtt-password",
                                "tls": {"enabled": True, "ca_file": str(ca)}})
        agent = agents(cfg, env={"CREDENTIALS_DIRECTORY": str(creds)})
        wait_until(lambda: len(rec.on(f"{BASE}/verdict")) >= 2, 60, "2 verdicts over TLS with a password")
        assert agent.terminate() == 0, agent.logs()
        rec.close()
    finally:
        broker.stop()
