"""The agent's settings: one YAML file, validated in full at start.

Every section is a dataclass whose fields carry a one-line ``help`` (the example config and
docs/AGENT.md say the same). Loading collects *all* problems before failing, each one naming its
key path and how to fix it, so a person fixes a config in one pass. Unknown keys are errors (a typo
must not silently fall back to a default); the nearest known key is suggested.

Only ``device_id``, ``bundle``, ``capture.source`` and ``mqtt.host`` are required.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
import ssl
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

EX_CONFIG = 78  # sysexits.h: configuration error; the unit's RestartPreventExitStatus stops a restart loop

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".mjpeg", ".mjpg")
STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "rtmp://", "udp://", "tcp://")
MIN_FRAME_SIDE = 8  # a frame narrower or lower than this in pixels is a bad frame
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """One or more problems in the config file; ``problems`` lists them, each with its key path."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


def _doc(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class CaptureConfig:
    source: str | int = field(
        metadata=_doc("camera index (0), /dev/videoN, rtsp:// or http:// URL, video file, or folder")
    )
    kind: Literal["auto", "device", "stream", "video", "folder"] = field(
        default="auto", metadata=_doc("what 'source' is; 'auto' decides from its form")
    )
    mode: Literal["continuous", "trigger"] = field(
        default="continuous",
        metadata=_doc("continuous: inspect frames as they come; trigger: one frame per cmd/trigger"),
    )
    loop: bool = field(default=False, metadata=_doc("video file: start again at the end instead of stopping"))
    max_fps: float | None = field(
        default=None, metadata=_doc("cap on inspected frames per second (null: as fast as frames come)")
    )
    roi: list[int] | None = field(
        default=None, metadata=_doc("[x, y, width, height] crop in frame pixels; replaces the bundle's ROI")
    )
    width: int | None = field(default=None, metadata=_doc("camera device: requested frame width"))
    height: int | None = field(default=None, metadata=_doc("camera device: requested frame height"))
    fps: float | None = field(default=None, metadata=_doc("camera device: requested frame rate"))
    poll_interval_s: float = field(default=0.5, metadata=_doc("folder: how often to look for new files"))
    settle_s: float = field(
        default=0.5, metadata=_doc("folder: a new file is read only once it is this old (still being written)")
    )
    open_timeout_s: float = field(default=10.0, metadata=_doc("stream: give up opening after this long"))
    read_timeout_s: float = field(default=10.0, metadata=_doc("stream: a read that takes longer counts as a failure"))
    reopen_backoff_s: float = field(
        default=1.0, metadata=_doc("first wait before reopening a failed source; doubles each failure")
    )
    reopen_backoff_max_s: float = field(default=30.0, metadata=_doc("longest wait between reopen attempts"))
    trigger_flush_frames: int = field(
        default=2, metadata=_doc("device/stream in trigger mode: stale buffered frames dropped per shot")
    )
    max_pixels: int = field(
        default=40_000_000,
        metadata=_doc(
            "largest frame (width x height) decoded; a file whose header claims more is a bad_frame, never decoded"
        ),
    )


@dataclass
class TLSConfig:
    enabled: bool = field(default=False, metadata=_doc("connect with TLS (usually port 8883)"))
    ca_file: str | None = field(
        default=None, metadata=_doc("CA certificate file (PEM); null: the system's trust store")
    )
    cert_file: str | None = field(default=None, metadata=_doc("client certificate (PEM) for mutual TLS"))
    key_file: str | None = field(default=None, metadata=_doc("client private key (PEM) for mutual TLS"))
    insecure: bool = field(default=False, metadata=_doc("skip the broker host name check (testing only)"))


@dataclass
class HomeAssistantConfig:
    enabled: bool = field(default=True, metadata=_doc("publish Home Assistant MQTT discovery (retained)"))
    discovery_prefix: str = field(default="homeassistant", metadata=_doc("Home Assistant's discovery prefix"))


@dataclass
class MqttConfig:
    host: str = field(metadata=_doc("broker host name or address"))
    port: int = field(default=1883, metadata=_doc("broker port"))
    client_id: str | None = field(default=None, metadata=_doc("MQTT client id (null: yugami-<device_id>)"))
    username: str | None = field(default=None, metadata=_doc("user name for the broker"))
    password_file: str | None = field(
        default=None,
        metadata=_doc(
            "file holding the password (first line); ${CREDENTIALS_DIRECTORY} is expanded for systemd's LoadCredential"
        ),
    )
    topic_prefix: str = field(default="yugami", metadata=_doc("first topic level"))
    qos: int = field(
        default=1, metadata=_doc("QoS of verdicts (1 or 2; the outbox needs the broker's acknowledgement)")
    )
    keepalive_s: int = field(default=30, metadata=_doc("MQTT keepalive"))
    reconnect_min_s: float = field(default=1.0, metadata=_doc("first wait before reconnecting to the broker"))
    reconnect_max_s: float = field(default=30.0, metadata=_doc("longest wait between reconnect attempts"))
    max_inflight: int = field(default=20, metadata=_doc("verdicts sent but not yet acknowledged, at most"))
    stats_interval_s: float = field(default=30.0, metadata=_doc("period of the stats message"))
    max_command_bytes: int = field(
        default=4096, metadata=_doc("longer command payloads are refused with an error result")
    )
    tls: TLSConfig = field(default_factory=TLSConfig, metadata=_doc("TLS settings"))
    homeassistant: HomeAssistantConfig = field(
        default_factory=HomeAssistantConfig, metadata=_doc("Home Assistant discovery")
    )


@dataclass
class GradcamConfig:
    policy: Literal["off", "on_command", "every_anomaly"] = field(
        default="on_command",
        metadata=_doc("off: never; on_command: on cmd/gradcam; every_anomaly: also for every anomalous frame"),
    )
    keep_frames: int = field(default=8, metadata=_doc("recent frames kept so cmd/gradcam can name a frame id"))
    jpeg_quality: int = field(default=85, metadata=_doc("JPEG quality of the heat-map picture"))


@dataclass
class StorageConfig:
    dir: str | None = field(
        default=None,
        metadata=_doc("state + evidence folder (null: $STATE_DIRECTORY, else ~/.local/state/yugami-agent)"),
    )
    save_anomalies: bool = field(default=True, metadata=_doc("save each anomalous frame with its verdict JSON"))
    save_normal_every: int = field(default=0, metadata=_doc("also save every Nth ok frame as a sample (0: none)"))
    max_files: int = field(default=1000, metadata=_doc("keep at most this many saved frames (oldest go first)"))
    max_age_days: float = field(default=30.0, metadata=_doc("delete saved frames older than this"))
    max_bytes: int = field(
        default=500_000_000,
        metadata=_doc("keep saved frames (pictures + JSON) under this many bytes in all (oldest go first)"),
    )
    min_free_bytes: int = field(
        default=100_000_000,
        metadata=_doc("no evidence is written while the disk of storage.dir has less free space than this, "
                      "so the outbox keeps room"),
    )
    image_format: Literal["jpg", "png"] = field(default="jpg", metadata=_doc("format of saved frames"))


@dataclass
class OutboxConfig:
    max_messages: int = field(
        default=100000, metadata=_doc("undelivered verdicts kept on disk at most; beyond it the oldest is dropped")
    )
    memory_max: int = field(
        default=10000,
        metadata=_doc("verdicts held in memory at most while the disk refuses writes; when full, no frames are taken"),
    )
    retry_s: float = field(default=5.0, metadata=_doc("how often a disk that refused writes is tried again"))


@dataclass
class MetricsConfig:
    enabled: bool = field(default=False, metadata=_doc("serve Prometheus metrics over HTTP"))
    host: str = field(default="127.0.0.1", metadata=_doc("address to listen on (keep it local)"))
    port: int = field(default=9108, metadata=_doc("port to listen on"))


@dataclass
class ServiceConfig:
    ready_timeout_s: float = field(
        default=30.0,
        metadata=_doc(
            "tell systemd READY after this long even if source or broker are not up yet (reported as degraded)"
        ),
    )
    log_level: Literal["debug", "info", "warning", "error"] = field(default="info", metadata=_doc("log level"))
    recent_frames: int = field(
        default=32,
        metadata=_doc("inspected frames (pictures + verdicts) kept in memory, for shadow-scoring a bundle being "
                      "installed and for cmd/feedback; each costs one decoded frame of memory"),
    )


@dataclass
class BundleTrustConfig:
    public_keys: list[str] = field(
        default_factory=list,
        metadata=_doc("Ed25519 public key files (.pub from yugami-keys generate) whose signatures this box "
                      "accepts; several for key rotation"),
    )
    require_signature: bool | None = field(
        default=None,
        metadata=_doc("refuse unsigned bundles (null: true when public_keys is not empty); a signed bundle "
                      "is always checked against public_keys"),
    )

    @property
    def required(self) -> bool:
        """Whether an unsigned bundle is refused."""
        return bool(self.public_keys) if self.require_signature is None else self.require_signature


@dataclass
class FleetConfig:
    groups: list[str] = field(
        default_factory=list,
        metadata=_doc("groups this box belongs to: it also takes cmd/install and cmd/rollback on "
                      "<prefix>/group/<group>/cmd/<name>"),
    )
    install: Literal["signed", "any", "off"] = field(
        default="signed",
        metadata=_doc("cmd/install: signed (only bundles signed by a bundle_trust key), any (unsigned too), "
                      "off (refused)"),
    )
    max_bundle_bytes: int = field(
        default=64 * 1024 * 1024, metadata=_doc("largest bundle (its tar) cmd/install accepts, in bytes")
    )
    shadow_frames: int = field(
        default=16,
        metadata=_doc("recent frames a bundle being installed scores before the switch (at most "
                      "service.recent_frames; 0: no shadow scoring)"),
    )
    max_anomaly_share: float = field(
        default=0.5,
        metadata=_doc("health gate: a bundle calling more than this share of the shadow frames (or of the first "
                      "watch_frames after the switch) anomalous is refused (or rolled back)"),
    )
    watch_frames: int = field(
        default=20, metadata=_doc("frames watched after a switch; failing the gate rolls back (0: no watch)")
    )
    keep_bundles: int = field(
        default=3, metadata=_doc("installed bundle folders kept on disk (at least 2: in use and previous)")
    )


@dataclass
class FeedbackConfig:
    bank_extension: bool = field(
        default=True,
        metadata=_doc("cmd/feedback: a 'good' label on a frame called anomaly adds its features to the normal "
                      "banks on the box, so the same false alarm stops at once"),
    )
    max_extension: int = field(
        default=32,
        metadata=_doc("frames in the bank extension at most (the oldest goes first); each adds one GeM row and "
                      "the patch cells that made its alarm to every frame's search"),
    )
    max_frames: int = field(
        default=200,
        metadata=_doc("labelled frames kept under <storage>/feedback (lossless PNG + JSON) at most; the oldest "
                      "label goes first"),
    )


@dataclass
class AgentConfig:
    device_id: str = field(metadata=_doc("this camera box's name: letters, digits, '_', '-', '.'; used in topics"))
    bundle: str = field(metadata=_doc("model bundle folder written by yugami-train"))
    capture: CaptureConfig = field(metadata=_doc("where frames come from"))
    mqtt: MqttConfig = field(metadata=_doc("the broker"))
    threads: int | None = field(default=None, metadata=_doc("TFLite interpreter threads (null: the runtime's choice)"))
    bundle_trust: BundleTrustConfig = field(
        default_factory=BundleTrustConfig, metadata=_doc("which bundles this box accepts: signed by which keys")
    )
    gradcam: GradcamConfig = field(default_factory=GradcamConfig, metadata=_doc("Grad-CAM heat maps"))
    storage: StorageConfig = field(default_factory=StorageConfig, metadata=_doc("evidence and state on disk"))
    outbox: OutboxConfig = field(default_factory=OutboxConfig, metadata=_doc("durable queue of verdicts"))
    metrics: MetricsConfig = field(default_factory=MetricsConfig, metadata=_doc("Prometheus metrics"))
    service: ServiceConfig = field(default_factory=ServiceConfig, metadata=_doc("service behaviour"))
    feedback: FeedbackConfig = field(
        default_factory=FeedbackConfig, metadata=_doc("operator feedback (cmd/feedback) and the bank extension")
    )
    fleet: FleetConfig = field(default_factory=FleetConfig, metadata=_doc("bundles installed over MQTT, groups"))
    config_path: str | None = field(default=None, metadata={"internal": True})

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"yugami-{self.device_id}"

    @property
    def storage_dir(self) -> Path:
        return Path(self.storage.dir) if self.storage.dir else default_storage_dir()

    @property
    def source_kind(self) -> str:
        return source_kind(self.capture.source, self.capture.kind)

    def password(self) -> str | None:
        """The broker password read from ``mqtt.password_file`` (first line), or None."""
        if not self.mqtt.password_file:
            return None
        return read_password(self.mqtt.password_file)


def default_storage_dir() -> Path:
    # systemd's StateDirectory= sets $STATE_DIRECTORY; elsewhere follow the XDG convention.
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "yugami-agent"


_VAR_RE = re.compile(r"\$(\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)")

# Every key that names a file or folder on this machine. parse_config expands ``${VAR}`` and ``~`` in
# these once, and the expanded value is what the config holds: the service opens exactly what
# --check-config checked, and nothing expands a path a second time.
PATH_KEYS = (
    "bundle",
    "bundle_trust.public_keys",  # a list: every entry is expanded
    "capture.source",
    "storage.dir",
    "mqtt.password_file",
    "mqtt.tls.ca_file",
    "mqtt.tls.cert_file",
    "mqtt.tls.key_file",
)


def expand_path(value: str) -> str:
    """``${VAR}``, ``$VAR`` and a leading ``~`` expanded; unset variables are left as they are."""
    return os.path.expanduser(os.path.expandvars(value))


def unset_variables(raw: str) -> list[str]:
    """The ``$VAR`` / ``${VAR}`` references in a path as written whose variable is not set."""
    return [m.group(0) for m in _VAR_RE.finditer(raw) if m.group(1).strip("{}") not in os.environ]


def read_password(path: str) -> str:
    """The first line of an (already expanded) password file."""
    text = Path(path).read_text(encoding="utf-8")
    return text.splitlines()[0] if text else ""


def source_kind(source: str | int, kind: str = "auto") -> str:
    """device, stream, video or folder, from the source's form (or the explicit kind)."""
    if kind != "auto":
        return kind
    if isinstance(source, int) or str(source).isdigit():
        return "device"
    s = str(source)
    if s.lower().startswith(STREAM_SCHEMES):
        return "stream"
    if s.startswith("/dev/"):
        return "device"
    p = Path(s)
    if p.is_dir():
        return "folder"
    if p.is_file() or p.suffix.lower() in VIDEO_SUFFIXES:
        return "video"
    return "folder"


# --- generic loading: YAML mapping -> dataclasses, every problem collected ---------------------------

_TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        text = " or ".join(parts)
        return text + " (or null)" if type(None) in typing.get_args(tp) else text
    if origin is list:
        return "a list of " + _describe(typing.get_args(tp)[0]) + "s"
    return _TYPE_WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Check ``value`` against ``tp``; return the converted value or record a problem."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping of keys, got {type(value).__name__}; indent its keys under it")
            return None
        return _build(tp, value, path, problems)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _coerce(value, arg, path, trial)
            if not trial:
                return out
        problems.append(f"{path}: expected {_describe(tp)}, got {value!r}")
        return None
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            problems.append(f"{path}: {value!r} is not allowed; use one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{path}: expected {_describe(tp)}, got {value!r}")
            return None
        return [_coerce(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected a whole number, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            problems.append(f"{path}: expected a non-empty string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a programming error, not a user's


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key in data:
        if key not in fields:
            path = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            problems.append(f"{path}: unknown key{hint}")
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in data:
            if required and not dataclasses.is_dataclass(hints[name]):
                problems.append(f"{path}: required key is missing ({f.metadata.get('help', '')})")
            elif required:
                kwargs[name] = _coerce({}, hints[name], path, problems)
            continue
        kwargs[name] = _coerce(data[name], hints[name], path, problems)
    try:
        return cls(**kwargs)
    except TypeError:
        return None  # missing required fields, already reported


# --- cross-field rules ------------------------------------------------------------------------------


def _positive(problems: list[str], path: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        problems.append(f"{path}: must be {'zero or more' if allow_zero else 'greater than zero'}, got {value}")


def _check_capture(c: CaptureConfig, problems: list[str]) -> None:
    if isinstance(c.source, int) and c.source < 0:
        problems.append(f"capture.source: camera index {c.source} must be 0 or more")
    if c.roi is not None and (
        len(c.roi) != 4
        or any(not isinstance(v, int) for v in c.roi)
        or c.roi[0] < 0
        or c.roi[1] < 0
        or c.roi[2] <= 0
        or c.roi[3] <= 0
    ):
        problems.append(
            f"capture.roi: {c.roi} must be [x, y, width, height] with x, y >= 0 and a positive size, "
            "or null for the bundle's own ROI"
        )
    for name in ("max_fps", "fps", "poll_interval_s", "open_timeout_s", "read_timeout_s", "reopen_backoff_s"):
        _positive(problems, f"capture.{name}", getattr(c, name))
    _positive(problems, "capture.settle_s", c.settle_s, allow_zero=True)
    _positive(problems, "capture.trigger_flush_frames", c.trigger_flush_frames, allow_zero=True)
    for name in ("width", "height"):
        _positive(problems, f"capture.{name}", getattr(c, name))
    if c.max_pixels < MIN_FRAME_SIDE * MIN_FRAME_SIDE:
        problems.append(f"capture.max_pixels: {c.max_pixels} is below the smallest frame "
                        f"({MIN_FRAME_SIDE}x{MIN_FRAME_SIDE}); use the frame size with room to spare, e.g. 40000000")
    if c.reopen_backoff_max_s < c.reopen_backoff_s:
        problems.append("capture.reopen_backoff_max_s: must be at least capture.reopen_backoff_s")
    kind = source_kind(c.source, c.kind)
    if kind in ("device",) and not (
        isinstance(c.source, int) or str(c.source).isdigit() or str(c.source).startswith("/dev/")
    ):
        problems.append(f"capture.source: {c.source!r} is not a camera; use an index like 0 or a /dev/videoN path")
    if c.loop and kind != "video":
        problems.append(f"capture.loop: only applies to a video file, but the source is a {kind}; remove it")


def _check_mqtt(m: MqttConfig, problems: list[str]) -> None:
    if not 0 < m.port < 65536:
        problems.append(f"mqtt.port: {m.port} is not a TCP port (1-65535)")
    if m.qos not in (1, 2):
        problems.append(
            f"mqtt.qos: {m.qos} cannot work with the outbox, which deletes a verdict only once the broker "
            "acknowledged it; use 1 (or 2)"
        )
    prefix = m.topic_prefix
    if any(ch in prefix for ch in "+#\0") or prefix.startswith("/") or prefix.endswith("/"):
        problems.append(f"mqtt.topic_prefix: {prefix!r} must not hold '+', '#', or start or end with '/'")
    if m.keepalive_s < 5:
        problems.append(f"mqtt.keepalive_s: {m.keepalive_s} is too short; use 5 or more (30 is usual)")
    _positive(problems, "mqtt.reconnect_min_s", m.reconnect_min_s)
    if m.reconnect_max_s < m.reconnect_min_s:
        problems.append("mqtt.reconnect_max_s: must be at least mqtt.reconnect_min_s")
    _positive(problems, "mqtt.stats_interval_s", m.stats_interval_s)
    if not 1 <= m.max_inflight <= 65535:
        problems.append(f"mqtt.max_inflight: {m.max_inflight} must be between 1 and 65535")
    if m.max_command_bytes < 64:
        problems.append(f"mqtt.max_command_bytes: {m.max_command_bytes} is too small; use 64 or more")
    if m.password_file and not m.username:
        problems.append("mqtt.password_file: a password needs mqtt.username too; set it or remove the password")
    t = m.tls
    if (t.cert_file is None) != (t.key_file is None):
        problems.append("mqtt.tls: cert_file and key_file go together; set both for mutual TLS or neither")
    for name in ("ca_file", "cert_file", "key_file"):
        value = getattr(t, name)
        if value and not t.enabled:
            problems.append(f"mqtt.tls.{name}: is set but mqtt.tls.enabled is false; enable TLS or remove it")
    dp = m.homeassistant.discovery_prefix
    if any(ch in dp for ch in "+#") or not dp.strip("/"):
        problems.append(f"mqtt.homeassistant.discovery_prefix: {dp!r} is not a topic prefix")


def _unset_problem(key: str, raw: str, names: list[str]) -> str:
    text = f"{key}: {raw!r} names the unset environment variable {', '.join(names)}"
    if key == "mqtt.password_file":
        return (text + "; under systemd keep the unit's LoadCredential=mqtt-password line, elsewhere give a "
                "real path")
    return text + "; set it in the service's environment (Environment= in a drop-in) or give a real path"


def _check_mqtt_files(m: MqttConfig, problems: list[str], unset: dict[str, str]) -> None:
    """Files named by the mqtt section must exist here (not checked when validating elsewhere)."""
    if m.password_file and "mqtt.password_file" not in unset:
        p = Path(m.password_file)
        if not p.is_file() or not os.access(p, os.R_OK):
            problems.append(f"mqtt.password_file: {p} is not a readable file; create it (mode 600) or fix the path")
    for name in ("ca_file", "cert_file", "key_file"):
        value = getattr(m.tls, name)
        if value and f"mqtt.tls.{name}" not in unset and not Path(value).is_file():
            problems.append(f"mqtt.tls.{name}: {value} is not a file; fix the path")


def _path_holder(cfg: AgentConfig, key: str) -> tuple[Any, str]:
    """The object holding a dotted key, and the attribute name."""
    *parents, attr = key.split(".")
    obj: Any = cfg
    for part in parents:
        obj = getattr(obj, part)
    return obj, attr


def _is_local_path(key: str, value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    if key == "capture.source":
        return not value.lower().startswith(STREAM_SCHEMES) and not value.isdigit()
    return True


def _expand_paths(cfg: AgentConfig) -> dict[str, str]:
    """Expand every PATH_KEYS value in place, once. Returns {key: problem} for unset variables."""
    unset: dict[str, str] = {}
    for key in PATH_KEYS:
        holder, attr = _path_holder(cfg, key)
        raw = getattr(holder, attr)
        if isinstance(raw, list):  # bundle_trust.public_keys: every entry on its own
            setattr(holder, attr, [expand_path(v) for v in raw])
            for i, v in enumerate(raw):
                if unset_variables(v):
                    unset[f"{key}[{i}]"] = _unset_problem(f"{key}[{i}]", v, unset_variables(v))
            continue
        if not _is_local_path(key, raw):
            continue
        setattr(holder, attr, expand_path(raw))
        names = unset_variables(raw)
        if names:
            unset[key] = _unset_problem(key, raw, names)
    return unset


def _read_problem(key: str, path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        return f"{key}: cannot read {path} ({exc.strerror or exc}); fix the path or its permissions"
    return None


def _tls_load_problems(t: TLSConfig) -> list[str]:
    """Load the TLS files into an SSL context as the MQTT client will; each problem names its key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    problems: list[str] = []
    if t.ca_file:
        try:
            ctx.load_verify_locations(cafile=t.ca_file)
        except (ssl.SSLError, ValueError) as exc:
            problems.append(f"mqtt.tls.ca_file: {t.ca_file} holds no usable PEM CA certificate ({exc}); "
                            "give the CA that signed the broker's certificate")
    if t.cert_file and t.key_file:
        try:
            ctx.load_cert_chain(certfile=t.cert_file, keyfile=t.key_file)
        except (ssl.SSLError, ValueError) as exc:
            problems.append(f"mqtt.tls.cert_file / mqtt.tls.key_file: {t.cert_file} and {t.key_file} are not a "
                            f"PEM certificate and its matching unencrypted private key ({exc})")
    return problems


def open_file_problems(cfg: AgentConfig) -> list[str]:
    """Open and read every file the service will open at start (password, TLS files); each problem names
    its key and the fix. parse_config already checked they exist; this catches permissions and contents."""
    problems: list[str] = []
    m = cfg.mqtt
    if m.password_file:
        found = _read_problem("mqtt.password_file", m.password_file)
        if found is None:
            try:
                read_password(m.password_file)
            except (OSError, UnicodeDecodeError) as exc:
                found = f"mqtt.password_file: cannot read {m.password_file} as text ({exc}); fix the file"
        if found:
            problems.append(found)
    if m.tls.enabled:
        tls_files = [(f"mqtt.tls.{n}", getattr(m.tls, n)) for n in ("ca_file", "cert_file", "key_file")]
        unreadable = [p for p in (_read_problem(k, v) for k, v in tls_files if v) if p]
        problems.extend(unreadable)
        if not unreadable:
            problems.extend(_tls_load_problems(m.tls))
    return problems


def _check_rest(cfg: AgentConfig, problems: list[str]) -> None:
    if not DEVICE_ID_RE.match(cfg.device_id or ""):
        problems.append(
            f"device_id: {cfg.device_id!r} must be 1-64 letters, digits, '_', '-' or '.', starting with a "
            "letter or digit (it becomes an MQTT topic level and a Home Assistant id)"
        )
    if cfg.threads is not None and cfg.threads < 1:
        problems.append(f"threads: {cfg.threads} must be 1 or more, or null")
    if not 1 <= cfg.gradcam.keep_frames <= 1000:
        problems.append(f"gradcam.keep_frames: {cfg.gradcam.keep_frames} must be between 1 and 1000")
    if not 1 <= cfg.service.recent_frames <= 1000:
        problems.append(f"service.recent_frames: {cfg.service.recent_frames} must be between 1 and 1000")
    if not 1 <= cfg.gradcam.jpeg_quality <= 100:
        problems.append(f"gradcam.jpeg_quality: {cfg.gradcam.jpeg_quality} must be between 1 and 100")
    s = cfg.storage
    _positive(problems, "storage.save_normal_every", s.save_normal_every, allow_zero=True)
    _positive(problems, "storage.max_files", s.max_files, allow_zero=True)
    _positive(problems, "storage.max_age_days", s.max_age_days)
    _positive(problems, "storage.max_bytes", s.max_bytes)
    _positive(problems, "storage.min_free_bytes", s.min_free_bytes, allow_zero=True)
    if cfg.outbox.max_messages < 1:
        problems.append(f"outbox.max_messages: {cfg.outbox.max_messages} must be 1 or more")
    if cfg.outbox.memory_max < 1:
        problems.append(f"outbox.memory_max: {cfg.outbox.memory_max} must be 1 or more (10000 verdicts is about 5 MB)")
    _positive(problems, "outbox.retry_s", cfg.outbox.retry_s)
    if not 0 < cfg.metrics.port < 65536:
        problems.append(f"metrics.port: {cfg.metrics.port} is not a TCP port (1-65535)")
    _positive(problems, "service.ready_timeout_s", cfg.service.ready_timeout_s)
    if not 1 <= cfg.feedback.max_extension <= 1000:
        problems.append(f"feedback.max_extension: {cfg.feedback.max_extension} must be between 1 and 1000 (set "
                        "feedback.bank_extension: false to keep labels without extending the banks)")
    if not 1 <= cfg.feedback.max_frames <= 100000:
        problems.append(f"feedback.max_frames: {cfg.feedback.max_frames} must be between 1 and 100000")


GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_BUNDLE_BYTES_LIMIT = 1024 * 1024 * 1024  # 1 GiB: a bundle is a few MB; more is a typo


def _check_fleet(cfg: AgentConfig, problems: list[str]) -> None:
    f = cfg.fleet
    for i, group in enumerate(f.groups):
        if isinstance(group, str) and not GROUP_RE.match(group):
            problems.append(f"fleet.groups[{i}]: {group!r} must be 1-64 letters, digits, '_', '-' or '.' (it becomes "
                            "an MQTT topic level)")
    if len(set(f.groups)) != len(f.groups):
        problems.append("fleet.groups: a group is listed twice; list each once")
    if not 1 <= f.max_bundle_bytes <= MAX_BUNDLE_BYTES_LIMIT:
        problems.append(f"fleet.max_bundle_bytes: {f.max_bundle_bytes} must be between 1 and {MAX_BUNDLE_BYTES_LIMIT} "
                        "(a bundle is a few MB; 67108864 is the default)")
    if f.shadow_frames < 0:
        problems.append(f"fleet.shadow_frames: {f.shadow_frames} must be 0 or more")
    elif f.shadow_frames > cfg.service.recent_frames:
        problems.append(f"fleet.shadow_frames: {f.shadow_frames} is more than service.recent_frames "
                        f"({cfg.service.recent_frames}), the frames kept to score; lower fleet.shadow_frames or "
                        "raise service.recent_frames")
    if not 0.0 <= f.max_anomaly_share <= 1.0:
        problems.append(f"fleet.max_anomaly_share: {f.max_anomaly_share} must be between 0 and 1 (a share of frames)")
    if not 0 <= f.watch_frames <= 100000:
        problems.append(f"fleet.watch_frames: {f.watch_frames} must be between 0 and 100000")
    if f.keep_bundles < 2:
        problems.append(f"fleet.keep_bundles: {f.keep_bundles} must be at least 2 (the bundle in use and the "
                        "previous one, for cmd/rollback)")


def _check_trust(t: BundleTrustConfig, problems: list[str]) -> None:
    if t.require_signature and not t.public_keys:
        problems.append("bundle_trust.require_signature: true needs the keys that sign your bundles; list their "
                        ".pub files under bundle_trust.public_keys (yugami-keys generate writes them) or set it "
                        "to false")


def trust_key_problems(cfg: AgentConfig, unset: dict[str, str] | None = None) -> list[str]:
    """Each bundle_trust.public_keys file must be a readable Ed25519 public key; each problem names the entry."""
    from agent.trust import load_public_key  # cryptography, loaded only where keys are configured

    problems: list[str] = []
    for i, path in enumerate(cfg.bundle_trust.public_keys):
        key = f"bundle_trust.public_keys[{i}]"
        if unset and key in unset:
            continue
        try:
            load_public_key(path)
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
    return problems


def _check_storage_dir(cfg: AgentConfig, problems: list[str]) -> None:
    """A file where the folder should be is a config problem (it stays wrong until someone moves it). A folder
    that cannot be created or written (read-only or full disk, permissions) is not: the agent runs degraded
    and tries again (see storage_dir_warning)."""
    d = cfg.storage_dir
    blocker = next((p for p in (d, *d.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        problems.append(f"storage.dir: {blocker} is a file, not a folder; move it aside or give another folder")
        return
    with contextlib.suppress(OSError):  # reported by storage_dir_warning; the agent retries
        d.mkdir(parents=True, exist_ok=True)


def storage_dir_warning(cfg: AgentConfig) -> str | None:
    """Why storage.dir cannot be written now, or None. The agent starts anyway: verdicts wait in memory
    (outbox.memory_max) and the outbox is opened as soon as the folder takes writes."""
    d = cfg.storage_dir
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return (f"storage.dir: cannot create {d} ({exc.strerror or exc}); the agent runs degraded (verdicts wait "
                "in memory) and tries again every outbox.retry_s; make it writable")
    if not os.access(d, os.W_OK | os.X_OK):
        return (f"storage.dir: {d} is not writable by this user; the agent runs degraded (verdicts wait in "
                "memory) and tries again every outbox.retry_s; fix its owner or give another folder")
    return None


def parse_config(data: Any, source: str = "config", check_files: bool = True) -> AgentConfig:
    """A validated AgentConfig from parsed YAML; raise ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"the file must be a YAML mapping of keys, got {type(data).__name__}"], source)
    problems: list[str] = []
    cfg = _build(AgentConfig, data, "", problems)
    if cfg is None or problems:
        raise ConfigError(problems, source)
    unset = _expand_paths(cfg)
    _check_capture(cfg.capture, problems)
    _check_mqtt(cfg.mqtt, problems)
    _check_rest(cfg, problems)
    _check_trust(cfg.bundle_trust, problems)
    _check_fleet(cfg, problems)
    if check_files:
        problems.extend(unset.values())
        _check_mqtt_files(cfg.mqtt, problems, unset)
        problems.extend(trust_key_problems(cfg, unset))
    if check_files and not problems:
        problems.extend(open_file_problems(cfg))
    if check_files and not problems:
        _check_storage_dir(cfg, problems)
    if check_files and "bundle" not in unset and not Path(cfg.bundle).is_dir():
        problems.append(f"bundle: {cfg.bundle} is not a folder; point it at a bundle written by yugami-train")
    if problems:
        raise ConfigError(problems, source)
    cfg.config_path = source
    return cfg


def load_config(path: str | Path, check_files: bool = True) -> AgentConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the config file ({exc.strerror}); check the --config path"], str(p)) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(p)) from exc
    return parse_config(data, str(p), check_files=check_files)


def warnings_for(cfg: AgentConfig) -> list[str]:
    """Things that are allowed but probably not meant (the source is retried with backoff at run time)."""
    out = []
    storage = storage_dir_warning(cfg)
    if storage:
        out.append(storage)
    kind = cfg.source_kind
    src = cfg.capture.source
    if kind in ("video", "folder") and not Path(str(src)).exists():
        out.append(f"capture.source: {src} does not exist yet; the agent will keep retrying until it appears")
    if kind == "device" and isinstance(src, str) and src.startswith("/dev/") and not Path(src).exists():
        out.append(f"capture.source: {src} does not exist; is the camera plugged in?")
    if cfg.capture.mode == "trigger" and kind == "stream":
        out.append(
            "capture.mode: trigger on a stream reads buffered frames; raise capture.trigger_flush_frames "
            "if shots look stale"
        )
    return out


def field_docs(cls: type = AgentConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key path, default, help) for every key, for documentation and its test."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        path = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows.append((path, "", f.metadata.get("help", "")))
            rows.extend(field_docs(hints[f.name], path))
            continue
        if f.default is not dataclasses.MISSING:
            default = "null" if f.default is None else repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # a list: [] rather than "(required)"
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((path, default, f.metadata.get("help", "")))
    return rows
