"""yugami-fleet status: the table is a pure function of the retained messages received."""

from __future__ import annotations

import json

from agent.mqtt import parse_utc_iso
from fleet.status import Seen, build_rows, format_table, rows_json

NOW = parse_utc_iso("2026-01-10T12:00:00.000Z")


def stats(**extra: object) -> dict[str, object]:
    body: dict[str, object] = {
        "v": 1, "ts": "2026-01-10T11:59:55.000Z", "device": "cam1", "frames": 200, "fps": 2.0, "anomalies": 10,
        "outbox": {"depth": 3, "dropped": 0}, "model": {"name": "screw", "sha256": "ab" * 32},
    }
    body.update(extra)
    return body


def test_full_box() -> None:
    s = stats(model={"name": "screw", "sha256": "ab" * 32, "version": "1.2.0",
                     "signer": {"key_id": "0123456789abcdef", "name": "qa-lead", "signed_at": "2026-01-01T00:00:00Z"}},
              threshold={"value": 0.4125, "source": "set"}, groups=["line-2"])
    [row] = build_rows({"cam1": Seen("online", s, None)}, NOW)
    assert row.online is True
    assert (row.model, row.version, row.signer) == ("screw", "1.2.0", "qa-lead/0123456789abcdef")
    assert (row.threshold, row.threshold_source) == (0.4125, "set")
    assert row.fps == 2.0 and row.anomaly_rate == 0.05 and row.backlog == 3
    assert row.last_seen_s == 5.0
    assert row.groups == ["line-2"]
    text = format_table([row])
    assert text.splitlines()[0].split()[:3] == ["DEVICE", "ONLINE", "MODEL"]
    line = text.splitlines()[1]
    for cell in ("cam1", "yes", "screw 1.2.0", "qa-lead/0123456789abcdef", "0.4125 (set)", "2.0", "5.0% (10/200)",
                 "5s ago"):
        assert cell in line, (cell, line)


def test_what_older_agents_report_shows_dashes() -> None:
    """No version, signer or threshold in stats (before signed bundles and per-box settings): '-', or the
    threshold the last verdict was judged against."""
    [bare] = build_rows({"cam2": Seen("online", stats(), None)}, NOW)
    assert (bare.version, bare.signer, bare.threshold) == (None, None, None)
    cells = format_table([bare]).splitlines()[1].split()
    assert cells[2:5] == ["screw", "-", "-"]
    state = {"id": "f1", "ts": "2026-01-10T11:59:58.000Z", "threshold": 0.5, "model": {"name": "screw"}}
    [row] = build_rows({"cam2": Seen("online", stats(), state)}, NOW)
    assert (row.threshold, row.threshold_source) == (0.5, "last verdict")
    assert row.last_seen_s == 2.0  # the newest of stats and state


def test_offline_unknown_and_odd_payloads() -> None:
    seen = {
        "b-gone": Seen("offline", stats(ts="2026-01-10T09:00:00.000Z"), None),
        "a-new": Seen(None, None, None),
        "c-odd": Seen("online", {"frames": "many", "fps": True, "outbox": [], "model": "x", "ts": 5}, None),
        "d-idle": Seen("online", stats(frames=0, anomalies=0), None),
    }
    rows = build_rows(seen, NOW)
    assert [r.device for r in rows] == ["a-new", "b-gone", "c-odd", "d-idle"]
    new, gone, odd, idle = rows
    assert new.online is None and new.last_seen_s is None
    assert gone.online is False and gone.last_seen_s == 3 * 3600
    assert (odd.frames, odd.fps, odd.backlog, odd.model, odd.last_seen_s) == (None, None, None, None, None)
    assert idle.anomaly_rate is None  # no frames yet: no rate, not 0 %
    text = format_table(rows)
    assert "NO" in text.splitlines()[2] and "3h ago" in text.splitlines()[2]
    assert json.loads(json.dumps(rows_json(rows)))[1]["online"] is False


def test_parse_utc_iso() -> None:
    assert parse_utc_iso("2026-01-10T12:00:00Z") == NOW
    assert parse_utc_iso("2026-01-10T12:00:00") == NOW  # no zone: UTC, as the agent writes
    assert parse_utc_iso("yesterday") is None and parse_utc_iso(None) is None
