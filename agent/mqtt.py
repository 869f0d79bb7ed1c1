"""MQTT: topic names, payload builders (pure functions) and the paho-mqtt 2.x client.

Topics, with ``<base>`` = ``<prefix>/<device>`` (prefix ``yugami`` by default):

- ``<base>/available``      ``online`` / ``offline``, retained; ``offline`` is the last will
- ``<base>/verdict``        one JSON per inspected frame, QoS 1 (through the durable outbox)
- ``<base>/state``          the last verdict, retained
- ``<base>/stats``          periodic health JSON, retained
- ``<base>/event``          notable events (bad frame, source down/up, outbox drop, reload)
- ``<base>/gradcam``        JPEG bytes of a Grad-CAM overlay (the latest, for Home Assistant's image entity)
- ``<base>/gradcam/<id>``   the same JPEG under the verdict id it belongs to
- ``<base>/cmd/<name>``     commands in (JSON object bodies); answers on ``<base>/cmd/<name>/result``
- ``<prefix>/group/<group>/cmd/<install|rollback>``  the same for every box in ``fleet.groups``; each answers on
  its own ``<base>/cmd/<name>/result``
- ``<discovery>/device/<node>/config``  Home Assistant device discovery, retained
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from agent import __version__
from agent.commands import Command, CommandError, ReplyLimiter, parse_command_body
from agent.config import AgentConfig, ConfigError, open_file_problems

logger = logging.getLogger(__name__)

PAYLOAD_VERSION = 1


def utc_iso(t: float | None = None) -> str:
    """ISO 8601 UTC with milliseconds and a 'Z', e.g. 2025-01-31T12:00:00.123Z."""
    moment = dt.datetime.fromtimestamp(time.time() if t is None else t, tz=dt.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_utc_iso(text: Any) -> float | None:
    """The inverse of :func:`utc_iso`: POSIX seconds from an ISO 8601 time with a 'Z', an offset, or none
    (taken as UTC, as the agent writes); None when ``text`` is not such a time."""
    if not isinstance(text, str):
        return None
    try:
        moment = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True)
class Topics:
    prefix: str
    device: str
    discovery_prefix: str = "homeassistant"

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device}"

    @property
    def available(self) -> str:
        return f"{self.base}/available"

    @property
    def verdict(self) -> str:
        return f"{self.base}/verdict"

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def stats(self) -> str:
        return f"{self.base}/stats"

    @property
    def event(self) -> str:
        return f"{self.base}/event"

    @property
    def gradcam(self) -> str:
        return f"{self.base}/gradcam"

    def gradcam_for(self, frame_id: str) -> str:
        """``<base>/gradcam/<frame id>``: the heat map of one verdict (``+``, ``#`` and ``/``, which cannot
        stand in a topic level, become ``_``)."""
        return f"{self.base}/gradcam/{topic_level(frame_id)}"

    @property
    def cmd_filter(self) -> str:
        return f"{self.base}/cmd/+"

    def cmd(self, name: str) -> str:
        return f"{self.base}/cmd/{name}"

    def cmd_result(self, name: str) -> str:
        return f"{self.base}/cmd/{name}/result"

    def group_cmd(self, group: str, name: str) -> str:
        return f"{self.prefix}/group/{group}/cmd/{name}"

    @property
    def ha_status(self) -> str:
        return f"{self.discovery_prefix}/status"

    @property
    def node_id(self) -> str:
        # Home Assistant ids allow letters, digits, '_' and '-' only.
        return "yugami_" + "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in self.device)

    @property
    def ha_config(self) -> str:
        return f"{self.discovery_prefix}/device/{self.node_id}/config"

    @classmethod
    def from_config(cls, cfg: AgentConfig) -> Topics:
        return cls(cfg.mqtt.topic_prefix, cfg.device_id, cfg.mqtt.homeassistant.discovery_prefix)


def topic_level(text: str) -> str:
    """``text`` as one topic level: the wildcards, the separator and NUL replaced by ``_``."""
    return "".join("_" if ch in "+#/\0" else ch for ch in text) or "_"


def _json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")


# --- payloads (pure) --------------------------------------------------------------------------------


def availability_message(topics: Topics, online: bool) -> Message:
    return Message(topics.available, b"online" if online else b"offline", qos=1, retain=True)


def verdict_payload(
    *,
    frame_id: str,
    ts: str,
    device: str,
    source: str,
    score: float,
    threshold: float,
    verdict: str,
    confidence: float,
    model_name: str,
    model_sha256: str,
    latency_ms: float,
    evidence: bool = False,
) -> dict[str, Any]:
    """The verdict JSON, exactly the documented fields in the documented order. ``evidence``: whether the
    frame was saved (``<storage>/evidence/<day>/<HHMMSS>_<id>``) before the verdict was stored."""
    return {
        "v": PAYLOAD_VERSION,
        "id": frame_id,
        "ts": ts,
        "device": device,
        "source": source,
        "score": round(float(score), 6),
        "threshold": round(float(threshold), 6),
        "verdict": verdict,
        "confidence": round(float(confidence), 4),
        "model": {"name": model_name, "sha256": model_sha256},
        "latency_ms": round(float(latency_ms), 3),
        "evidence": bool(evidence),
    }


def verdict_message(topics: Topics, payload: dict[str, Any], qos: int = 1) -> Message:
    return Message(topics.verdict, _json(payload), qos=qos, retain=False)


def state_message(topics: Topics, payload: dict[str, Any]) -> Message:
    return Message(topics.state, _json(payload), qos=1, retain=True)


def stats_message(topics: Topics, stats: dict[str, Any]) -> Message:
    return Message(topics.stats, _json({"v": PAYLOAD_VERSION, "device": topics.device, **stats}), qos=0, retain=True)


def event_message(topics: Topics, event: str, ts: str, **detail: Any) -> Message:
    body = {"v": PAYLOAD_VERSION, "ts": ts, "device": topics.device, "event": event, **detail}
    return Message(topics.event, _json(body), qos=1, retain=False)


def command_result_message(
    topics: Topics, name: str, *, ok: bool, request_id: Any = None, error: str | None = None, **data: Any
) -> Message:
    body: dict[str, Any] = {"v": PAYLOAD_VERSION, "cmd": name, "request_id": request_id, "ok": ok}
    if error is not None:
        body["error"] = error
    body.update(data)
    return Message(topics.cmd_result(name), _json(body), qos=1, retain=False)


def gradcam_message(topics: Topics, jpeg: bytes, frame_id: str | None = None) -> Message:
    """The heat map on ``<base>/gradcam``, or with ``frame_id`` on ``<base>/gradcam/<frame_id>``."""
    return Message(topics.gradcam if frame_id is None else topics.gradcam_for(frame_id), jpeg, qos=0, retain=False)


def discovery_message(topics: Topics, model_name: str) -> Message:
    """Home Assistant device discovery: one retained config describing all of the device's entities."""
    node = topics.node_id

    def entity(platform: str, key: str, name: str, **extra: Any) -> dict[str, Any]:
        return {"platform": platform, "name": name, "unique_id": f"{node}_{key}", **extra}

    components = {
        "anomaly": entity(
            "binary_sensor", "anomaly", "Anomaly", device_class="problem", state_topic=topics.state,
            value_template="{{ 'ON' if value_json.verdict == 'anomaly' else 'OFF' }}",
        ),
        "score": entity("sensor", "score", "Anomaly score", state_topic=topics.state,
                        value_template="{{ value_json.score }}", state_class="measurement"),
        "confidence": entity("sensor", "confidence", "Confidence", state_topic=topics.state,
                             value_template="{{ value_json.confidence }}", state_class="measurement"),
        "fps": entity("sensor", "fps", "Frames per second", state_topic=topics.stats,
                      value_template="{{ value_json.fps }}", state_class="measurement", unit_of_measurement="fps"),
        "frames": entity("sensor", "frames", "Frames inspected", state_topic=topics.stats,
                         value_template="{{ value_json.frames }}", state_class="total_increasing"),
        "anomalies": entity("sensor", "anomalies", "Anomalies", state_topic=topics.stats,
                            value_template="{{ value_json.anomalies }}", state_class="total_increasing"),
        "errors": entity("sensor", "errors", "Bad frames", state_topic=topics.stats,
                         value_template="{{ value_json.errors }}", state_class="total_increasing",
                         entity_category="diagnostic"),
        "outbox": entity("sensor", "outbox", "Undelivered verdicts", state_topic=topics.stats,
                         value_template="{{ value_json.outbox.depth }}", entity_category="diagnostic"),
        "trigger": entity("button", "trigger", "Trigger", command_topic=topics.cmd("trigger"), payload_press="{}"),
        "reload": entity("button", "reload", "Reload model", command_topic=topics.cmd("reload"),
                         payload_press="{}", entity_category="config"),
        "gradcam": entity("image", "gradcam", "Grad-CAM", image_topic=topics.gradcam, content_type="image/jpeg"),
    }
    config = {
        "device": {
            "identifiers": [node],
            "name": f"yugami {topics.device}",
            "manufacturer": "yugami",
            "model": model_name,
            "sw_version": __version__,
        },
        "origin": {"name": "yugami", "sw_version": __version__},
        "availability_topic": topics.available,
        "payload_available": "online",
        "payload_not_available": "offline",
        "qos": 1,
        "components": components,
    }
    return Message(topics.ha_config, _json(config), qos=1, retain=True)


# --- commands in ------------------------------------------------------------------------------------


def command_name(topics: Topics, topic: str) -> str | None:
    prefix = topics.base + "/cmd/"
    if not topic.startswith(prefix):
        return None
    name = topic[len(prefix):]
    return name if name and "/" not in name else None


GROUP_COMMANDS = ("install", "rollback")  # what a group topic may carry


def group_command_name(topics: Topics, groups: list[str], topic: str) -> str | None:
    """The command on ``<prefix>/group/<group>/cmd/<name>`` for one of this box's groups, or None."""
    head = f"{topics.prefix}/group/"
    if not topic.startswith(head):
        return None
    group, sep, name = topic[len(head):].partition("/cmd/")
    return name if sep and group in groups and name in GROUP_COMMANDS else None


def parse_command(topics: Topics, topic: str, payload: bytes, max_bytes: int) -> Command:
    """A command from a message on ``<base>/cmd/<name>`` (checked against agent.commands.TABLE); raise
    CommandError saying what is wrong."""
    return parse_command_body(command_name(topics, topic) or "?", payload, max_bytes)


# --- the client -------------------------------------------------------------------------------------


@dataclass
class LinkCallbacks:
    """What the service wants to hear from the network thread. Keep handlers short and non-blocking."""

    on_command: Callable[[Command], None]
    on_published: Callable[[int], None] = lambda mid: None
    on_ready: Callable[[], None] = lambda: None  # subscribed after a (re)connect: resend is done
    on_down: Callable[[], None] = lambda: None
    on_connected: Callable[[], list[Message]] = lambda: []  # extra messages to publish on each connect
    discovery: Callable[[], Message | None] = lambda: None


class MqttLink:
    """paho-mqtt 2.x client with the will, subscriptions, discovery and reconnects done right."""

    def __init__(self, cfg: AgentConfig, topics: Topics, callbacks: LinkCallbacks) -> None:
        self.cfg = cfg
        self.topics = topics
        self.cb = callbacks
        self.connected = threading.Event()
        self.connects = 0
        self._down_logged = False
        self._stopping = False
        self.refusals = ReplyLimiter()
        m = cfg.mqtt
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=cfg.client_id, clean_session=True,
                             protocol=paho.MQTTv311)
        client.enable_logger(logging.getLogger("paho"))
        client.max_inflight_messages_set(m.max_inflight)
        client.reconnect_delay_set(int(max(1, m.reconnect_min_s)), int(max(1, m.reconnect_max_s)))
        will = availability_message(topics, online=False)
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        if m.username:
            client.username_pw_set(m.username, self._password())
        if m.tls.enabled:
            self._set_tls(client)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self.client = client

    def _password(self) -> str | None:
        try:
            return self.cfg.password()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"mqtt.password_file: cannot read {self.cfg.mqtt.password_file} ({exc}); fix the "
                               "file or its permissions (the service's user must read it)"],
                              self.cfg.config_path or "config") from exc

    def _set_tls(self, client: paho.Client) -> None:
        """TLS as the config says; a file that cannot be loaded is a ConfigError naming its key."""
        t = self.cfg.mqtt.tls
        try:
            client.tls_set(ca_certs=t.ca_file, certfile=t.cert_file, keyfile=t.key_file,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (OSError, ssl.SSLError, ValueError) as exc:
            problems = open_file_problems(self.cfg) or [
                f"mqtt.tls: the TLS files (ca_file {t.ca_file}, cert_file {t.cert_file}, key_file {t.key_file}) "
                f"cannot be loaded ({exc}); fix the paths, make them readable by the service, use PEM files"]
            raise ConfigError(problems, self.cfg.config_path or "config") from exc
        client.tls_insecure_set(t.insecure)

    @property
    def reconnects(self) -> int:
        return max(0, self.connects - 1)

    def start(self) -> None:
        m = self.cfg.mqtt
        logger.info("connecting to MQTT broker %s:%d as %s", m.host, m.port, self.cfg.client_id)
        self.client.connect_async(m.host, m.port, keepalive=m.keepalive_s)
        self.client.loop_start()  # its thread retries the first connection too

    def publish(self, msg: Message) -> int | None:
        """Publish now if connected; messages that only make sense live (state, stats) are dropped otherwise."""
        if not self.connected.is_set():
            return None
        info = self.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
        return info.mid if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS else None

    def hand_over(self, msg: Message) -> int | None:
        """Give a QoS>0 message to paho even while disconnected: paho keeps it and resends it in order."""
        info = self.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
        if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            return info.mid
        logger.warning("paho refused a message for %s: %s", msg.topic, paho.error_string(info.rc))
        return None

    def stop(self, timeout: float = 3.0) -> None:
        """Say ``offline`` ourselves (a clean disconnect sends no will), then disconnect."""
        self._stopping = True
        if self.connected.is_set():
            msg = availability_message(self.topics, online=False)
            info = self.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                logger.warning("could not publish 'offline' before disconnecting: %s", exc)
        # paho 2.x's network thread may take one more turn after the disconnect and log "Client is not
        # connected" at ERROR: noise on every clean stop, so its logger goes quiet from here on.
        self.client.disable_logger()
        self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()

    # --- paho callbacks (network thread) ---

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            logger.error(
                "broker %s:%d refused the connection: %s; check mqtt.username / mqtt.password_file / mqtt.tls",
                self.cfg.mqtt.host, self.cfg.mqtt.port, reason_code,
            )
            return
        self.connects += 1
        self._down_logged = False
        self.connected.set()
        logger.info("connected to MQTT broker %s:%d", self.cfg.mqtt.host, self.cfg.mqtt.port)
        self._announce()
        for msg in self.cb.on_connected():
            self._send(msg)
        subs = [(self.topics.cmd_filter, 1)]
        subs += [(self.topics.group_cmd(g, name), 1) for g in self.cfg.fleet.groups for name in GROUP_COMMANDS]
        if self.cfg.mqtt.homeassistant.enabled:
            subs.append((self.topics.ha_status, 1))
        client.subscribe(subs)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        if not self._down_logged:
            logger.warning("cannot reach MQTT broker %s:%d; retrying in the background (verdicts are kept)",
                           self.cfg.mqtt.host, self.cfg.mqtt.port)
            self._down_logged = True

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        self.cb.on_down()
        if was and not self._stopping:
            logger.warning("lost the MQTT broker (%s); reconnecting, verdicts are kept in the outbox", reason_code)
            self._down_logged = True

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        for rc in reason_codes:
            if rc.is_failure:
                logger.error("the broker refused a subscription (%s); commands may not arrive (check its ACL)", rc)
        # 'online' only now, so whoever sees it can send commands that will be heard.
        self._send(availability_message(self.topics, online=True))
        # CONNACK's resend of unacknowledged messages ran before this SUBACK was read: safe to send new ones.
        self.cb.on_ready()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self.cb.on_published(mid)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            return
        if topic == self.topics.ha_status:
            if message.payload.strip() == b"online":
                logger.info("Home Assistant is back online: announcing the device again")
                self._announce()
            return
        name = command_name(self.topics, topic) or group_command_name(self.topics, self.cfg.fleet.groups, topic)
        if name is None:
            return
        try:
            command = parse_command_body(name, message.payload, self.cfg.mqtt.max_command_bytes)
        except CommandError as exc:
            if self.refusals.allow():  # a flood of bad commands must not become a flood of answers
                logger.warning("refused command on %s: %s", topic, exc)
                self._send(command_result_message(self.topics, exc.name, ok=False, request_id=exc.request_id,
                                                  error=str(exc)))
            return
        self.cb.on_command(command)

    def _announce(self) -> None:
        if not self.cfg.mqtt.homeassistant.enabled:
            return
        msg = self.cb.discovery()
        if msg is not None:
            self._send(msg)

    def _send(self, msg: Message) -> None:
        self.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
