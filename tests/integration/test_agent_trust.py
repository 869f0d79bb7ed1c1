"""Issue 14, item 1, against the real agent and broker: with ``bundle_trust`` keys, a tampered file, a bad
signature, an unknown key, an unsigned bundle and a downgrade without force are each refused on cmd/reload
with the reason in the result and a ``reload_refused`` event, while verdicts keep carrying the bundle in use;
a bundle signed with the second (rotated-in) key is accepted, a forced downgrade too; stats name the signer.
At start a refused bundle is exit 78 with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import ROOT, Recorder, base_config, wait_until, write_config
from tests.integration.test_agent_flood import FrameWriter
from tests.integration.test_agent_mqtt import BASE
from tests.integration.test_agent_reload import replace_folder
from tests.unit.test_trust import bundle_copy, corrupt_signature, keypair, tamper_file

pytestmark = pytest.mark.integration


def trust(keys: list[Path]) -> dict[str, Any]:
    return {"bundle_trust": {"public_keys": [str(k) for k in keys]}}


def test_a_refused_bundle_at_start_exits_78_with_the_reason(tmp_path: Path) -> None:
    _, public = keypair(tmp_path / "keys", "release")
    bundle = bundle_copy(tmp_path / "bundle")  # unsigned
    (tmp_path / "in").mkdir()
    config = write_config(tmp_path / "agent.yaml",
                          **base_config(tmp_path, bundle, 1, str(tmp_path / "in"), **trust([public])))
    proc = subprocess.run([sys.executable, "-m", "agent.service", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 78, proc.stderr[-3000:]
    assert "unsigned" in proc.stderr and "yugami-keys sign" in proc.stderr and "Traceback" not in proc.stderr


def test_reload_refuses_untrusted_bundles_and_keeps_the_one_in_use(tmp_path: Path, mosquitto, agents) -> None:
    keys = tmp_path / "keys"
    (old_key, old_pub), (new_key, new_pub), (rogue_key, _) = (keypair(keys, n) for n in ("old", "new", "rogue"))
    bundle = bundle_copy(tmp_path / "bundle", version="2", key=old_key)
    folder = tmp_path / "in"
    folder.mkdir()
    writer = FrameWriter(folder, period_s=0.1)
    rec = Recorder(mosquitto.port, [f"{BASE}/verdict", f"{BASE}/event", f"{BASE}/cmd/+/result", f"{BASE}/stats"])
    agent = agents(base_config(tmp_path, bundle, mosquitto.port, str(folder), **trust([old_pub, new_pub])))
    writer.start()
    try:
        wait_until(lambda: rec.on(f"{BASE}/verdict") or not agent.alive(), 90, "the first verdict")
        good_sha = rec.json_on(f"{BASE}/verdict")[0]["model"]["sha256"]
        stats = rec.wait_json(f"{BASE}/stats", lambda s: s["model"]["sha256"] == good_sha, what="stats")
        assert stats["model"]["version"] == "2" and stats["model"]["signer"]["name"] == "old"

        def variant(name: str, version: str = "2", key: Path | None = old_key) -> Path:
            return bundle_copy(tmp_path / name, version=version, key=key)

        tampered = variant("tampered")
        tamper_file(tampered)
        bad = variant("bad")
        corrupt_signature(bad)
        cases = [
            ("tampered", tampered, r"sha256 mismatch"),
            ("bad", bad, "bad signature"),
            ("unknown", variant("unknown", key=rogue_key), "unknown key id"),
            ("unsigned", variant("unsigned", key=None), "unsigned"),
            ("downgrade", variant("older", version="1"), "downgrade from version 2 to 1 refused"),
        ]
        for i, (case, new, reason) in enumerate(cases):
            replace_folder(bundle, new)
            rec.publish(f"{BASE}/cmd/reload", json.dumps({"id": case}))
            answer = rec.wait_json(f"{BASE}/cmd/reload/result", lambda r, c=case: r.get("request_id") == c,
                                   timeout=30, what=f"the answer to the {case} reload")
            assert answer["ok"] is False and reason in answer["error"], answer
            assert answer["model"]["sha256"] == good_sha and answer["model"]["signer"]["name"] == "old"
            refused = wait_until(lambda n=i + 1: [e for e in rec.json_on(f"{BASE}/event")
                                                  if e["event"] == "reload_refused"][n - 1:n], 30,
                                 f"reload_refused for {case}")[0]
            assert reason in refused["error"] and refused["model"]["sha256"] == good_sha, refused

        seen = len(rec.on(f"{BASE}/verdict"))
        wait_until(lambda: len(rec.on(f"{BASE}/verdict")) >= seen + 5 or not agent.alive(), 60, "5 more verdicts")
        assert agent.alive(), agent.logs()
        assert {v["model"]["sha256"] for v in rec.json_on(f"{BASE}/verdict")} == {good_sha}

        # rotation: a newer bundle signed with the second trusted key is taken
        replace_folder(bundle, variant("v3", version="3", key=new_key))
        rec.publish(f"{BASE}/cmd/reload", json.dumps({"id": "rotated"}))
        answer = rec.wait_json(f"{BASE}/cmd/reload/result", lambda r: r.get("request_id") == "rotated", timeout=30)
        assert answer["ok"] is True and answer["model"]["version"] == "3", answer
        assert answer["model"]["signer"]["name"] == "new"
        rec.wait_json(f"{BASE}/stats", lambda s: s["model"]["signer"] and s["model"]["signer"]["name"] == "new",
                      timeout=30, what="stats naming the new signer")

        # a downgrade goes through only with force
        replace_folder(bundle, variant("back", version="2"))
        rec.publish(f"{BASE}/cmd/reload", json.dumps({"id": "plain"}))
        answer = rec.wait_json(f"{BASE}/cmd/reload/result", lambda r: r.get("request_id") == "plain", timeout=30)
        assert answer["ok"] is False and "send force: true" in answer["error"]
        rec.publish(f"{BASE}/cmd/reload", json.dumps({"id": "forced", "force": True}))
        answer = rec.wait_json(f"{BASE}/cmd/reload/result", lambda r: r.get("request_id") == "forced", timeout=30)
        assert answer["ok"] is True and answer["model"]["version"] == "2", answer
        rec.publish(f"{BASE}/cmd/reload", json.dumps({"id": "typo", "force": "yes"}))
        answer = rec.wait_json(f"{BASE}/cmd/reload/result", lambda r: r.get("request_id") == "typo", timeout=30)
        assert answer["ok"] is False and "'force' must be true or false" in answer["error"]
        assert agent.terminate() == 0, agent.logs()
    finally:
        writer.stop.set()
        rec.close()
