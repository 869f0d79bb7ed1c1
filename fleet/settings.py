"""``yugami-fleet set``: change the settings of running boxes (threshold, max_fps, Grad-CAM policy) over MQTT.

Sends ``cmd/set`` to each box named (``cmd/get`` when no setting is given) and prints each box's answer: the
settings it uses now and where each comes from (``set`` on the box, the ``bundle``, the ``config``). A box
checks and keeps the settings itself (agent.settings); a threshold applies to the model the box runs now.

Exit status: 0 every box answered ok; 1 a box refused, did not answer, or the broker could not be reached;
2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from fleet.mqtt import BrokerError, add_broker_arguments, close, connect, describe, request
from fleet.table import columns

# agent.settings.GRADCAM_POLICIES, copied (importing agent.settings loads numpy); a test keeps them equal
GRADCAM_POLICIES = ("off", "on_command", "every_anomaly")


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _positive(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0 (use --clear-max-fps for the config's value)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", nargs="+", required=True, metavar="ID", help="the boxes' device ids")
    t = parser.add_mutually_exclusive_group()
    t.add_argument("--threshold", type=_finite, metavar="X",
                   help="the anomaly threshold (score > X is an anomaly), for the model each box runs now")
    t.add_argument("--clear-threshold", action="store_true", help="back to the bundle's threshold")
    f = parser.add_mutually_exclusive_group()
    f.add_argument("--max-fps", type=_positive, metavar="N", help="inspect at most N frames per second")
    f.add_argument("--clear-max-fps", action="store_true", help="back to the config's capture.max_fps")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--gradcam-policy", choices=GRADCAM_POLICIES, help="when heat maps are made")
    g.add_argument("--clear-gradcam-policy", action="store_true", help="back to the config's gradcam.policy")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="seconds to wait for the boxes' answers (default: 10)")
    parser.add_argument("--json", action="store_true", help="print {device: answer} as JSON instead of a table")
    parser.epilog = ("With no setting given, shows each box's settings (cmd/get). Examples:\n"
                     "  yugami-fleet set --device cam-1 cam-2 --threshold 0.31 --broker central.local\n"
                     "  yugami-fleet set --device cam-1 --clear-threshold --max-fps 5\n"
                     "  yugami-fleet set --device cam-1")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_broker_arguments(parser)


def changes_of(args: argparse.Namespace) -> dict[str, Any]:
    """The cmd/set body the options ask for ({} for none: then the command is cmd/get); null clears."""
    body: dict[str, Any] = {}
    if args.threshold is not None:
        body["threshold"] = args.threshold
    elif args.clear_threshold:
        body["threshold"] = None
    if args.max_fps is not None:
        body["max_fps"] = args.max_fps
    elif args.clear_max_fps:
        body["max_fps"] = None
    if args.gradcam_policy is not None:
        body["gradcam_policy"] = args.gradcam_policy
    elif args.clear_gradcam_policy:
        body["gradcam_policy"] = None
    return body


HEADER = ["DEVICE", "OK", "THRESHOLD", "MAX FPS", "GRADCAM", "ERROR"]


def _setting(settings: dict[str, Any], key: str) -> str:
    s = settings.get(key)
    if not isinstance(s, dict):
        return "-"
    value = s.get("value")
    text = "none" if value is None else (f"{value:g}" if isinstance(value, (int, float)) else str(value))
    return f"{text} ({s.get('source', '?')})"


def row(device: str, answer: dict[str, Any] | None) -> list[str]:
    if answer is None:
        return [device, "no", "-", "-", "-", "no answer (box offline, or another --prefix?)"]
    settings = answer.get("settings") if isinstance(answer.get("settings"), dict) else {}
    return [device, "yes" if answer.get("ok") else "no", _setting(settings, "threshold"),
            _setting(settings, "max_fps"), _setting(settings, "gradcam_policy"), str(answer.get("error") or "")]


def format_table(answers: dict[str, dict[str, Any] | None]) -> str:
    return columns([HEADER, *(row(d, a) for d, a in answers.items())])


def run(args: argparse.Namespace) -> int:
    devices = list(dict.fromkeys(args.device))  # each box once, in the order given
    body = changes_of(args)
    try:
        client = connect(args, "set")
    except BrokerError as exc:
        print(f"yugami-fleet set: {exc}", file=sys.stderr)
        return 1
    try:
        # cmd/set with the changes; with none, cmd/get (what each box uses now)
        answers = request(client, args.prefix, devices, "set" if body else "get", body,
                          timeout=max(0.0, args.timeout))
    except BrokerError as exc:
        print(f"yugami-fleet set: {exc}", file=sys.stderr)
        return 1
    finally:
        close(client)
    if args.json:
        print(json.dumps(answers, indent=2))
    else:
        print(format_table(answers))
    failed = [d for d, a in answers.items() if a is None or not a.get("ok")]
    if failed:
        print(f"yugami-fleet set: {len(failed)} of {len(devices)} box(es) answered with an error or not at all: "
              f"{', '.join(failed)} "
              f"(broker {describe(args)})", file=sys.stderr)
        return 1
    return 0
