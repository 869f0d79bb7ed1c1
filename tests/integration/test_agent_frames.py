"""Issue 13, item 5, against the real agent: a decompression bomb, a tiny frame and a text file in the folder
are each a bad_frame for that file, and the good frames after them are scored."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.builders import plain_part_images
from tests.integration.conftest import Recorder, base_config, wait_until, write_images
from tests.integration.test_agent_mqtt import BASE
from tests.unit.test_frame_size import png_bomb

pytestmark = pytest.mark.integration


def test_bomb_and_tiny_frames_are_bad_frames_and_later_frames_are_scored(tmp_path: Path, tiny_bundle: Path,
                                                                          mosquitto, agents) -> None:
    folder = tmp_path / "in"
    write_images(folder, plain_part_images(1, seed=30), prefix="0")
    rec = Recorder(mosquitto.port, [f"{BASE}/#"])
    agent = agents(base_config(tmp_path, tiny_bundle, mosquitto.port, str(folder)))
    try:
        # Events are live messages: write the bad files once the agent is connected and inspecting.
        wait_until(lambda: rec.on(f"{BASE}/verdict") or not agent.alive(), 90, "the first verdict")
        (folder / "a_0000.png").write_bytes(png_bomb(70000, 70000))
        write_images(folder, plain_part_images(1, seed=31), prefix="b")
        ok, tiny = cv2.imencode(".png", np.full((4, 4, 3), 128, np.uint8))
        assert ok
        (folder / "c_0000.png").write_bytes(tiny.tobytes())
        (folder / "d_0000.jpg").write_bytes(b"plain text pretending to be a JPEG")
        write_images(folder, plain_part_images(1, seed=32), prefix="e")
        wait_until(lambda: len(rec.on(f"{BASE}/verdict")) >= 3 or not agent.alive(), 60, "3 verdicts")
        assert agent.alive(), agent.logs()
        verdicts = rec.json_on(f"{BASE}/verdict")
        assert [Path(v["source"]).name for v in verdicts] == ["0_0000.png", "b_0000.png", "e_0000.png"]

        def bad_frames() -> list[dict]:
            found = [e for e in rec.json_on(f"{BASE}/event") if e["event"] == "bad_frame"]
            return found if len(found) >= 3 else []

        bad = wait_until(bad_frames, 20, "3 bad_frame events")
        by_file = {Path(e["source"]).name: e["error"] for e in bad}
        assert "capture.max_pixels" in by_file["a_0000.png"] and "70000x70000" in by_file["a_0000.png"]
        assert "smaller than the minimum" in by_file["c_0000.png"]
        assert "not a readable image" in by_file["d_0000.jpg"]
        assert not [e for e in rec.json_on(f"{BASE}/event") if e["event"] == "source_down"]
        stats = rec.wait_json(f"{BASE}/stats", lambda s: s["frames"] == 3 and s["errors"] == 3, what="stats")
        assert stats["source"]["state"] == "up"
    finally:
        rc = agent.terminate()
    assert rc == 0, agent.logs()
    # The bad files were marked inspected: a restart scores nothing again and reports nothing again.
    seen = next((tmp_path / "state").glob("folder-*.seen")).read_text().split()
    assert {"a_0000.png", "c_0000.png", "d_0000.jpg"} <= set(seen)
    rec.close()
