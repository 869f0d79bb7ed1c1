"""The broker side every ``yugami-fleet`` subcommand shares: options, connecting, subscribing, and commands
sent to many boxes with their answers collected by request id.

A box answers a command on ``<prefix>/<device>/cmd/<name>`` with a message on
``<prefix>/<device>/cmd/<name>/result`` carrying the ``request_id`` it was sent as ``id`` (agent.mqtt).
:class:`Results` subscribes to those answers for every box at once before anything is sent, so an answer can
never arrive before its subscriber.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

logger = logging.getLogger(__name__)

DEFAULT_PORT = 1883
CONNECT_TIMEOUT_S = 10.0


class BrokerError(RuntimeError):
    """The broker cannot be reached, refused us, or did not acknowledge in time; the message says which
    broker and what to check."""


def parse_broker(text: str) -> tuple[str, int]:
    """``HOST[:PORT]`` (``[v6addr]:PORT`` too) -> (host, port); ValueError naming the problem."""
    text = text.strip()
    if not text:
        raise ValueError("--broker is empty; give HOST or HOST:PORT, e.g. central.local:1883")
    if text.startswith("["):  # [::1]:1883
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:  # a plain name, or a bare IPv6 address without a port
        host, port_text = text, ""
    if not host:
        raise ValueError(f"--broker {text!r} has no host; give HOST or HOST:PORT")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"--broker {text!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def _broker_type(text: str) -> tuple[str, int]:
    try:
        return parse_broker(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every subcommand takes to reach the boxes' broker."""
    g = parser.add_argument_group("broker")
    g.add_argument("--broker", type=_broker_type, default=(os.environ.get("YUGAMI_BROKER") or "localhost:1883"),
                   metavar="HOST[:PORT]",
                   help="the MQTT broker the boxes report to (default: $YUGAMI_BROKER or localhost:1883)")
    g.add_argument("--prefix", default="yugami", help="the boxes' mqtt.topic_prefix (default: yugami)")
    g.add_argument("--username", help="MQTT user name")
    g.add_argument("--password-file", type=Path, metavar="FILE", help="a file holding the MQTT password")
    g.add_argument("--tls-ca", type=Path, metavar="FILE", help="CA certificate (PEM): connect with TLS")
    g.add_argument("--client-id", help="MQTT client id (default: yugami-fleet-<command>-<random>)")


def broker_of(args: argparse.Namespace) -> tuple[str, int]:
    """args.broker as (host, port), whether argparse converted it or a caller put a string there."""
    broker = args.broker
    return parse_broker(broker) if isinstance(broker, str) else (broker[0], int(broker[1]))


def describe(args: argparse.Namespace) -> str:
    host, port = broker_of(args)
    return f"{host}:{port}"


@dataclass
class _Session:
    """What the callbacks share with the caller's thread; kept as the client's user data."""

    broker: str
    connack: threading.Event = field(default_factory=threading.Event)
    reason: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    subacks: dict[int, threading.Event] = field(default_factory=dict)
    refused: dict[int, list[str]] = field(default_factory=dict)


def _on_connect(client: paho.Client, s: _Session, flags: Any, reason_code: Any, properties: Any) -> None:
    s.reason = reason_code
    s.connack.set()


def _on_subscribe(client: paho.Client, s: _Session, mid: int, reason_codes: Any, properties: Any) -> None:
    with s.lock:
        bad = [str(rc) for rc in reason_codes if rc.is_failure]
        if bad:
            s.refused[mid] = bad
        event = s.subacks.setdefault(mid, threading.Event())
    event.set()


def _read_password(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise BrokerError(f"--password-file {path}: cannot read it ({exc}); give a readable UTF-8 file") from exc


def client_id_for(hint: str) -> str:
    return f"yugami-fleet-{hint}-{uuid.uuid4().hex[:8]}"


def connect(args: argparse.Namespace, client_id_hint: str = "cli", timeout: float = CONNECT_TIMEOUT_S) -> paho.Client:
    """A connected paho-mqtt 2.x client (clean session, network loop running), or BrokerError naming the
    broker and what to check. Close it with :func:`close`."""
    host, port = broker_of(args)
    session = _Session(f"{host}:{port}")
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=args.client_id or client_id_for(client_id_hint),
                         clean_session=True, protocol=paho.MQTTv311, userdata=session)
    client.enable_logger(logging.getLogger("paho"))
    client.max_inflight_messages_set(100)  # chunks of a bundle to 50 boxes: keep the pipe full
    client.max_queued_messages_set(0)
    client.on_connect = _on_connect
    client.on_subscribe = _on_subscribe
    if args.username:
        password = _read_password(args.password_file) if args.password_file else None
        client.username_pw_set(args.username, password)
    if args.tls_ca:
        try:
            client.tls_set(ca_certs=str(args.tls_ca))
        except (OSError, ValueError) as exc:
            raise BrokerError(f"--tls-ca {args.tls_ca}: cannot load it ({exc}); give a readable PEM file") from exc
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:  # refused, unknown host, TLS handshake failure
        raise BrokerError(f"cannot reach the MQTT broker {session.broker} ({exc}); check --broker and that the "
                          "broker runs and listens there") from exc
    client.loop_start()
    if not session.connack.wait(timeout):
        close(client)
        raise BrokerError(f"the MQTT broker {session.broker} did not answer the connection within {timeout:g} s; "
                          "check --broker (is it an MQTT port?) and --tls-ca")
    if session.reason is not None and session.reason.is_failure:
        close(client)
        raise BrokerError(f"the MQTT broker {session.broker} refused the connection: {session.reason}; check "
                          "--username / --password-file and the broker's ACL")
    logger.info("connected to %s", session.broker)
    return client


def close(client: paho.Client) -> None:
    client.disable_logger()  # paho logs "Client is not connected" at ERROR when its thread outlives the disconnect
    client.disconnect()
    client.loop_stop()


def session_of(client: paho.Client) -> _Session:
    return client.user_data_get()  # type: ignore[no-any-return]


def subscribe(client: paho.Client, filters: Iterable[str], qos: int = 1, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Subscribe and wait for the broker's SUBACK, so nothing sent afterwards is missed; BrokerError if the
    broker refuses a filter (its ACL) or does not answer."""
    filters = list(filters)
    session = session_of(client)
    rc, mid = client.subscribe([(f, qos) for f in filters])
    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
        raise BrokerError(f"cannot subscribe on {session.broker}: {paho.error_string(rc)}")
    with session.lock:
        event = session.subacks.setdefault(mid, threading.Event())
    if not event.wait(timeout):
        raise BrokerError(f"the MQTT broker {session.broker} did not acknowledge the subscription to {filters} "
                          f"within {timeout:g} s")
    with session.lock:
        session.subacks.pop(mid, None)
        refused = session.refused.pop(mid, None)
    if refused:
        raise BrokerError(f"the MQTT broker {session.broker} refused the subscription to {filters} ({refused}); "
                          "check the broker's ACL for this user")


def publish_json(client: paho.Client, topic: str, body: dict[str, Any], qos: int = 1,
                 timeout: float = 30.0) -> None:
    """Publish one JSON object and wait until the broker has it (PUBACK for QoS 1)."""
    info = client.publish(topic, json.dumps(body, separators=(",", ":")).encode("utf-8"), qos=qos)
    if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
        raise BrokerError(f"cannot publish to {topic} on {session_of(client).broker}: {paho.error_string(info.rc)}")
    try:
        info.wait_for_publish(timeout)
    except (RuntimeError, ValueError) as exc:
        raise BrokerError(f"publishing to {topic} failed: {exc}") from exc
    if not info.is_published():
        raise BrokerError(f"the MQTT broker {session_of(client).broker} did not acknowledge a message on {topic} "
                          f"within {timeout:g} s")


def device_of(prefix: str, topic: str) -> tuple[str, str] | None:
    """``<prefix>/<device>/<rest>`` -> (device, rest); None for another prefix or a group topic."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    device, _, rest = topic[len(head):].partition("/")
    if not device or not rest or device == "group":
        return None
    return device, rest


def new_request_id() -> str:
    return uuid.uuid4().hex[:12]


def command_topic(prefix: str, device: str, name: str) -> str:
    return f"{prefix}/{device}/cmd/{name}"


def group_command_topic(prefix: str, group: str, name: str) -> str:
    return f"{prefix}/group/{group}/cmd/{name}"


class Results:
    """Answers to the command ``name`` from many boxes, matched by request id.

    Subscribes ``<prefix>/+/cmd/<name>/result`` on creation (and waits for the SUBACK). :meth:`send` publishes
    a command to one box and expects its answer; :meth:`expect` registers an answer expected from a command
    sent some other way (a group topic). :meth:`wait` returns once every expected box has a final answer.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, client: paho.Client, prefix: str, name: str) -> None:
        self.client = client
        self.prefix = prefix
        self.name = name
        self.filter = f"{prefix}/+/cmd/{name}/result"
        self._cond = threading.Condition()
        self._expected: dict[str, str] = {}  # device -> request id
        self._answers: dict[str, list[dict[str, Any]]] = {}  # device -> answers carrying its request id
        self._group_ids: set[str] = set()
        client.message_callback_add(self.filter, self._on_message)
        subscribe(client, [self.filter])

    def __enter__(self) -> Results:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.message_callback_remove(self.filter)
        self.client.unsubscribe(self.filter)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        where = device_of(self.prefix, msg.topic)
        try:
            body = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError):
            return
        if where is None or not isinstance(body, dict):
            return
        device = where[0]
        request_id = body.get("request_id")
        with self._cond:
            wanted = self._expected.get(device)
            if request_id is None or (request_id != wanted and request_id not in self._group_ids):
                return  # someone else's command, or an answer to an older one
            self._expected.setdefault(device, request_id)
            self._answers.setdefault(device, []).append(body)
            self._cond.notify_all()

    def expect(self, device: str, request_id: str) -> None:
        with self._cond:
            self._expected[device] = request_id

    def expect_any(self, request_id: str) -> None:
        """Accept an answer with this request id from any box (a command sent to a group topic)."""
        with self._cond:
            self._group_ids.add(request_id)

    def send(self, device: str, body: dict[str, Any] | None = None, request_id: str | None = None,
             qos: int = 1) -> str:
        """Publish ``body`` (plus ``id``) to ``<prefix>/<device>/cmd/<name>``; returns the request id."""
        request_id = request_id or new_request_id()
        self.expect(device, request_id)
        publish_json(self.client, command_topic(self.prefix, device, self.name), {**(body or {}), "id": request_id},
                     qos=qos)
        return request_id

    def answers(self, device: str) -> list[dict[str, Any]]:
        with self._cond:
            return list(self._answers.get(device, []))

    def devices(self) -> list[str]:
        """Every box that answered so far (for group commands, where the members are not known up front)."""
        with self._cond:
            return sorted(self._answers)

    def wait(self, timeout: float, devices: Iterable[str] | None = None,
             final: Callable[[dict[str, Any]], bool] = lambda answer: True) -> dict[str, dict[str, Any] | None]:
        """Wait up to ``timeout`` s until each box (default: every expected one) has an answer for which
        ``final`` is true. Returns box -> its final answer, else its last answer, else None (no answer)."""
        with self._cond:
            wanted = sorted(devices if devices is not None else self._expected)
        deadline = time.monotonic() + timeout

        def pending() -> list[str]:
            return [d for d in wanted if not any(final(a) for a in self._answers.get(d, []))]

        with self._cond:
            while pending():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
            out: dict[str, dict[str, Any] | None] = {}
            for d in wanted:
                got = self._answers.get(d, [])
                done = [a for a in got if final(a)]
                out[d] = done[-1] if done else (got[-1] if got else None)
            return out


def request(client: paho.Client, prefix: str, devices: Iterable[str], name: str, body: dict[str, Any] | None = None,
            timeout: float = 10.0) -> dict[str, dict[str, Any] | None]:
    """Send the same command to every box and wait for their answers (None: no answer in time)."""
    devices = list(devices)
    with Results(client, prefix, name) as results:
        for device in devices:
            results.send(device, body)
        return results.wait(timeout, devices)
