"""``yugami-agent --config FILE``: the inspection service on the camera box.

One frame loop in the main thread: take a frame, score it, store the verdict in the outbox, let
the deliverer publish it. The TFLite interpreter is used from this thread only; MQTT callbacks
(network thread) only queue commands and acknowledgements for it. Signal handlers only set flags.

systemd: READY=1 once model, source and broker are up (or after ``service.ready_timeout_s``,
reported as degraded), WATCHDOG=1 from the frame loop (a hung camera read stops the pings and
systemd restarts us), STOPPING=1 on SIGTERM, RELOADING=1 + READY=1 around a SIGHUP reload.

Exit status: 0 after a clean stop, 78 (EX_CONFIG) for a bad config or bundle at start (systemd's
RestartPreventExitStatus=78 stops a restart loop), 1 for anything unexpected.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import logging
import math
import os
import signal
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent import __version__
from agent.bundle import MANIFEST, MAX_MANIFEST_BYTES, Bundle, BundleError, load_bundle, model_info, sha256_bytes
from agent.capture import Frame, ManagedSource, SourceStatus, make_source, new_run_id
from agent.collect import Collector
from agent.commands import CommandHandlers, CommandQueue, CommandRunner, Pending, ReplyLimiter, busy_error
from agent.config import EX_CONFIG, AgentConfig, ConfigError, load_config, warnings_for
from agent.feedback import FeedbackError, FeedbackLoop, FrameRef
from agent.metrics import MetricsServer
from agent.mqtt import (
    Command,
    LinkCallbacks,
    Message,
    MqttLink,
    Topics,
    command_result_message,
    discovery_message,
    event_message,
    gradcam_message,
    state_message,
    stats_message,
    utc_iso,
    verdict_message,
    verdict_payload,
)
from agent.notify import Notifier
from agent.outbox import Deliverer, Row, Spool
from agent.preprocess import ImageError
from agent.rollout import Rollout, RolloutHooks
from agent.scoring import Embedding, Scorer
from agent.settings import BoxSettings
from agent.storage import Evidence
from agent.trust import Signer, is_downgrade, load_trusted_keys, verify_signature

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
IDLE_WAIT_S = 0.1  # longest the loop sleeps when there is nothing to do (bounds signal latency too)
BUSY_REPLY_BURST = 5  # "busy" answers at once when the command queue is full ...
BUSY_REPLY_PER_S = 1.0  # ... then this many per second: a flood must not become a flood of answers


def load_agent_bundle(cfg: AgentConfig, path: str | os.PathLike[str] | None = None, current: Bundle | None = None,
                      force: bool = False) -> Bundle:
    """The configured bundle (or the one at ``path``, e.g. an installed bundle), checked against the config's
    ``bundle_trust``, with the config's ROI (if any) replacing the bundle's.

    Raises BundleError for anything wrong with it, also for what the loader did not foresee (an error of
    another type while loading is a bundle the agent cannot use, not a reason to crash), for a threshold that
    is not a finite number (a verdict with NaN cannot even be written as JSON), for a signature bundle_trust
    refuses (unsigned, bad, unknown key, manifest changed after signing), and for a version below
    ``current``'s unless ``force``. Touches no service state, so any thread may call it (the install worker
    does); the caller swaps the bundle in."""
    where = str(path) if path is not None else cfg.bundle
    raw, signer = _verified_manifest(cfg, where)
    try:
        bundle = load_bundle(where, num_threads=cfg.threads)
    except (BundleError, ImportError):
        raise
    except Exception as exc:
        raise BundleError(f"bundle {where}: cannot be loaded ({type(exc).__name__}: {exc}); re-export it "
                          "with yugami-train, or copy it again if it was damaged") from exc
    if (cfg.bundle_trust.public_keys or cfg.bundle_trust.required) and (
        raw is None or sha256_bytes(raw) != bundle.manifest_sha256
    ):  # the signature was checked on other bytes than the loader read: the folder changed meanwhile
        raise BundleError(f"bundle {where}/{MANIFEST}: changed while it was being loaded; load it again once the "
                          "new bundle is written whole (unpack beside it and repoint a link)")
    if not math.isfinite(bundle.threshold):
        raise BundleError(f"bundle {where}/manifest.json: 'threshold.value' must be a finite number, not "
                          f"{bundle.threshold!r}; re-export the bundle with yugami-train")
    if current is not None and not force and is_downgrade(bundle.version, current.version):
        raise BundleError(f"bundle {where}: downgrade from version {current.version} to {bundle.version} refused; "
                          "send force: true (cmd/reload {\"force\": true}, yugami-fleet push --force) to go back "
                          "to an older bundle, or export the bundle with a higher --model-version")
    changes: dict[str, Any] = {"signer": signer.as_dict() if signer else None}
    if cfg.capture.roi is not None:
        changes["preprocessing"] = bundle.preprocessing.with_roi(tuple(cfg.capture.roi))  # type: ignore[arg-type]
    return dataclasses.replace(bundle, **changes)


def _verified_manifest(cfg: AgentConfig, where: str) -> tuple[bytes | None, Signer | None]:
    """(the manifest's raw bytes, the verified signer) per ``bundle_trust``; (None, None) when the manifest
    cannot be read here (load_bundle then says what is wrong with the folder)."""
    trust = cfg.bundle_trust
    try:
        keys = load_trusted_keys(trust.public_keys)  # read again on every load: rotating keys needs no restart
    except ValueError as exc:
        raise BundleError(f"bundle_trust.public_keys: {exc}") from exc
    mpath = os.path.join(where, MANIFEST)
    try:
        if os.path.getsize(mpath) > MAX_MANIFEST_BYTES:
            return None, None
        with open(mpath, "rb") as f:
            raw = f.read()
    except OSError:
        return None, None
    signer = verify_signature(where, raw, keys, trust.required)  # type: ignore[arg-type]
    if signer is None and keys:
        logger.warning("bundle %s is unsigned; accepted because bundle_trust.require_signature is false", where)
    return raw, signer


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``); False where there is none.

    Called after a reload: the old bundle (interpreter, arena, weights, banks) is freed, but glibc keeps the
    freed heap, and up to two bundles' worth of it stayed resident for good (bench/results/flood.md). Without
    the trim RSS rose by 23 MB over the first 50 reloads of the demo bundle and stayed there; a plateau, not a
    leak: no old bundle outlives its swap (tests/unit/test_reload_memory.py)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim  # glibc; musl and macOS have none
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim is False:
        return False
    _malloc_trim(0)
    return True


_malloc_trim: Any = None  # looked up on first use: the function, or False where libc has none


@dataclass
class Recent:
    """What a later cmd/gradcam needs of an inspected frame."""

    frame_id: str
    bundle: Bundle
    embedding: Embedding
    nearest: int


@dataclass(frozen=True)
class KeptFrame:
    """An inspected frame kept in memory (``service.recent_frames`` of them): the picture and its verdict.

    What shadow-scoring a bundle being installed and ``cmd/feedback`` on a recent verdict need; it holds
    a reference to the frame the loop already decoded, no copy."""

    frame_id: str
    image: np.ndarray
    payload: dict[str, Any]


class Counters:
    """Frame counters; written by the frame loop, read by the stats, metrics and MQTT threads."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.frames = 0
        self.anomalies = 0
        self.errors = 0
        self._lock = threading.Lock()  # a deque must not change while another thread copies it
        self._latencies: deque[float] = deque(maxlen=1000)
        self._times: deque[float] = deque(maxlen=200)

    def frame(self, latency_ms: float, anomaly: bool) -> None:
        with self._lock:
            self.frames += 1
            self.anomalies += int(anomaly)
            self._latencies.append(latency_ms)
            self._times.append(time.monotonic())

    def fps(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._times if now - t <= 10.0]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)

    def latency(self) -> dict[str, float | None]:
        with self._lock:
            arr = np.asarray(self._latencies, dtype=np.float64)
        if arr.size == 0:
            return {"p50": None, "p99": None}
        return {"p50": round(float(np.percentile(arr, 50)), 3), "p99": round(float(np.percentile(arr, 99)), 3)}


class Agent:
    def __init__(self, cfg: AgentConfig, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.topics = Topics.from_config(cfg)
        self.counters = Counters()
        self.commands = CommandQueue()
        self.handlers = CommandHandlers(self, self.commands)
        self.runner = CommandRunner(self.commands, self.handlers)
        self._busy_replies = ReplyLimiter(BUSY_REPLY_BURST, BUSY_REPLY_PER_S)
        self.recent: deque[Recent] = deque(maxlen=cfg.gradcam.keep_frames)
        self.kept_frames: deque[KeptFrame] = deque(maxlen=cfg.service.recent_frames)
        self._next_watchdog = 0.0
        self.last_state: dict[str, Any] | None = None
        self._stop = False
        self._reload_requested = False
        self._wake = threading.Event()
        self._ready_sent = False
        self._degraded_ready = False
        self.scorer: Scorer | None = None
        self.metrics: MetricsServer | None = None
        self._collector: Collector | None = None  # cmd/collect_list and cmd/fetch, made on first use
        # cmd/set overrides, persisted in <storage_dir>/settings.json
        self.settings = BoxSettings(cfg, scorer=lambda: self.scorer, event=self._event, kept_event=self._kept_event)
        # bundles installed over MQTT (cmd/install, cmd/rollback): chunks on this thread, the job in a worker
        # thread that never touches self.scorer; the switch happens here, between two frames (_switch_scorer)
        self.rollout = Rollout(cfg, RolloutHooks(
            scorer=lambda: self.scorer, switch=self._switch_scorer, make_scorer=self.make_scorer,
            load_bundle=lambda **where: load_agent_bundle(cfg, **where), kept_frames=lambda: self.kept_frames,
            event=self._event, kept_event=self._kept_event, reply=self.handlers.reply,
            command_reply=self.command_reply, wake=self._wake.set,
            release_free_memory=release_free_memory,
        ))

    # --- setup ---

    def _setup(self) -> None:
        """Open storage, the outbox and the MQTT client, then start the threads. A problem found here
        (unreadable TLS file, outbox that cannot be opened) raises ConfigError naming the key and the fix."""
        cfg = self.cfg
        self._open_storage()
        try:
            self.link = MqttLink(cfg, self.topics, LinkCallbacks(
                on_command=self._queue_command,
                on_published=self._on_published,
                on_ready=lambda: self.deliverer.set_online(True),
                on_down=lambda: self.deliverer.set_online(False),
                on_connected=self._on_connected,
                discovery=self._discovery,
            ))
        except ConfigError:
            self.outbox.close()
            raise
        self.deliverer = Deliverer(self.outbox, self._hand_over, window=cfg.mqtt.max_inflight)
        self.source = ManagedSource(make_source(cfg, new_run_id()), cfg.capture, on_change=self._source_changed)
        self.deliverer.start()
        self.link.start()
        if cfg.metrics.enabled:
            self._start_metrics()

    def _open_storage(self) -> None:
        """The outbox (a spool: memory behind a disk that refuses writes) and the evidence folder.

        A disk that cannot be written (read-only, full, permissions) is no reason to stop: the spool runs
        degraded and tries again. What retrying cannot fix is a ConfigError (exit 78): a file where the
        state folder should be, a folder where the outbox file should be, a file that is not a database."""
        cfg = self.cfg
        storage = cfg.storage_dir
        path = storage / "outbox.sqlite3"
        source = cfg.config_path or "config"
        blocker = next((p for p in (storage, *storage.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise ConfigError([f"storage.dir: {blocker} is a file, not a folder; move it aside or give "
                               "storage.dir a writable folder"], source)
        with contextlib.suppress(OSError):  # a read-only disk: the spool says so and tries again
            storage.mkdir(parents=True, exist_ok=True)
        try:
            self.outbox = Spool(path, cfg.outbox.max_messages, on_drop=self._outbox_dropped,
                                capacity=cfg.outbox.memory_max, retry_s=cfg.outbox.retry_s,
                                on_event=self._outbox_event)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError([f"storage.dir: the outbox {path} cannot be opened ({type(exc).__name__}: {exc}); "
                               "give storage.dir a writable folder with free space, or move a damaged "
                               "outbox.sqlite3 aside (its undelivered verdicts are in it)"], source) from exc
        self.evidence = Evidence(storage, cfg.storage)
        self.feedback_loop = FeedbackLoop(storage, cfg.feedback, cfg.device_id, self._kept_event)

    def _start_metrics(self) -> None:
        m = self.cfg.metrics
        try:
            self.metrics = MetricsServer(m.host, m.port, self.snapshot)
        except OSError as exc:
            logger.error("metrics: cannot listen on %s:%d (%s); pick a free metrics.port. Going on without them",
                         m.host, m.port, exc)
            return
        self.metrics.start()

    def _install_signals(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            self._stop = True

        def reload(signum: int, _frame: Any) -> None:
            self._reload_requested = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)
        # A file-size limit (LimitFSIZE=) must be a write error the outbox handles, not a core dump.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    # --- callbacks from other threads: queue and wake, nothing more ---

    def _queue_command(self, command: Command) -> None:
        if self.commands.offer(command) == "full" and self._busy_replies.allow():
            logger.warning("command queue full: refusing %s (%d refused so far)", command.name, self.commands.dropped)
            self.link.publish(command_result_message(self.topics, command.name, ok=False,
                                                     request_id=command.request_id, error=busy_error(self.commands)))
        self._wake.set()

    def _on_published(self, mid: int) -> None:
        self.deliverer.acked(mid)

    def _hand_over(self, row: Row) -> int | None:
        return self.link.hand_over(Message(row.topic, row.payload, row.qos, row.retain))

    def _on_connected(self) -> list[Message]:
        out = [stats_message(self.topics, self.snapshot())]
        if self.last_state is not None:
            out.append(state_message(self.topics, self.last_state))
        return out

    def _discovery(self) -> Message | None:
        return discovery_message(self.topics, self.scorer.bundle.name if self.scorer else "unknown")

    # --- reports ---

    def _event(self, event: str, **detail: Any) -> None:
        self.link.publish(event_message(self.topics, event, utc_iso(), **detail))

    def _kept_event(self, event: str, **detail: Any) -> None:
        """An event handed to the MQTT client even while the broker is away (it keeps QoS 1 messages and sends
        them on reconnect): the feedback loop's changes, also those at start before the broker is up."""
        self.link.hand_over(event_message(self.topics, event, utc_iso(), **detail))

    def _source_changed(self, status: SourceStatus) -> None:
        if status.state == "down":
            self._event("source_down", source=status.name, error=status.error, retry_in_s=status.retry_in_s)
        elif status.state == "up":
            self._event("source_up", source=status.name, reopens=status.reopens)
        elif status.state == "ended":
            self._event("source_ended", source=status.name)
        self.notifier.status(self._status_line())

    def _outbox_event(self, event: str, detail: dict[str, Any]) -> None:
        # Handed to the MQTT client even while the broker is away (it keeps QoS 1 messages and sends them on
        # reconnect): a failing disk often comes with other trouble, and this is the one report that matters.
        self.link.hand_over(event_message(self.topics, event, utc_iso(), **detail))

    def _outbox_dropped(self, count: int, upto: int) -> None:
        self._event("outbox_dropped", dropped=count, total_dropped=self.outbox.dropped_total,
                    max_messages=self.cfg.outbox.max_messages)

    def snapshot(self) -> dict[str, Any]:
        bundle = self.scorer.bundle if self.scorer else None
        c = self.counters
        return {
            "ts": utc_iso(),
            "device": self.cfg.device_id,
            "uptime_s": round(time.monotonic() - c.started, 1),
            "frames": c.frames,
            "fps": round(c.fps(), 2),
            "anomalies": c.anomalies,
            "errors": c.errors,
            "latency_ms": c.latency(),
            "model": model_info(bundle),
            "reconnects": self.link.reconnects,
            "mqtt_connected": self.link.connected.is_set(),
            "outbox": self.outbox.stats(),
            "source": self.source.status.as_dict(),
            "evidence": {"saved": self.evidence.saved, "kept": len(self.evidence), "bytes": self.evidence.bytes,
                         "errors": self.evidence.errors, "skipped": self.evidence.skipped},
            "commands": self.commands.stats(),
            "feedback": self.feedback_loop.counts(),
            "version": __version__,
            **self.settings.stats(),
            **self.rollout.stats(),
        }

    def _status_line(self) -> str:
        c = self.counters
        broker = "up" if self.link.connected.is_set() else "down"
        disk = " (disk refuses writes: verdicts in memory)" if self.outbox.degraded else ""
        return (f"{c.frames} frames, {c.anomalies} anomalies, {c.errors} bad; source {self.source.status.state}, "
                f"broker {broker}, outbox {self.outbox.depth()}{disk}")

    # --- the loop ---

    def run(self) -> int:
        try:
            bundle = self.rollout.start_bundle()
        except (BundleError, ImportError) as exc:
            logger.error("%s", exc)
            return EX_CONFIG
        self.settings.load()
        self.scorer = self.make_scorer(bundle)
        logger.info("model %s (manifest sha256 %s), threshold %.6f (%s)", bundle.name, bundle.manifest_sha256[:12],
                    self.scorer.threshold, self.settings.effective().threshold_source)
        logger.info("model version %s, %s", bundle.version, f"signed by {bundle.signer['name']} (key id "
                    f"{bundle.signer['key_id']})" if bundle.signer else "no verified signature")
        self._install_signals()
        try:
            self._setup()
        except ConfigError as exc:
            logger.error("cannot start: %s", exc)
            return EX_CONFIG
        self.settings.start_events(bundle)
        self.rollout.send_start_events()
        try:
            self._loop()
        finally:
            self._shutdown()
        return EXIT_OK

    def _loop(self) -> None:
        cfg = self.cfg
        last_frame = -math.inf
        next_stats = time.monotonic() + cfg.mqtt.stats_interval_s
        while not self._stop:
            now = time.monotonic()
            if self._reload_requested:
                self._reload_requested = False
                self._reload("SIGHUP")
            self.runner.drain(keepalive=self._keepalive, should_stop=lambda: self._stop)
            if self._stop:
                break
            now = time.monotonic()
            self._maybe_ready(now)
            self._keepalive()
            if now >= next_stats:
                next_stats = now + cfg.mqtt.stats_interval_s
                self._publish_stats()
            self.handlers.expire(now)
            self.rollout.tick()  # a finished install / rollback switches in here, between two frames
            self.outbox.tick()  # a disk that refused writes is tried again when due
            if not self.outbox.has_room():
                self._idle(IDLE_WAIT_S)  # backpressure: no frame is taken whose verdict could not be kept
                continue
            if cfg.capture.mode == "trigger":
                self.source.ensure_open()  # keep the camera open between shots, and READY honest
                self._idle(IDLE_WAIT_S)
                continue
            max_fps = self.settings.effective().max_fps  # each turn: cmd/set max_fps applies at once
            if max_fps and now < last_frame + 1.0 / max_fps:
                if self.source.live and self.source.up:
                    self.source.skip()  # keep draining the camera so the next inspected frame is current
                else:
                    self._idle(min(last_frame + 1.0 / max_fps - now, IDLE_WAIT_S))
                continue
            frame = self.source.read()
            if frame is None:
                self._idle(IDLE_WAIT_S)
                continue
            last_frame = now
            self._process(frame)

    def _idle(self, seconds: float) -> None:
        if len(self.commands):
            return  # commands left over from the last turn's budget: no sleeping
        self._wake.wait(seconds)
        self._wake.clear()

    def _keepalive(self) -> None:
        """Ping systemd's watchdog when due (also between commands, so a long drain is no hang)."""
        now = time.monotonic()
        if self.notifier.watchdog_s and now >= self._next_watchdog:
            self.notifier.watchdog()
            self._next_watchdog = now + self.notifier.watchdog_s

    def _maybe_ready(self, now: float) -> None:
        if self._ready_sent:
            return
        missing = [name for name, ok in (("source", self.source.ever_up), ("broker", self.link.connected.is_set()))
                   if not ok]
        if not missing:
            self._ready_sent = True
            self.notifier.ready(status=self._status_line())
            logger.info("ready: model, source and broker are up")
            return
        if now - self.counters.started >= self.cfg.service.ready_timeout_s:
            self._ready_sent = True
            self._degraded_ready = True
            text = f"degraded: {' and '.join(missing)} not up after {self.cfg.service.ready_timeout_s:g} s"
            logger.warning("ready (%s); inspection goes on and verdicts are kept until they can be sent", text)
            self.notifier.ready(status=text)
            self._event("degraded", missing=missing)

    def _publish_stats(self) -> None:
        self.link.publish(stats_message(self.topics, self.snapshot()))
        self.notifier.status(self._status_line())

    # --- per frame ---

    def _process(self, frame: Frame) -> dict[str, Any] | None:
        """Score one frame and queue its verdict; a bad frame is reported and skipped, never fatal."""
        assert self.scorer is not None
        if frame.error is not None or frame.image is None:
            self._bad_frame(frame, frame.error or "empty frame")
            return None
        scorer = self.scorer
        self.feedback_loop.follow(scorer)  # a new scorer (reload, install, rollback) gets the bank extension
        try:
            result, emb = scorer.score(frame.image, frame.source)
        except ImageError as exc:
            self._bad_frame(frame, str(exc))
            return None
        except Exception as exc:  # a frame must never take the service down; say what happened
            logger.exception("scoring frame %s failed", frame.frame_id)
            self._bad_frame(frame, f"scoring failed: {type(exc).__name__}: {exc}")
            return None
        bundle = scorer.bundle
        payload = verdict_payload(
            frame_id=frame.frame_id, ts=utc_iso(), device=self.cfg.device_id, source=frame.source,
            score=result.score, threshold=result.threshold, verdict=result.verdict, confidence=result.confidence,
            model_name=bundle.name, model_sha256=bundle.manifest_sha256, latency_ms=result.latency_ms,
        )
        # Evidence before the verdict is stored, so "evidence": true means the file is there. A crash in between
        # leaves a saved frame whose verdict comes again with the frame (same id): nothing is lost.
        if self.evidence.wants(result.verdict):
            payload["evidence"] = self._save_evidence(frame, payload)
        msg = verdict_message(self.topics, payload, qos=self.cfg.mqtt.qos)
        # Stored first (on disk, or in memory while the disk refuses writes), then the file marked inspected:
        # a crash in between repeats the frame (same id), the other order could lose it.
        if self.outbox.put(msg.topic, msg.payload, msg.qos, msg.retain) == "full":
            logger.error("verdict %s not stored: the disk refuses writes and outbox.memory_max is reached; the "
                         "frame is not marked inspected and will be taken again", frame.frame_id)
            return None
        self.source.done(frame)
        self.deliverer.wake()
        self.last_state = payload
        self.link.publish(state_message(self.topics, payload))
        self.counters.frame(result.latency_ms, result.verdict == "anomaly")
        self.kept_frames.append(KeptFrame(frame.frame_id, frame.image, payload))
        record = Recent(frame.frame_id, scorer.view, emb, result.nearest)  # view: nearest may be an extension row
        self.recent.append(record)
        self._gradcam_after_frame(record, result.verdict)
        self.rollout.watch_frame(result.verdict == "anomaly")
        return payload

    def _save_evidence(self, frame: Frame, payload: dict[str, Any]) -> bool:
        """Save the frame and its verdict (which says evidence: true); False when it could not be saved."""
        payload["evidence"] = True
        try:
            return self.evidence.save(frame.image, payload) is not None
        except Exception:  # evidence is a help: never a reason to lose the verdict
            logger.exception("saving evidence for frame %s failed", frame.frame_id)
            return False

    def _bad_frame(self, frame: Frame, error: str) -> None:
        self.counters.errors += 1
        logger.warning("bad frame %s from %s: %s", frame.frame_id, frame.source, error)
        self.source.done(frame)  # a bad file is not retried forever
        self._event("bad_frame", id=frame.frame_id, source=frame.source, error=error)

    # --- what the command handlers (agent.commands) need of the service ---

    def command_reply(self, name: str, request_id: Any, ok: bool, error: str | None, data: dict[str, Any]) -> None:
        self.link.publish(command_result_message(self.topics, name, ok=ok, request_id=request_id, error=error,
                                                 **data))

    def trigger_frame(self) -> tuple[dict[str, Any] | None, str | None, str | None]:
        if self.cfg.capture.mode != "trigger":
            return None, ("capture.mode is 'continuous': frames are taken all the time. Set capture.mode: "
                          "trigger to take frames only on cmd/trigger"), None
        if not self.outbox.has_room():
            return None, ("busy: the disk refuses writes and outbox.memory_max verdicts wait in memory; no frame "
                          "is taken until the broker or the disk takes some"), None
        frame = self.source.read(fresh=True)
        if frame is None:
            status = self.source.status
            why = f"source is {status.state}" + (f" ({status.error})" if status.error else "")
            if status.state == "up":
                why = "the source has no new frame (e.g. no new file in the folder)"
            return None, f"no frame taken: {why}", None
        payload = self._process(frame)
        if payload is None:
            return None, "the frame was bad (see the bad_frame event)", frame.frame_id
        return payload, None, frame.frame_id

    def reload_bundle(self, why: str, force: bool = False) -> tuple[bool, str, dict[str, Any] | None]:
        ok, text = self._reload(why, force=force)
        bundle = self.scorer.bundle if self.scorer else None
        return ok, text, model_info(bundle) if bundle else None

    def gradcam_allowed(self) -> str | None:
        if self.settings.effective().gradcam_policy == "off":
            return ("the Grad-CAM policy is 'off' (gradcam.policy, or cmd/set gradcam_policy); send cmd/set "
                    '{"gradcam_policy": "on_command"} to allow this')
        return None

    def recent_frame(self, frame_id: str) -> Recent | None:
        return next((r for r in self.recent if r.frame_id == frame_id), None)

    def recent_count(self) -> int:
        return len(self.recent)

    def gradcam_publish(self, record: Recent) -> tuple[bytes | None, str]:
        return self._gradcam_jpeg(record)

    @property
    def gradcam_topic(self) -> str:
        return self.topics.gradcam

    def gradcam_topic_for(self, frame_id: str) -> str:
        return self.topics.gradcam_for(frame_id)

    # --- operator feedback (cmd/feedback, cmd/feedback_list, cmd/feedback_undo; agent.feedback) ---

    def feedback(self, frame_id: str, label: str, note: str) -> tuple[bool, str | None, dict[str, Any]]:
        """Label a verdict's frame (kept in memory or as evidence); a good label on a false alarm extends the
        bank at once."""
        assert self.scorer is not None
        frame = self._frame_for_feedback(frame_id)
        if frame is None:
            return False, (f"frame {frame_id!r} is neither among the last {len(self.kept_frames)} frames kept in "
                           "memory nor in the evidence folder (too old, or never saved); raise "
                           "service.recent_frames, or keep evidence (storage.save_anomalies, "
                           "storage.save_normal_every)"), {"frame_id": frame_id}
        try:
            return True, None, self.feedback_loop.label(self.scorer, frame, label, note)
        except FeedbackError as exc:
            return False, str(exc), {"frame_id": frame_id}

    def feedback_list(self, limit: int, label: str | None) -> dict[str, Any]:
        if self.scorer is not None:
            self.feedback_loop.follow(self.scorer)
        return self.feedback_loop.listing(limit, label)

    def feedback_undo(self, frame_id: str) -> tuple[bool, str | None, dict[str, Any]]:
        if self.scorer is not None:
            self.feedback_loop.follow(self.scorer)
        try:
            return True, None, self.feedback_loop.undo(frame_id)
        except FeedbackError as exc:
            return False, str(exc), {"frame_id": frame_id}

    def _frame_for_feedback(self, frame_id: str) -> FrameRef | None:
        kept = next((k for k in reversed(self.kept_frames) if k.frame_id == frame_id), None)
        if kept is not None:
            return FrameRef(frame_id, kept.image, kept.payload, "recent")
        saved = self.evidence.load(frame_id)
        if saved is not None:
            return FrameRef(frame_id, saved[0], saved[1], "evidence")
        return None

    # --- frames back to the workstation (cmd/collect_list, cmd/fetch; agent.collect) ---

    def collect_list(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._collect().list(body)

    def fetch_chunk(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._collect().fetch(body)

    def _collect(self) -> Collector:
        if self._collector is None:  # both stores are read from memory, per request
            self._collector = Collector(lambda: self.feedback_loop.store.entries(), self.evidence.entries)
        return self._collector

    # --- settings at run time (cmd/set, cmd/get; agent.settings) ---

    def make_scorer(self, bundle: Bundle) -> Scorer:
        """A scorer for ``bundle`` with this box's threshold, when one was set for this very model."""
        return Scorer(bundle, threshold=self.settings.threshold_for(bundle.manifest_sha256))

    def change_settings(self, body: dict[str, Any]) -> tuple[bool, str | None, dict[str, Any]]:
        return self.settings.change(body)

    def settings_report(self) -> dict[str, Any]:
        return self.settings.report()

    def _reload(self, why: str, force: bool = False) -> tuple[bool, str]:
        """Load the bundle again; on any problem keep the current one. Returns (ok, message).

        Never raises: READY=1 follows every RELOADING=1, whatever happened, so systemd's reload job ends
        and the service goes on with the bundle it had."""
        self.notifier.reloading()
        status = "reload failed"
        try:
            ok, text = self._swap_bundle(why, force=force)
            if ok:
                release_free_memory()  # the old bundle is gone by now (its last reference died with the swap)
            status = self._status_line() if ok else f"reload refused: {text}"
            return ok, text
        except Exception as exc:  # a reload must never take the service down
            logger.exception("reload (%s) failed unexpectedly; keeping the bundle in use", why)
            text = f"reload failed, keeping the bundle in use: {type(exc).__name__}: {exc}"
            status = text
            self._reload_refused(text)
            return False, text
        finally:
            self.notifier.ready(status=status)

    def _swap_bundle(self, why: str, force: bool = False) -> tuple[bool, str]:
        assert self.scorer is not None
        old = self.scorer.bundle
        try:
            bundle = load_agent_bundle(self.cfg, current=old, force=force)
            scorer = self.make_scorer(bundle)
        except (BundleError, ImportError) as exc:
            text = f"bundle refused, keeping {old.name} ({old.manifest_sha256[:12]}): {exc}"
            logger.error("reload (%s): %s", why, text)
            self._reload_refused(str(exc))
            return False, text
        logger.info("reload (%s): model %s (%s) replaces %s (%s)", why, bundle.name, bundle.manifest_sha256[:12],
                    old.name, old.manifest_sha256[:12])
        self._event("reloaded", model=model_info(bundle))
        self._put_scorer(scorer)
        self.rollout.after_reload(old)
        return True, "reloaded"

    def _reload_refused(self, error: str) -> None:
        bundle = self.scorer.bundle if self.scorer else None
        model = model_info(bundle) if bundle else None
        try:
            self._event("reload_refused", error=error, model=model)
        except Exception:  # the event is a report; failing to send it must not fail the reload's answer
            logger.exception("cannot publish the reload_refused event")

    def _gradcam_after_frame(self, record: Recent, verdict: str) -> None:
        answered = self.handlers.after_frame(record)
        if not answered and verdict == "anomaly" and self.settings.effective().gradcam_policy == "every_anomaly":
            self._gradcam_jpeg(record)

    def _gradcam_jpeg(self, record: Recent) -> tuple[bytes | None, str]:
        """Compute and publish the overlay JPEG for a frame; (jpeg, "") or (None, why not)."""
        try:
            from agent import gradcam  # numpy/OpenCV only, but loaded only when asked for
        except ImportError as exc:
            return None, f"Grad-CAM is not available in this agent ({exc})"
        try:
            # Grad-CAM, and beside it the patch anomaly map where the bundle scores patches
            jpeg = gradcam.inspection_jpeg(record.bundle, record.embedding, record.nearest,
                                           quality=self.cfg.gradcam.jpeg_quality)
        except ValueError as exc:  # GradCamError: the bundle has no usable feature map / head
            logger.warning("Grad-CAM for frame %s failed: %s", record.frame_id, exc)
            return None, str(exc)
        except Exception as exc:  # a heat map is an extra: it must never stop inspection
            logger.exception("Grad-CAM for frame %s failed", record.frame_id)
            return None, f"Grad-CAM failed: {type(exc).__name__}: {exc}"
        self.link.publish(gradcam_message(self.topics, jpeg))  # the latest: Home Assistant's image entity
        self.link.publish(gradcam_message(self.topics, jpeg, record.frame_id))  # under the verdict's id
        return jpeg, ""

    # --- bundles installed over MQTT (cmd/install, cmd/rollback; agent.rollout) ---

    def install_chunk(self, pending: Pending) -> str | None:
        return self.rollout.install_chunk(pending)

    def rollback_bundle(self, pending: Pending) -> str | None:
        return self.rollout.rollback_bundle(pending)

    def _switch_scorer(self, scorer: Scorer) -> None:
        """Frame loop, between two frames: the one place an installed or rolled-back bundle goes in."""
        self._put_scorer(scorer)
        self.notifier.status(self._status_line())

    def _put_scorer(self, scorer: Scorer) -> None:
        """Frame loop: ``scorer`` judges from the next frame on (reload, install, rollback)."""
        assert self.scorer is not None
        old = self.scorer.bundle
        self.scorer = scorer
        self.recent.clear()  # cached embeddings belong to the old model
        self.settings.after_switch(old)
        discovery = self._discovery()
        if discovery is not None and self.cfg.mqtt.homeassistant.enabled:
            self.link.publish(discovery)

    # --- stop ---

    def _shutdown(self) -> None:
        logger.info("stopping")
        self.notifier.stopping()
        self.source.close()
        # Give the broker a moment to acknowledge what is in flight; the rest stays in the outbox.
        if self.link.connected.is_set():
            self.deliverer.wait_idle(2.0)
        self.deliverer.stop()
        self.link.stop()
        if self.metrics is not None:
            self.metrics.stop()
        self.outbox.close()
        logger.info("stopped (%d frames, %d undelivered verdicts kept)", self.counters.frames, self.outbox.depth())


# --- command line -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yugami-agent",
        description="The yugami inspection service: frames in, verdicts out over MQTT (see docs/AGENT.md).",
        epilog="Exit status: 0 clean stop or config OK; 78 bad config or bundle; 1 unexpected failure.",
    )
    parser.add_argument("--config", required=True, help="the agent's YAML config file")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config (and load the bundle), print a summary, and exit")
    parser.add_argument("--version", action="version", version=f"yugami-agent {__version__}")
    return parser


def setup_logging(level: str) -> None:
    # Under systemd the journal adds its own timestamps.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=getattr(logging, level.upper()), format=fmt, stream=sys.stderr, force=True)
    logging.getLogger("paho").setLevel(logging.WARNING)


def check_config(cfg: AgentConfig) -> int:
    try:
        bundle = load_agent_bundle(cfg)
    except (BundleError, ImportError) as exc:
        print(f"yugami-agent: {cfg.config_path}: bundle: {exc}", file=sys.stderr)
        return EX_CONFIG
    for warning in warnings_for(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    summary = {
        "config": cfg.config_path,
        "device_id": cfg.device_id,
        "model": model_info(bundle),
        "source": {"kind": cfg.source_kind, "mode": cfg.capture.mode},
        "broker": f"{cfg.mqtt.host}:{cfg.mqtt.port}" + (" (TLS)" if cfg.mqtt.tls.enabled else ""),
        "topics": Topics.from_config(cfg).base,
        "storage": str(cfg.storage_dir),
    }
    print("config OK: " + json.dumps(summary))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"yugami-agent: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.check_config:
        return check_config(cfg)
    setup_logging(cfg.service.log_level)
    for warning in warnings_for(cfg):
        logger.warning("%s", warning)
    try:
        return Agent(cfg).run()
    except Exception:
        logger.exception("the agent failed unexpectedly")
        return EXIT_FAILURE


if __name__ == "__main__":
    # Run the module under its own name, so log records say agent.service rather than __main__.
    from agent.service import main as _main

    sys.exit(_main())
