"""yugami-fleet push / rollback without a broker: arguments, the rows of the report, group members."""

from __future__ import annotations

import pytest

from fleet.cli import build_parser
from fleet.push import box_row, format_rows, group_members


def test_push_needs_a_bundle_and_devices_or_a_group() -> None:
    parser = build_parser()
    args = parser.parse_args(["push", "b", "--device", "cam-1", "cam-2", "--force", "--no-shadow", "--json"])
    assert args.device == ["cam-1", "cam-2"] and args.force and args.no_shadow and args.runner == "run_push"
    assert parser.parse_args(["rollback", "--group", "line-2"]).runner == "run_rollback"
    for bad in (["push", "b"], ["push", "b", "--device", "x", "--group", "g"], ["rollback"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_rows_say_what_each_box_did() -> None:
    ok = box_row("cam-1", {"ok": True, "model": {"version": "3"}, "previous": {"version": "2"},
                           "shadow": {"anomaly_share": 0.0625, "old_anomaly_share": 0.0625}}, "2", 4.2)
    failed = box_row("cam-2", {"ok": False, "error": "health gate: ...", "model": {"version": "2"},
                               "shadow": {"anomaly_share": 0.94, "old_anomaly_share": 0.06}}, "2", 5.0)
    silent = box_row("cam-3", None, "2", None)
    assert ok["ok"] and ok["before"] == "2" and ok["after"] == "3"
    assert not failed["ok"] and not silent["ok"] and not silent["answered"]
    text = format_rows([ok, failed, silent])
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["BOX", "RESULT"]
    assert "2 -> 3" in lines[1] and "0.06 (was 0.06)" in lines[1]
    assert "failed" in lines[2] and "health gate" in lines[2] and "no answer" in lines[3]


def test_group_members_come_from_the_boxes_stats() -> None:
    stats = {"a": {"groups": ["line-2"]}, "b": {"groups": ["line-1"]}, "c": {}}
    assert group_members(stats, "line-2") == ["a"]


def test_a_failed_send_is_a_broker_error_not_a_traceback() -> None:
    """paho's wait_for_publish raises RuntimeError when the message cannot go out: exit 1 with the reason."""
    from unittest import mock

    from fleet.mqtt import BrokerError
    from fleet.push import publish_all

    info = mock.Mock(rc=0)
    info.wait_for_publish.side_effect = RuntimeError("Message publish failed: The client is not currently connected.")
    client = mock.Mock()
    client.publish.return_value = info
    with pytest.raises(BrokerError, match="not currently connected"):
        publish_all(client, [("yugami/cam-1/cmd/install", {"id": "x"})], timeout=1)


def test_verbose_goes_before_or_after_the_subcommand() -> None:
    parser = build_parser()
    assert parser.parse_args(["status"]).verbose is False
    assert parser.parse_args(["-v", "status"]).verbose is True
    assert parser.parse_args(["push", "b", "--group", "g", "-v"]).verbose is True


def test_a_subcommand_whose_package_is_missing_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A box installed with yugami[agent] has yugami-fleet but no Flask: serve says so, the others still run."""
    import sys

    from fleet.cli import main

    monkeypatch.delitem(sys.modules, "fleet.serve", raising=False)
    monkeypatch.setitem(sys.modules, "flask", None)
    assert main(["serve", "--port", "8081"]) == 2
    err = capsys.readouterr().err
    assert "'flask'" in err and "pip install 'yugami[fleet]'" in err
    assert build_parser().parse_args(["status"]).runner == "run"
    with pytest.raises(SystemExit):
        main(["status", "--no-such-option"])
