"""``yugami-fleet``: look after many camera boxes from the workstation, over MQTT.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and ``run(args) -> int``;
this file only wires them up, so a box of subcommands loads only what it uses.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

SUBCOMMANDS = {
    # name: (module, one-line help)
    "status": ("fleet.status", "a table of every box seen on the broker (model, signer, threshold, fps, backlog)"),
    "push": ("fleet.push", "send a signed bundle to boxes or a group; each verifies, shadow-scores and switches"),
    "rollback": ("fleet.push", "tell boxes to go back to their previous bundle"),
    "set": ("fleet.settings", "change a box's settings at run time (threshold, max_fps, gradcam policy)"),
    "collect": ("fleet.collect", "fetch labelled frames and evidence from boxes into a data folder for yugami-train"),
    "serve": ("fleet.serve", "a review page: latest anomalies of every box, with buttons for operator feedback"),
}

EPILOG = """examples:
  yugami-fleet status --broker central.local
  yugami-fleet push runs/screw-v3/bundle --group line-2 --broker central.local
  yugami-fleet collect --device cam-1 cam-2 --out data/collected --broker central.local
  yugami-fleet serve --broker central.local --port 8080

Exit status: 0 success; 1 some box failed or did not answer; 2 bad arguments. See docs/FLEET.md."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yugami-fleet",
        description="Look after many yugami camera boxes over MQTT (see docs/FLEET.md).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens on the wire")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        # -v after the subcommand too (yugami-fleet push ... -v); SUPPRESS keeps a -v given before it
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log what happens on the wire")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # e.g. Flask for serve, on a box installed with yugami[agent] only
            p.set_defaults(missing=f"yugami-fleet {name} needs the Python package {exc.name!r}: "
                                   "pip install 'yugami[fleet]' (see README.md, Install)")
            continue
        adder = getattr(module, f"add_{name}_arguments", None) or module.add_arguments
        adder(p)
        p.set_defaults(module=module_name, runner=f"run_{name}" if hasattr(module, f"run_{name}") else "run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)  # a subcommand that could not load knows none of its options
    if getattr(args, "missing", None):
        print(args.missing, file=sys.stderr)
        return 2
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    module = importlib.import_module(args.module)
    return int(getattr(module, args.runner)(args))


if __name__ == "__main__":
    sys.exit(main())
