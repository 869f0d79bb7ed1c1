"""``yugami-fleet serve``: a review page for the latest anomalies of every box, with operator feedback.

A background MQTT client (fleet.mqtt) listens to every box under the prefix and fills a
:class:`fleet.review.ReviewStore`; a small Flask app serves a static page (fleet/static: HTML, one vanilla JS
file, CSS; no build step) that polls ``/api/state`` every two seconds, and turns the operator's "false alarm" /
"real defect" clicks into ``cmd/feedback`` (label good / defect) to the box that saw the frame. The box's
answer and its feedback events show on the anomaly's card.

There is no authentication: it binds 127.0.0.1 unless told otherwise, and anyone who can reach it can label
frames (which, with feedback.extend_bank, changes what the box calls an anomaly).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import signal
import sys
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from flask import Flask, Response, abort, jsonify, request, send_from_directory

from fleet import mqtt as fleet_mqtt
from fleet.review import LABELS, Ask, ReviewStore, route, subscriptions

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_PORT = 8080
PUBLISH_TIMEOUT_S = 5.0
# The page loads only its own files; nothing inline, nothing from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

DESCRIPTION = """A review page: the latest anomalies of every box with their heat maps, score against
threshold, buttons "false alarm" / "real defect" that send cmd/feedback to the box, per-box anomaly rate
over time, and which boxes are online.

SECURITY: the page has NO AUTHENTICATION. Anyone who can open it can label frames, and a "false alarm" can
teach a box to accept what it flagged. It listens on 127.0.0.1 by default; to open it to others, put it
behind the site's login (a reverse proxy with authentication and TLS) and never bind a public address.
While it listens on loopback it answers only requests addressed to localhost / 127.0.0.1 / [::1] (a web
site that re-points its own name at 127.0.0.1, "DNS rebinding", gets 403); a reverse proxy that passes its
own host name on needs --allow-host NAME."""

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class Sender(Protocol):
    """Where the server's commands go (the broker; a list in unit tests)."""

    def send(self, ask: Ask, wait: bool) -> None: ...


def heatmap_url(device: str, frame_id: str) -> str:
    return f"/heatmap/{quote(device, safe='')}/{quote(frame_id, safe='')}.jpg"


# --- the web app ------------------------------------------------------------------------------------


def allowed_hosts(listen: str, extra: Collection[str] = ()) -> set[str] | None:
    """The host names a request may be addressed to (its Host header, without the port): while listening on
    loopback, the loopback names plus ``extra``; elsewhere ``extra`` if given, else None (any)."""
    try:
        loopback = listen == "localhost" or ipaddress.ip_address(listen).is_loopback
    except ValueError:  # a host name
        loopback = False
    names = {h.strip("[]").lower() for h in extra}
    if loopback:
        return {*LOOPBACK_NAMES, listen.lower(), *names}
    return names or None


def create_app(store: ReviewStore, sender: Sender, static: Path = STATIC, hosts: set[str] | None = None) -> Flask:
    """The Flask app: the page, its JSON, the heat maps from memory, and the feedback endpoint. With
    ``hosts`` (see :func:`allowed_hosts`), a request addressed to another host name is refused."""
    app = Flask(__name__, static_folder=str(static), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024  # a feedback body is a few hundred bytes

    if hosts is not None:
        @app.before_request
        def _host_check() -> tuple[Response, int] | None:
            try:
                name = urlsplit(f"//{request.host}").hostname
            except ValueError:  # not even a host name ("[x")
                name = None
            if name not in hosts:
                return _error(f"this page answers to {', '.join(sorted(hosts))}, not {request.host!r}: open it by "
                              "one of those names, or start yugami-fleet serve with --allow-host NAME", 403)
            return None

    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.get("/")
    def index() -> Response:
        response = send_from_directory(static, "index.html")
        response.headers["Cache-Control"] = "no-cache"
        return response

    @app.get("/api/state")
    def state() -> Response:
        response = jsonify(store.state(heatmap_url))
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/heatmap/<device>/<path:frame_id>.jpg")  # a frame id may hold "/" (quoted)
    def heatmap(device: str, frame_id: str) -> Response:
        jpeg = store.heatmap(device, frame_id)
        if jpeg is None:
            abort(404)
        response = Response(jpeg, mimetype="image/jpeg")
        response.headers["Cache-Control"] = "private, max-age=3600"  # a frame's heat map never changes
        return response

    @app.post("/api/feedback")
    def feedback() -> tuple[Response, int]:
        return _feedback(store, sender)

    return app


def _error(message: str, status: int) -> tuple[Response, int]:
    return jsonify({"ok": False, "error": message}), status


def _same_origin() -> bool:
    """A browser names the page that sent a POST; refuse one from another site (a form or script elsewhere
    must not label frames through an operator's browser). Behind a reverse proxy that rewrites Host, the
    proxy's X-Forwarded-Host names the page (a browser cannot add that header to a cross-site request
    without a preflight this server never grants)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    hosts = {request.host, *(h.strip() for h in request.headers.get("X-Forwarded-Host", "").split(",") if h.strip())}
    return urlsplit(origin).netloc in hosts


def _feedback(store: ReviewStore, sender: Sender) -> tuple[Response, int]:
    if not _same_origin():
        return _error("cross-site request refused", 403)
    body = request.get_json(silent=True) if request.is_json else None
    if not isinstance(body, dict):
        return _error('send a JSON object: {"device", "frame_id", "label": "good"|"defect", "note"}', 400)
    device, frame_id, label = body.get("device"), body.get("frame_id"), body.get("label")
    note = body.get("note") or ""
    if not all(isinstance(x, str) and x for x in (device, frame_id, label)) or not isinstance(note, str):
        return _error("'device', 'frame_id' and 'label' must be non-empty strings, 'note' a string", 400)
    try:
        ask = store.feedback(device, frame_id, label, note)
    except ValueError as exc:
        return _error(str(exc), 400)
    except KeyError as exc:
        return _error(str(exc.args[0]), 404)
    try:
        sender.send(ask, wait=True)
    except fleet_mqtt.BrokerError as exc:
        store.send_failed(ask, f"not sent: {exc}")
        return _error(str(exc), 503)
    logger.info("feedback %s (%s) for %s/%s sent as %s", label, LABELS[label], device, frame_id, ask.body["id"])
    return jsonify({"ok": True, "request_id": ask.body["id"]}), 202


# --- the broker side --------------------------------------------------------------------------------


class BrokerLink:
    """The background MQTT client: every message goes through :func:`fleet.review.route` into the store;
    the commands it asks for (and the operator's feedback) go out to the boxes."""

    def __init__(self, client: Any, prefix: str, store: ReviewStore) -> None:
        self.client = client
        self.prefix = prefix
        self.store = store
        self.filters = subscriptions(prefix)
        client.on_message = self._on_message
        self._first_connect = client.on_connect
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.reconnect_delay_set(1, 30)
        self._subscribe()

    def _subscribe(self) -> None:
        fleet_mqtt.subscribe(self.client, self.filters)
        self.store.connected = True  # only once subscribed: "connected" means messages arrive
        self.store.connects += 1

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._first_connect(client, userdata, flags, reason_code, properties)
        if reason_code.is_failure:
            logger.error("the broker refused the reconnection: %s", reason_code)
            return
        # A clean session forgets subscriptions: take them again after every reconnect, waiting for the
        # SUBACK in a thread of its own (this is the network thread, which has to read it).
        threading.Thread(target=self._resubscribe, name="review-resubscribe", daemon=True).start()

    def _resubscribe(self) -> None:
        try:
            self._subscribe()
        except fleet_mqtt.BrokerError as exc:
            logger.error("after reconnecting: %s", exc)
            return
        logger.warning("connected to the broker again")

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if self.store.connected:
            logger.warning("lost the broker (%s); reconnecting", reason_code)
        self.store.connected = False

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            return
        try:
            asks = route(self.store, self.prefix, topic, bytes(msg.payload))
        except Exception:  # paho's network thread must outlive one odd message; say which one
            logger.exception("could not take the message on %s", topic)
            return
        for ask in asks:
            try:
                self.send(ask, wait=False)  # never wait for an acknowledgement on the network thread
            except fleet_mqtt.BrokerError as exc:
                self.store.send_failed(ask, f"not sent: {exc}")

    def send(self, ask: Ask, wait: bool) -> None:
        topic = fleet_mqtt.command_topic(self.prefix, ask.device, ask.name)
        if wait:
            fleet_mqtt.publish_json(self.client, topic, ask.body, timeout=PUBLISH_TIMEOUT_S)
            return
        info = self.client.publish(topic, json.dumps(ask.body, separators=(",", ":")).encode("utf-8"), qos=1)
        if info.rc != 0:
            raise fleet_mqtt.BrokerError(f"cannot publish to {topic}: the broker is not connected")


# --- the subcommand ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    fleet_mqtt.add_broker_arguments(parser)
    g = parser.add_argument_group("page")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; NO AUTHENTICATION: expose it only behind the "
                        "site's login / reverse proxy)")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    g.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a host name the page may be opened as, e.g. a reverse proxy's that passes its Host on "
                        "(repeat for more; on loopback localhost, 127.0.0.1 and [::1] always are)")
    g.add_argument("--keep", type=int, default=200, metavar="N",
                   help="anomalies kept in memory with their heat maps, newest first (default 200)")
    g.add_argument("--rate-bin", type=int, default=60, metavar="S",
                   help="width of one bar of the anomaly-rate chart, in seconds (default 60)")
    g.add_argument("--rate-bins", type=int, default=60, metavar="N",
                   help="bars in the anomaly-rate chart (default 60: the last hour)")


def run(args: argparse.Namespace) -> int:
    from werkzeug.serving import make_server

    if not 0 < args.port < 65536 or args.keep < 1 or args.rate_bin < 1 or args.rate_bins < 1:
        print("yugami-fleet serve: --port must be 1..65535 and --keep, --rate-bin, --rate-bins at least 1",
              file=sys.stderr)
        return 2
    store = ReviewStore(max_anomalies=args.keep, bin_s=args.rate_bin, bins=args.rate_bins)
    try:
        client = fleet_mqtt.connect(args, "serve")
        link = BrokerLink(client, args.prefix, store)
    except fleet_mqtt.BrokerError as exc:
        print(f"yugami-fleet serve: {exc}", file=sys.stderr)
        return 1
    try:
        app = create_app(store, link, hosts=allowed_hosts(args.host, args.allow_host))
        server = make_server(args.host, args.port, app, threaded=True)
    except OSError as exc:
        fleet_mqtt.close(client)
        print(f"yugami-fleet serve: cannot listen on {args.host}:{args.port} ({exc}); choose another --port",
              file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda signum, frame: threading.Thread(target=server.shutdown).start())
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"review page on http://{host}:{server.server_port}/ for boxes on {fleet_mqtt.describe(args)} "
          f"(prefix {args.prefix}); no authentication, keep it behind the site's login", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        fleet_mqtt.close(client)
    return 0
