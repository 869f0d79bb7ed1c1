"""demo.run's pieces: the agent config it writes passes the agent's own validation, the verdict lines and
tally say what happened, and the demo's light path never imports TensorFlow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent.config import load_config
from demo.run import Tally, frame_index, verdict_line, write_agent_config

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_config_is_a_valid_agent_config(tmp_path: Path) -> None:
    video = tmp_path / "parts.avi"
    video.write_bytes(b"")
    (tmp_path / "b").mkdir()
    path = write_agent_config(
        tmp_path / "agent.yaml",
        bundle=tmp_path / "b",
        video=video,
        host="127.0.0.1",
        port=1884,
        fps=5.0,
        state=tmp_path / "state",
    )
    cfg = load_config(path)
    assert cfg.device_id == "demo-cam"
    assert cfg.source_kind == "video" and cfg.capture.loop is False and cfg.capture.max_fps == 5.0
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.topic_prefix) == ("127.0.0.1", 1884, "yugami")
    assert cfg.gradcam.policy == "on_command" and cfg.gradcam.keep_frames >= 32
    assert cfg.mqtt.homeassistant.enabled is False
    assert cfg.storage_dir == tmp_path / "state"


def test_frame_index_from_the_video_source() -> None:
    assert frame_index("/x/out/parts.avi#17") == 17
    assert frame_index("/x/a#b/parts.avi#0") == 0
    assert frame_index("/dev/video0") is None
    assert frame_index("clip.avi#") is None


def verdict(verdict: str, score: float, frame_id: str = "r-000001") -> dict:
    return {"id": frame_id, "verdict": verdict, "score": score, "threshold": 0.01, "confidence": 0.9}


def test_verdict_lines_compare_with_the_truth() -> None:
    assert verdict_line(3, verdict("anomaly", 0.02), "scratch").endswith("right")
    assert verdict_line(4, verdict("ok", 0.005), "dent").endswith("MISSED")
    assert verdict_line(5, verdict("anomaly", 0.02), None).endswith("FALSE ALARM")
    line = verdict_line(6, verdict("ok", 0.005), None)
    assert line.startswith("frame   6  r-000001") and " ok " in line and line.endswith("right")


def test_tally_counts() -> None:
    t = Tally(truth=[None, "scratch", None, "dent"])
    t.verdicts = {0: verdict("ok", 0), 1: verdict("anomaly", 1), 2: verdict("anomaly", 1), 3: verdict("ok", 0)}
    assert t.counts() == {
        "frames": 4,
        "verdicts": 4,
        "flagged": 2,
        "defective": 2,
        "caught": 1,
        "missed": 1,
        "false_alarms": 1,
    }


def test_demo_modules_import_without_tensorflow() -> None:
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'tensorflow', 'keras', 'tf_keras'}:\n"
        "            raise ImportError(name + ' is blocked: the demo must run in the agent-only venv')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import demo.run, demo.synthetic, demo.broker, demo.make_bundle\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
