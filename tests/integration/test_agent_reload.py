"""Issue 13, item 1, the service's part, against the real agent: a malformed bundle is exit 78 at start; on
SIGHUP and cmd/reload it is refused, the bundle in use stays, verdicts keep coming, a ``reload_refused``
event says why, and the notify socket gets READY=1 after every RELOADING=1."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import ROOT, Recorder, base_config, wait_until, write_config
from tests.integration.test_agent_flood import FrameWriter
from tests.integration.test_agent_mqtt import BASE

pytestmark = pytest.mark.integration


class NotifyListener(threading.Thread):
    """A real NOTIFY_SOCKET: every line the agent sends, in order."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.lines: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                self.lines.extend(self.sock.recv(65536).decode().splitlines())
        self.sock.close()

    def protocol(self) -> list[str]:
        return [line for line in list(self.lines) if line in ("READY=1", "RELOADING=1", "STOPPING=1")]


def malformed_copy(good: Path, out: Path, mutate: Callable[[dict[str, Any]], None]) -> Path:
    """The good bundle with its manifest changed (written as Python's json writes it: NaN as the token NaN).
    The files' sha256 in the manifest still match; the manifest's own sha256 is whatever it now is."""
    shutil.copytree(good, out)
    manifest = json.loads((good / "manifest.json").read_text())
    mutate(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def replace_folder(target: Path, new: Path) -> None:
    old = target.with_name(target.name + ".old")
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old)


def nan_threshold(m: dict[str, Any]) -> None:
    m["threshold"]["value"] = float("nan")


def string_dim(m: dict[str, Any]) -> None:
    m["embedding_dim"] = "abc"


def test_a_malformed_bundle_at_start_exits_78_with_the_loaders_message(tmp_path: Path, tiny_bundle: Path) -> None:
    bundle = malformed_copy(tiny_bundle, tmp_path / "bundle", nan_threshold)
    assert "NaN" in (bundle / "manifest.json").read_text()
    (tmp_path / "in").mkdir()
    config = write_config(tmp_path / "agent.yaml", **base_config(tmp_path, bundle, 1, str(tmp_path / "in")))
    proc = subprocess.run([sys.executable, "-m", "agent.service", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 78, proc.stderr[-3000:]
    assert "threshold.value" in proc.stderr and "Traceback" not in proc.stderr


def test_a_malformed_bundle_on_reload_is_refused_and_ready_follows_reloading(
    tmp_path: Path, tiny_bundle: Path, mosquitto, agents
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    folder = tmp_path / "in"
    folder.mkdir()
    notify = NotifyListener(tmp_path / "notify.sock")
    notify.start()
    writer = FrameWriter(folder, period_s=0.1)
    rec = Recorder(mosquitto.port, [f"{BASE}/verdict", f"{BASE}/event", f"{BASE}/cmd/+/result"])
    agent = agents(base_config(tmp_path, bundle, mosquitto.port, str(folder)),
                   env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    writer.start()
    try:
        wait_until(lambda: rec.on(f"{BASE}/verdict") or not agent.alive(), 90, "the first verdict")
        wait_until(lambda: "READY=1" in notify.protocol(), 30, "READY=1")
        good_sha = rec.json_on(f"{BASE}/verdict")[0]["model"]["sha256"]

        # SIGHUP with a NaN threshold
        replace_folder(bundle, malformed_copy(tiny_bundle, tmp_path / "nan", nan_threshold))
        agent.proc.send_signal(1)
        first = rec.wait_json(f"{BASE}/event", lambda e: e["event"] == "reload_refused", timeout=30,
                              what="reload_refused after SIGHUP")
        assert "threshold" in first["error"] and first["model"]["sha256"] == good_sha

        # cmd/reload with a wrong-typed field
        replace_folder(bundle, malformed_copy(tiny_bundle, tmp_path / "dim", string_dim))
        rec.publish(f"{BASE}/cmd/reload", json.dumps({"id": "r1"}))
        answer = rec.wait_json(f"{BASE}/cmd/reload/result", lambda r: r.get("request_id") == "r1", timeout=30,
                               what="the reload answer")
        assert answer["ok"] is False and "embedding_dim" in answer["error"]
        assert answer["model"]["sha256"] == good_sha
        wait_until(lambda: len([e for e in rec.json_on(f"{BASE}/event") if e["event"] == "reload_refused"]) >= 2,
                   30, "a second reload_refused")

        # still alive, still inspecting with the old model
        seen = len(rec.on(f"{BASE}/verdict"))
        wait_until(lambda: len(rec.on(f"{BASE}/verdict")) >= seen + 5 or not agent.alive(), 60, "5 more verdicts")
        assert agent.alive(), agent.logs()
        assert {v["model"]["sha256"] for v in rec.json_on(f"{BASE}/verdict")} == {good_sha}

        # READY=1 after every RELOADING=1
        wait_until(lambda: notify.protocol().count("READY=1") >= 3, 30, "READY=1 after the second reload")
        lines = notify.protocol()
        assert lines.count("RELOADING=1") == 2, lines
        for i, line in enumerate(lines):
            if line == "RELOADING=1":
                assert lines[i + 1] == "READY=1", lines
        assert agent.terminate() == 0, agent.logs()
    finally:
        writer.stop.set()
        notify.stop.set()
        rec.close()
