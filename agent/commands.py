"""Commands from MQTT: one table of names and handlers, a bounded queue, a time-budgeted runner.

``TABLE`` is the only list of commands: the MQTT layer parses and refuses bodies with it (network
thread), the service runs its handlers (frame-loop thread). Between the two sits
:class:`CommandQueue`, which cannot starve the frame loop:

- it is bounded (``COMMAND_QUEUE_MAX`` replies owed at most); a command that does not fit is counted
  and answered ``busy``, through a :class:`ReplyLimiter` so a flood never becomes a reply flood;
- repeated requests that one run answers are coalesced: every ``reload`` waiting in the queue, and
  every ``gradcam`` for the same frame (or for the next frame), run once and answer each distinct
  request id;
- :meth:`CommandRunner.drain` runs commands for at most ``COMMAND_BUDGET_S`` per loop turn, pinging
  the watchdog and checking the stop flag between commands.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.install import MAX_INSTALL_COMMAND_BYTES, check_install_body  # standard library only, like this module

logger = logging.getLogger(__name__)

COMMAND_QUEUE_MAX = 256  # replies owed (queued or waiting for the next frame) at most
COMMAND_BUDGET_S = 0.05  # command time per loop turn, beyond the first command
GRADCAM_WAIT_S = 60.0  # a "next frame" Grad-CAM request fails if no frame comes within this
MERGE_WINDOW_S = 1.0  # "next frame" Grad-CAM requests this close together share one wait and one answer
ERROR_REPLY_BURST = 20  # refusals answered at once before the rate applies
ERROR_REPLY_PER_S = 5.0  # refusals answered per second in a flood (the rest are counted and logged)


@dataclass(frozen=True)
class Command:
    name: str
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def request_id(self) -> Any:
        rid = self.body.get("id")
        return rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None


class CommandError(ValueError):
    """A command that cannot be run; answered on ``cmd/<name>/result`` with ``ok: false``."""

    def __init__(self, name: str, message: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.name = name
        self.request_id = request_id


# --- the table --------------------------------------------------------------------------------------


def _no_check(body: dict[str, Any]) -> str | None:
    return None


def _check_gradcam(body: dict[str, Any]) -> str | None:
    fid = body.get("frame_id")
    if fid is not None and not isinstance(fid, str):
        return "'frame_id' must be a string (a verdict's id), or absent for the next frame"
    return None


def _check_set(body: dict[str, Any]) -> str | None:
    from agent.settings import SettingsError, parse_changes  # pure; imported here to keep this module's deps few

    try:
        parse_changes(body)
    except SettingsError as exc:
        return str(exc)
    return None


def _check_collect_list(body: dict[str, Any]) -> str | None:
    from agent.collect import check_list_body  # pure; imported here to keep this module's deps few

    return check_list_body(body)


def _check_fetch(body: dict[str, Any]) -> str | None:
    from agent.collect import check_fetch_body

    return check_fetch_body(body)


FEEDBACK_LABELS = ("good", "defect")
FEEDBACK_NOTE_CHARS = 1000
FEEDBACK_LIST_MAX = 1000


def _check_frame_id(body: dict[str, Any]) -> str | None:
    fid = body.get("frame_id")
    if not isinstance(fid, str) or not fid:
        return "'frame_id' must be a verdict's id (a non-empty string); 'id' is the request id echoed back"
    return None


def _check_feedback(body: dict[str, Any]) -> str | None:
    problem = _check_frame_id(body)
    if problem:
        return problem
    if body.get("label") not in FEEDBACK_LABELS:
        return f"'label' must be one of {', '.join(FEEDBACK_LABELS)} (good: a false alarm; defect: a real one)"
    note = body.get("note", "")
    if note is not None and (not isinstance(note, str) or len(note) > FEEDBACK_NOTE_CHARS):
        return f"'note' must be a string of at most {FEEDBACK_NOTE_CHARS} characters"
    return None


def _check_feedback_list(body: dict[str, Any]) -> str | None:
    limit = body.get("limit", 100)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= FEEDBACK_LIST_MAX:
        return f"'limit' must be an integer from 0 to {FEEDBACK_LIST_MAX} (the newest entries listed)"
    if body.get("label") is not None and body["label"] not in FEEDBACK_LABELS:
        return f"'label' must be one of {', '.join(FEEDBACK_LABELS)}, or absent for all"
    return None


def _check_install(body: dict[str, Any]) -> str | None:
    return check_install_body(body)


def _never(command: Command) -> Hashable | None:
    return None


def _rollback_key(command: Command) -> Hashable | None:
    return ("rollback",)  # rollbacks waiting together go back once (a second run would undo the first)


def _check_reload(body: dict[str, Any]) -> str | None:
    if "force" in body and not isinstance(body["force"], bool):
        return "'force' must be true or false (true allows going back to an older bundle version)"
    return None


def _reload_key(command: Command) -> Hashable | None:
    # one reload that starts after every waiting request answers all of them; a forced one runs apart, so
    # a plain request is never answered by a downgrade it did not ask for
    return ("reload", command.body.get("force") is True)


def _gradcam_key(command: Command) -> Hashable | None:
    return ("gradcam", command.body.get("frame_id"))


@dataclass(frozen=True)
class CommandSpec:
    name: str
    check: Callable[[dict[str, Any]], str | None]  # a problem with the body, or None
    coalesce: Callable[[Command], Hashable | None]  # requests with the same key share one run; None: never
    run: Callable[[CommandHandlers, Pending], None]
    max_bytes: int | None = None  # a larger body limit than mqtt.max_command_bytes (install: one bundle chunk)


def _run_trigger(h: CommandHandlers, p: Pending) -> None:
    h.trigger(p)


def _run_gradcam(h: CommandHandlers, p: Pending) -> None:
    h.gradcam(p)


def _run_reload(h: CommandHandlers, p: Pending) -> None:
    h.reload(p)


def _run_install(h: CommandHandlers, p: Pending) -> None:
    h.install(p)


def _run_rollback(h: CommandHandlers, p: Pending) -> None:
    h.rollback(p)


def _run_set(h: CommandHandlers, p: Pending) -> None:
    h.set(p)


def _run_get(h: CommandHandlers, p: Pending) -> None:
    h.get(p)


def _run_collect_list(h: CommandHandlers, p: Pending) -> None:
    h.collect_list(p)


def _run_fetch(h: CommandHandlers, p: Pending) -> None:
    h.fetch(p)


def _run_feedback(h: CommandHandlers, p: Pending) -> None:
    h.feedback(p)


def _run_feedback_list(h: CommandHandlers, p: Pending) -> None:
    h.feedback_list(p)


def _run_feedback_undo(h: CommandHandlers, p: Pending) -> None:
    h.feedback_undo(p)


INSTALL_MAX_BYTES = MAX_INSTALL_COMMAND_BYTES  # a chunk in base64 plus its envelope, as yugami-fleet push cuts it

TABLE: dict[str, CommandSpec] = {
    "trigger": CommandSpec("trigger", _no_check, _never, _run_trigger),
    "gradcam": CommandSpec("gradcam", _check_gradcam, _gradcam_key, _run_gradcam),
    "reload": CommandSpec("reload", _check_reload, _reload_key, _run_reload),
    "set": CommandSpec("set", _check_set, _never, _run_set),  # each runs, in order: the last one wins
    "get": CommandSpec("get", _no_check, _never, _run_get),
    # chunks of one bundle share a request id: never coalesced, each is one piece of the transfer
    "install": CommandSpec("install", _check_install, _never, _run_install, max_bytes=INSTALL_MAX_BYTES),
    "rollback": CommandSpec("rollback", _no_check, _rollback_key, _run_rollback),
    "collect_list": CommandSpec("collect_list", _check_collect_list, _never, _run_collect_list),
    "fetch": CommandSpec("fetch", _check_fetch, _never, _run_fetch),
    "feedback": CommandSpec("feedback", _check_feedback, _never, _run_feedback),  # in order: the last label wins
    "feedback_list": CommandSpec("feedback_list", _check_feedback_list, _never, _run_feedback_list),
    "feedback_undo": CommandSpec("feedback_undo", _check_frame_id, _never, _run_feedback_undo),
}
COMMANDS = tuple(TABLE)


def parse_command_body(name: str, payload: bytes, max_bytes: int) -> Command:
    """A command from its name and raw body; raise CommandError saying what is wrong."""
    spec = TABLE.get(name)
    limit = max(max_bytes, spec.max_bytes) if spec is not None and spec.max_bytes else max_bytes
    if len(payload) > limit:
        where = "mqtt.max_command_bytes" if limit == max_bytes else f"the largest {name} command"
        raise CommandError(name, f"command of {len(payload)} bytes is over the limit of {limit} ({where})")
    if spec is None:
        raise CommandError(name, f"unknown command {name!r}; known: {', '.join(COMMANDS)}")
    if not payload.strip():
        return Command(name, {})
    try:
        body = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandError(name, f"body is not valid JSON ({exc}); send a JSON object such as {{}}") from exc
    if not isinstance(body, dict):
        raise CommandError(name, f"body must be a JSON object, got {type(body).__name__}; send e.g. {{}}")
    rid = body.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise CommandError(name, "'id' must be a string or a number (it is echoed as request_id)")
    problem = spec.check(body)
    if problem:
        raise CommandError(name, problem, rid)
    return Command(name, body)


# --- rate limit for refusals ------------------------------------------------------------------------


class ReplyLimiter:
    """A token bucket: ``burst`` replies at once, then ``per_s``; suppressed ones are counted."""

    def __init__(self, burst: int = ERROR_REPLY_BURST, per_s: float = ERROR_REPLY_PER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.per_s = per_s
        self.clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()
        self.suppressed = 0

    def allow(self) -> bool:
        with self._lock:
            now = self.clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.per_s)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            if self.suppressed == 0 or self.suppressed % 1000 == 0:
                logger.warning("commands are flooding in: refusals are answered at most %g per second",
                               self.per_s)
            self.suppressed += 1
            return False


# --- the queue --------------------------------------------------------------------------------------


@dataclass
class Pending:
    """One command to run and every request it answers (coalesced requests share it)."""

    command: Command
    key: Hashable | None
    request_ids: list[Any]
    deadline: float = 0.0  # gradcam for the next frame: when to give up
    held: bool = False  # a handler keeps it to answer later (gradcam for the next frame)
    released: bool = False  # its slots were given back to the queue

    @property
    def name(self) -> str:
        return self.command.name


class CommandQueue:
    """Thread-safe, bounded, coalescing; written by the network thread, drained by the frame loop.

    Capacity is counted in replies owed: each distinct request id of a queued command, and of one a
    handler holds, takes a slot until it is answered."""

    def __init__(self, capacity: int = COMMAND_QUEUE_MAX) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._queue: deque[Pending] = deque()
        self._by_key: dict[Hashable, Pending] = {}
        self._owed = 0
        self.accepted = 0
        self.coalesced = 0
        self.dropped = 0

    def offer(self, command: Command) -> str:
        """'queued', 'coalesced' or 'full' (counted as dropped)."""
        key = TABLE[command.name].coalesce(command) if command.name in TABLE else None
        rid = command.request_id
        with self._lock:
            pending = self._by_key.get(key) if key is not None else None
            if pending is not None and rid in pending.request_ids:
                self.coalesced += 1
                return "coalesced"
            if self._owed >= self.capacity:
                self.dropped += 1
                return "full"
            self._owed += 1
            self.accepted += 1
            if pending is not None:
                pending.request_ids.append(rid)
                self.coalesced += 1
                return "coalesced"
            pending = Pending(command, key, [rid])
            self._queue.append(pending)
            if key is not None:
                self._by_key[key] = pending
            return "queued"

    def take(self) -> Pending | None:
        """The oldest command; its slots stay owed until :meth:`release`."""
        with self._lock:
            if not self._queue:
                return None
            pending = self._queue.popleft()
            if pending.key is not None and self._by_key.get(pending.key) is pending:
                del self._by_key[pending.key]
            return pending

    def release(self, pending: Pending) -> None:
        """Its requests are answered: free their slots (once, however often it is called)."""
        with self._lock:
            if pending.released:
                return
            pending.released = True
            self._owed = max(0, self._owed - len(pending.request_ids))

    def merge(self, src: Pending, dst: Pending) -> None:
        """Fold ``src``'s requests into ``dst`` (both taken): one answer per distinct id, slots freed."""
        with self._lock:
            fresh = [rid for rid in src.request_ids if rid not in dst.request_ids]
            dst.request_ids.extend(fresh)
            if not src.released:
                src.released = True
                self._owed = max(0, self._owed - (len(src.request_ids) - len(fresh)))
                self.coalesced += len(src.request_ids) - len(fresh)

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def owed(self) -> int:
        with self._lock:
            return self._owed

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"queued": len(self._queue), "owed": self._owed, "accepted": self.accepted,
                    "coalesced": self.coalesced, "dropped": self.dropped}


def busy_error(queue: CommandQueue) -> str:
    return (f"busy: command queue full ({queue.capacity} requests waiting, {queue.dropped} refused so far); "
            "the command was not run, send it again later")


# --- the handlers -----------------------------------------------------------------------------------


class AgentPort(Protocol):
    """What the command handlers need of the service (agent.service.Agent provides it)."""

    def command_reply(self, name: str, request_id: Any, ok: bool, error: str | None, data: dict[str, Any]) -> None:
        ...

    def trigger_frame(self) -> tuple[dict[str, Any] | None, str | None, str | None]:
        """(verdict payload, None, frame id) for a taken frame, or (None, why not, frame id or None)."""
        ...

    def reload_bundle(self, why: str, force: bool = False) -> tuple[bool, str, dict[str, Any] | None]:
        """(ok, message, model) after loading the bundle again; ``force`` allows an older version."""
        ...

    def gradcam_allowed(self) -> str | None:
        """Why Grad-CAM is refused, or None."""
        ...

    def recent_frame(self, frame_id: str) -> Any | None: ...

    def recent_count(self) -> int: ...

    def gradcam_publish(self, record: Any) -> tuple[bytes | None, str]:
        """Compute and publish the overlay for a frame: (jpeg, "") or (None, why not)."""
        ...

    def gradcam_topic_for(self, frame_id: str) -> str:
        """The topic a frame's heat map goes to (besides the plain one Home Assistant reads)."""
        ...

    def feedback(self, frame_id: str, label: str, note: str) -> tuple[bool, str | None, dict[str, Any]]:
        """cmd/feedback: (ok, error or None, data: the label kept, the extension's change)."""
        ...

    def feedback_list(self, limit: int, label: str | None) -> dict[str, Any]:
        """cmd/feedback_list: the newest labelled frames, counts and the extension's state."""
        ...

    def feedback_undo(self, frame_id: str) -> tuple[bool, str | None, dict[str, Any]]:
        """cmd/feedback_undo: (ok, error or None, data)."""
        ...

    def collect_list(self, body: dict[str, Any]) -> dict[str, Any]:
        """cmd/collect_list: {items, more[, next]}; raises ValueError (agent.collect.CollectError) saying why not."""
        ...

    def fetch_chunk(self, body: dict[str, Any]) -> dict[str, Any]:
        """cmd/fetch: one chunk of a listed frame's file; raises ValueError saying why not."""
        ...

    def change_settings(self, body: dict[str, Any]) -> tuple[bool, str | None, dict[str, Any]]:
        """cmd/set: (ok, error or None, data carrying the effective settings)."""
        ...

    def settings_report(self) -> dict[str, Any]:
        """cmd/get: the effective settings and their sources."""
        ...

    def install_chunk(self, pending: Pending) -> str | None:
        """cmd/install: take one chunk. None when taken: the service either lets the request go unanswered (not
        the last chunk) or holds it (``pending.held``) and answers it with :meth:`CommandHandlers.reply` when
        the install is over. A string: why the chunk is refused (answered at once)."""
        ...

    def rollback_bundle(self, pending: Pending) -> str | None:
        """cmd/rollback: back to the previous bundle. None: answered now or held and answered later (as
        install_chunk); a string: why not."""
        ...


class CommandHandlers:
    """trigger, gradcam, reload, set and get, run on the frame-loop thread."""

    def __init__(self, port: AgentPort, queue: CommandQueue, clock: Callable[[], float] = time.monotonic) -> None:
        self.port = port
        self.queue = queue
        self.clock = clock
        self.next_frame: list[Pending] = []  # gradcam requests waiting for the next inspected frame

    def reply(self, pending: Pending, ok: bool, error: str | None = None, **data: Any) -> None:
        """Answer every request the command stands for, then free their slots."""
        for rid in pending.request_ids:
            self.port.command_reply(pending.name, rid, ok, error, data)
        pending.held = False
        self.queue.release(pending)

    def trigger(self, pending: Pending) -> None:
        payload, why, frame_id = self.port.trigger_frame()
        if payload is None:
            extra = {"frame_id": frame_id} if frame_id else {}
            self.reply(pending, ok=False, error=why, **extra)
            return
        self.reply(pending, ok=True, frame_id=payload["id"], verdict=payload["verdict"], score=payload["score"],
                   confidence=payload["confidence"])

    def reload(self, pending: Pending) -> None:
        ok, text, model = self.port.reload_bundle("cmd/reload", force=pending.command.body.get("force") is True)
        if ok:
            self.reply(pending, ok=True, model=model)
        else:
            self.reply(pending, ok=False, error=text, model=model)

    def set(self, pending: Pending) -> None:
        ok, error, data = self.port.change_settings(pending.command.body)
        self.reply(pending, ok=ok, error=error, **data)

    def get(self, pending: Pending) -> None:
        self.reply(pending, ok=True, **self.port.settings_report())

    def install(self, pending: Pending) -> None:
        # Chunks before the last take no reply slot once run: only a refusal, or the final result, is answered.
        error = self.port.install_chunk(pending)
        if error is not None:
            self.reply(pending, ok=False, error=error)

    def rollback(self, pending: Pending) -> None:
        error = self.port.rollback_bundle(pending)
        if error is not None:
            self.reply(pending, ok=False, error=error)

    def collect_list(self, pending: Pending) -> None:
        try:
            data = self.port.collect_list(pending.command.body)
        except ValueError as exc:
            self.reply(pending, ok=False, error=str(exc))
            return
        self.reply(pending, ok=True, **data)

    def fetch(self, pending: Pending) -> None:
        body = pending.command.body
        try:
            data = self.port.fetch_chunk(body)
        except ValueError as exc:
            self.reply(pending, ok=False, error=str(exc), frame_id=body.get("frame_id"), file=body.get("file"))
            return
        self.reply(pending, ok=True, **data)

    def feedback(self, pending: Pending) -> None:
        body = pending.command.body
        ok, error, data = self.port.feedback(body["frame_id"], body["label"], body.get("note") or "")
        self.reply(pending, ok=ok, error=error, **data)

    def feedback_list(self, pending: Pending) -> None:
        body = pending.command.body
        self.reply(pending, ok=True, **self.port.feedback_list(body.get("limit", 100), body.get("label")))

    def feedback_undo(self, pending: Pending) -> None:
        ok, error, data = self.port.feedback_undo(pending.command.body["frame_id"])
        self.reply(pending, ok=ok, error=error, **data)

    def gradcam(self, pending: Pending) -> None:
        refused = self.port.gradcam_allowed()
        if refused:
            self.reply(pending, ok=False, error=refused)
            return
        frame_id = pending.command.body.get("frame_id")
        if frame_id is None:
            self._wait_for_next_frame(pending)
            return
        record = self.port.recent_frame(frame_id)
        if record is None:
            self.reply(pending, ok=False, frame_id=frame_id,
                       error=f"frame {frame_id!r} is not among the last {self.port.recent_count()} frames kept "
                             "(gradcam.keep_frames); ask sooner, or send {} for the next frame")
            return
        self._answer_gradcam([pending], record)

    def _wait_for_next_frame(self, pending: Pending) -> None:
        """Hold the request until a frame comes; requests less than a second apart wait as one."""
        deadline = self.clock() + GRADCAM_WAIT_S
        newest = self.next_frame[-1] if self.next_frame else None
        if newest is not None and deadline - newest.deadline < MERGE_WINDOW_S:
            self.queue.merge(pending, newest)
            return
        pending.held = True
        pending.deadline = deadline
        self.next_frame.append(pending)

    def _answer_gradcam(self, waiting: list[Pending], record: Any) -> None:
        jpeg, error = self.port.gradcam_publish(record)  # once, however many asked
        for pending in waiting:
            if jpeg is None:
                self.reply(pending, ok=False, frame_id=record.frame_id, error=error)
            else:
                self.reply(pending, ok=True, frame_id=record.frame_id,
                           topic=self.port.gradcam_topic_for(record.frame_id), bytes=len(jpeg))

    def after_frame(self, record: Any) -> bool:
        """Answer the requests waiting for the next frame with this one; True if there were any."""
        waiting, self.next_frame = self.next_frame, []
        if waiting:
            self._answer_gradcam(waiting, record)
        return bool(waiting)

    def expire(self, now: float) -> None:
        if not self.next_frame:
            return
        keep = []
        for pending in self.next_frame:
            if now < pending.deadline:
                keep.append(pending)
            else:
                self.reply(pending, ok=False, error=f"no frame was inspected within {GRADCAM_WAIT_S:g} s")
        self.next_frame = keep


class CommandRunner:
    """Runs queued commands for a bounded time per loop turn."""

    def __init__(self, queue: CommandQueue, handlers: CommandHandlers, budget_s: float = COMMAND_BUDGET_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.queue = queue
        self.handlers = handlers
        self.budget_s = budget_s
        self.clock = clock

    def drain(self, keepalive: Callable[[], None], should_stop: Callable[[], bool]) -> int:
        """Run commands until the queue is empty, the budget is spent or a stop is asked; the count run.

        At least one command runs per call (when there is one and no stop), so a slow command cannot
        block the others for ever; ``keepalive`` (the watchdog ping) runs after each."""
        deadline = self.clock() + self.budget_s
        ran = 0
        while not should_stop():
            pending = self.queue.take()
            if pending is None:
                break
            self._run(pending)
            ran += 1
            keepalive()
            if self.clock() >= deadline:
                break
        return ran

    def _run(self, pending: Pending) -> None:
        try:
            TABLE[pending.name].run(self.handlers, pending)
        except Exception as exc:  # a command must never take the service down
            logger.exception("command %s failed", pending.name)
            self.handlers.reply(pending, ok=False, error=f"internal error: {type(exc).__name__}: {exc}")
            return
        if not pending.held:
            self.queue.release(pending)  # normally answered and released already; never leak its slots
