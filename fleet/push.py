"""``yugami-fleet push`` and ``yugami-fleet rollback``: send a bundle to boxes (or a group) over MQTT, or send them
back to their previous bundle, and report what each box did.

push: the bundle folder goes as an uncompressed tar in chunks of 256 KiB (agent.install), each chunk one
``cmd/install`` message to ``<prefix>/<device>/cmd/install`` or, for ``--group``, once to
``<prefix>/group/<group>/cmd/install``. Each box checks the sha256 of the whole, the signature, the version,
shadow-scores its recent frames with the bundle, applies its health gate and switches; its one answer comes
on ``<prefix>/<device>/cmd/install/result``. Which boxes are in a group is read from their retained stats
(``groups``); a box of the group that does not report it is still heard if it answers before ``--timeout``.

Exit status: 0 every box installed (or rolled back); 1 some box refused, failed or did not answer, or the
broker could not be reached; 2 bad arguments or a folder that is not a bundle.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from paho.mqtt.enums import MQTTErrorCode

from agent.install import CHUNK_BYTES, InstallError, bundle_tar, install_chunks, manifest_identity
from fleet.mqtt import (
    BrokerError,
    Results,
    add_broker_arguments,
    close,
    command_topic,
    connect,
    describe,
    group_command_topic,
    new_request_id,
)
from fleet.table import columns

logger = logging.getLogger(__name__)

DISCOVER_S = 1.5  # how long retained stats are gathered to learn versions and group members
SEND_TIMEOUT_S = 120.0  # the broker must have taken every chunk by then
POLL_S = 0.1  # how often answers are looked at while waiting (the resolution of per-box wall times)


def _targets(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", nargs="+", metavar="ID", help="the boxes (their device_id)")
    target.add_argument("--group", metavar="NAME", help="every box with NAME in its fleet.groups")
    parser.add_argument("--timeout", type=float, default=300.0, metavar="S",
                        help="seconds to wait for every box's answer (default 300)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, metavar="BUNDLE", help="the bundle folder (signed: yugami-keys sign)")
    _targets(parser)
    parser.add_argument("--force", action="store_true", help="allow an older version than the one in use")
    parser.add_argument("--no-shadow", action="store_true",
                        help="switch without shadow-scoring recent frames first (the watch after the switch stays)")
    add_broker_arguments(parser)


def add_rollback_arguments(parser: argparse.ArgumentParser) -> None:
    _targets(parser)
    add_broker_arguments(parser)


# --- what the boxes report -----------------------------------------------------------------------------


def retained_stats(client: Any, prefix: str, wait_s: float = DISCOVER_S) -> dict[str, dict[str, Any]]:
    """{device: its retained stats} as the broker has them."""
    from fleet.status import collect  # the one reader of retained box state

    return {d: seen.stats for d, seen in collect(client, prefix, wait_s).items() if seen.stats}


def group_members(stats: dict[str, dict[str, Any]], group: str) -> list[str]:
    return sorted(d for d, s in stats.items() if group in (s.get("groups") or []))


def _version(model: Any) -> str | None:
    return str(model["version"]) if isinstance(model, dict) and model.get("version") is not None else None


def box_row(device: str, answer: dict[str, Any] | None, before: str | None, wall_s: float | None) -> dict[str, Any]:
    """One box's line of the report, from its final answer (None: it did not answer)."""
    if answer is None:
        return {"device": device, "ok": False, "answered": False, "before": before, "after": None, "shadow": None,
                "error": "no answer before --timeout (offline, not in the group, or still busy)", "wall_s": None}
    previous = _version(answer.get("previous") or answer.get("from"))
    shadow = answer.get("shadow") if isinstance(answer.get("shadow"), dict) else None
    return {"device": device, "ok": answer.get("ok") is True, "answered": True, "before": previous or before,
            "after": _version(answer.get("model")), "shadow": shadow, "error": answer.get("error"),
            "reason": answer.get("reason"), "wall_s": wall_s, "times": answer.get("times")}


def _share(shadow: dict[str, Any] | None) -> str:
    if not shadow or shadow.get("anomaly_share") is None:
        return "-"
    old = shadow.get("old_anomaly_share")
    return f"{shadow['anomaly_share']:.2f} (was {old:.2f})" if old is not None else f"{shadow['anomaly_share']:.2f}"


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = ["BOX", "RESULT", "VERSION", "SHADOW ANOMALIES", "ERROR"]
    lines = [head]
    for r in rows:
        result = "ok" if r["ok"] else ("no answer" if not r["answered"] else "failed")
        lines.append([r["device"], result, f"{r['before'] or '?'} -> {r['after'] or '?'}", _share(r["shadow"]),
                      str(r["error"] or r.get("reason") or "")])
    return columns(lines)


# --- sending --------------------------------------------------------------------------------------------


def publish_all(client: Any, messages: list[tuple[str, dict[str, Any]]], timeout: float = SEND_TIMEOUT_S) -> None:
    """Publish every (topic, body) at QoS 1, in order, and wait until the broker acknowledged them all."""
    infos = []
    for topic, body in messages:
        info = client.publish(topic, json.dumps(body, separators=(",", ":")).encode("utf-8"), qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerError(f"cannot publish to {topic}: rc {info.rc}")
        infos.append(info)
    deadline = time.monotonic() + timeout
    for info in infos:
        try:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        except (RuntimeError, ValueError) as exc:  # the connection dropped while the chunks were going out
            raise BrokerError(f"sending the bundle's chunks failed: {exc}") from exc
        if not info.is_published():
            raise BrokerError(f"the broker did not take the bundle's chunks within {timeout:g} s")


def wait_answers(results: Results, devices: list[str] | None, timeout: float, start: float,
                 group: bool) -> tuple[dict[str, dict[str, Any] | None], dict[str, float]]:
    """Answers by box, and when each came (seconds since ``start``). ``devices`` None: whoever answers by the
    timeout (a group whose members are not known)."""
    deadline = time.monotonic() + timeout
    arrived: dict[str, float] = {}
    while True:
        known = sorted(set(devices or []) | (set(results.devices()) if group else set()))
        got = results.wait(0, known)
        for d, answer in got.items():
            if answer is not None and d not in arrived:
                arrived[d] = round(time.monotonic() - start, 3)
        if devices is not None and all(got.get(d) is not None for d in devices):
            return got, arrived
        if time.monotonic() >= deadline:
            return got, arrived
        time.sleep(POLL_S)


def _broker_failed(exc: Exception, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"ok": False, "error": str(exc)}))
    else:
        print(f"yugami-fleet: {exc}", file=sys.stderr)
    return 1


def run_push(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    try:
        tar = bundle_tar(args.bundle)
        name, version = manifest_identity(args.bundle)
    except (InstallError, OSError) as exc:
        print(f"yugami-fleet push: {exc}", file=sys.stderr)
        return 2
    transfer = new_request_id()
    chunks = install_chunks(tar, transfer, force=args.force, shadow=not args.no_shadow, chunk_bytes=CHUNK_BYTES)
    times: dict[str, float] = {}
    try:
        client = connect(args, "push")
    except BrokerError as exc:
        return _broker_failed(exc, args.json)
    times["connect_s"] = round(time.monotonic() - t0, 3)
    try:
        stats = retained_stats(client, args.prefix)
        times["discover_s"] = round(time.monotonic() - t0 - times["connect_s"], 3)
        devices = list(dict.fromkeys(args.device)) if args.device else group_members(stats, args.group)
        if args.group and not devices:  # nobody to wait for by name: say so now, not after --timeout
            print(f"yugami-fleet push: no box on {describe(args)} reports group {args.group!r} in its stats "
                  f"(yugami-fleet status lists each box's groups; check the name and the boxes' fleet.groups); "
                  f"waiting {args.timeout:g} s for answers from boxes that do not report their groups",
                  file=sys.stderr)
        with Results(client, args.prefix, "install") as results:
            request_id = new_request_id()
            start = time.monotonic()
            if args.group:
                results.expect_any(request_id)
                topics = [group_command_topic(args.prefix, args.group, "install")]
            else:
                for d in devices:
                    results.expect(d, request_id)
                topics = [command_topic(args.prefix, d, "install") for d in devices]
            # chunk by chunk to every box: each box's transfer advances together
            publish_all(client, [(topic, {**chunk, "id": request_id}) for chunk in chunks for topic in topics])
            times["send_s"] = round(time.monotonic() - start, 3)
            got, arrived = wait_answers(results, devices or None, args.timeout, start, bool(args.group))
            times["wait_s"] = round(time.monotonic() - start - times["send_s"], 3)
    except BrokerError as exc:
        return _broker_failed(exc, args.json)
    finally:
        close(client)
    times["total_s"] = round(time.monotonic() - t0, 3)
    rows = [box_row(d, got.get(d), _version((stats.get(d) or {}).get("model")), arrived.get(d)) for d in sorted(got)]
    ok = bool(rows) and all(r["ok"] for r in rows)
    report = {"ok": ok, "bundle": {"path": str(args.bundle), "name": name, "version": version, "bytes": len(tar),
                                   "chunks": len(chunks), "sha256": chunks[0]["sha256"]},
              "target": {"devices": args.device, "group": args.group, "broker": describe(args)},
              "transfer": transfer, "times": times, "boxes": rows}
    _print(report, args.json, f"bundle {name} {version} ({len(tar)} bytes, {len(chunks)} chunks)")
    return 0 if ok else 1


def run_rollback(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    try:
        client = connect(args, "rollback")
    except BrokerError as exc:
        return _broker_failed(exc, args.json)
    try:
        stats = retained_stats(client, args.prefix) if args.group else {}
        devices = list(dict.fromkeys(args.device)) if args.device else group_members(stats, args.group)
        with Results(client, args.prefix, "rollback") as results:
            request_id = new_request_id()
            start = time.monotonic()
            if args.group:
                results.expect_any(request_id)
                publish_all(client, [(group_command_topic(args.prefix, args.group, "rollback"), {"id": request_id})])
            else:
                for d in devices:
                    results.expect(d, request_id)
                publish_all(client, [(command_topic(args.prefix, d, "rollback"), {"id": request_id}) for d in devices])
            got, arrived = wait_answers(results, devices or None, args.timeout, start, bool(args.group))
    except BrokerError as exc:
        return _broker_failed(exc, args.json)
    finally:
        close(client)
    rows = [box_row(d, got.get(d), None, arrived.get(d)) for d in sorted(got)]
    ok = bool(rows) and all(r["ok"] for r in rows)
    report = {"ok": ok, "target": {"devices": args.device, "group": args.group, "broker": describe(args)},
              "times": {"total_s": round(time.monotonic() - t0, 3)}, "boxes": rows}
    _print(report, args.json, "rollback")
    return 0 if ok else 1


def _print(report: dict[str, Any], as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(report, indent=1))
        return
    print(title)
    if report["boxes"]:
        print(format_rows(report["boxes"]))
    else:
        print("no box answered (for --group: none reports the group in its stats, and none answered in time)")
    failed = [r["device"] for r in report["boxes"] if not r["ok"]]
    total = report["times"].get("total_s")
    print(f"{len(report['boxes']) - len(failed)} of {len(report['boxes'])} boxes ok in {total:.1f} s"
          + (f"; failed or silent: {', '.join(failed)}" if failed else ""))
