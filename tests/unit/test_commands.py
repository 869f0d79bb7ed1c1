"""agent.commands: one table, a bounded coalescing queue with counted drops, a time-budgeted runner."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest

from agent.commands import (
    COMMAND_QUEUE_MAX,
    COMMANDS,
    TABLE,
    Command,
    CommandError,
    CommandHandlers,
    CommandQueue,
    CommandRunner,
    ReplyLimiter,
    busy_error,
    parse_command_body,
)
from agent.mqtt import Topics, parse_command


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Record:
    frame_id: str


class Port:
    """The service side the handlers talk to, recording what they asked for."""

    def gradcam_topic_for(self, frame_id: str) -> str:
        return f"yugami/cam1/gradcam/{frame_id}"

    def __init__(self, clock: Clock | None = None, reload_s: float = 0.0) -> None:
        self.replies: list[tuple[str, Any, bool, str | None, dict[str, Any]]] = []
        self.gradcams = 0
        self.reloads = 0
        self.clock = clock
        self.reload_s = reload_s
        self.frames = {"f1": Record("f1")}

    def command_reply(self, name: str, request_id: Any, ok: bool, error: str | None, data: dict[str, Any]) -> None:
        self.replies.append((name, request_id, ok, error, data))

    def trigger_frame(self) -> tuple[dict[str, Any] | None, str | None, str | None]:
        return None, "capture.mode is 'continuous'", None

    def reload_bundle(self, why: str, force: bool = False) -> tuple[bool, str, dict[str, Any] | None]:
        self.reloads += 1
        if self.clock is not None:
            self.clock.now += self.reload_s
        return True, "reloaded", {"name": "m", "sha256": "s"}

    def gradcam_allowed(self) -> str | None:
        return None

    def recent_frame(self, frame_id: str) -> Record | None:
        return self.frames.get(frame_id)

    def recent_count(self) -> int:
        return len(self.frames)

    def gradcam_publish(self, record: Record) -> tuple[bytes | None, str]:
        self.gradcams += 1
        return b"\xff\xd8jpeg", ""


def setup(capacity: int = COMMAND_QUEUE_MAX, **port_kw: Any) -> tuple[CommandQueue, Port, CommandHandlers,
                                                                      CommandRunner, Clock]:
    clock = Clock()
    queue = CommandQueue(capacity)
    port = Port(clock, **port_kw)
    handlers = CommandHandlers(port, queue, clock)
    return queue, port, handlers, CommandRunner(queue, handlers, budget_s=0.05, clock=clock), clock


def drain_all(runner: CommandRunner) -> None:
    while runner.drain(lambda: None, lambda: False):
        pass


def test_one_table_feeds_parsing_and_running() -> None:
    assert tuple(TABLE) == COMMANDS and COMMANDS[:3] == ("trigger", "gradcam", "reload")
    assert {"set", "get"} <= set(COMMANDS)  # other commands are added by other features
    topics = Topics("yugami", "cam1")
    assert parse_command(topics, topics.cmd("reload"), b'{"id": 3}', 100) == Command("reload", {"id": 3})
    with pytest.raises(CommandError, match="unknown command 'x'; known: trigger, gradcam, reload"):
        parse_command_body("x", b"{}", 100)
    with pytest.raises(CommandError, match="'frame_id' must be a string") as info:
        parse_command_body("gradcam", b'{"id": "g", "frame_id": 1}', 100)
    assert info.value.request_id == "g"


def test_the_queue_is_bounded_and_drops_are_counted() -> None:
    queue = CommandQueue(capacity=3)
    outcomes = [queue.offer(Command("trigger", {"id": i})) for i in range(5)]
    assert outcomes == ["queued", "queued", "queued", "full", "full"]
    assert queue.stats() == {"queued": 3, "owed": 3, "accepted": 3, "coalesced": 0, "dropped": 2}
    assert "busy: command queue full (3 requests waiting, 2 refused so far)" in busy_error(queue)
    taken = queue.take()
    assert taken is not None and queue.owed == 3  # owed until answered
    queue.release(taken)
    queue.release(taken)  # answering twice frees the slot once
    assert queue.owed == 2 and queue.offer(Command("trigger", {"id": 9})) == "queued"


def test_a_flood_of_reloads_runs_once_and_answers_each_distinct_id() -> None:
    queue, port, _, runner, _ = setup()
    for _ in range(2000):
        queue.offer(Command("reload", {}))
    for rid in ("a", "b", "a"):
        queue.offer(Command("reload", {"id": rid}))
    assert len(queue) == 1 and queue.owed == 3  # None, "a", "b"
    drain_all(runner)
    assert port.reloads == 1
    assert [(r[0], r[1], r[2]) for r in port.replies] == [("reload", None, True), ("reload", "a", True),
                                                          ("reload", "b", True)]
    assert queue.owed == 0 and queue.stats()["coalesced"] == 2002


def test_distinct_ids_beyond_the_capacity_are_refused_not_queued() -> None:
    queue, port, _, runner, _ = setup(capacity=10)
    outcomes = [queue.offer(Command("reload", {"id": i})) for i in range(25)]
    assert outcomes.count("full") == 15 and queue.dropped == 15
    drain_all(runner)
    assert port.reloads == 1 and len(port.replies) == 10 and queue.owed == 0


def test_gradcam_for_the_same_frame_is_computed_once() -> None:
    queue, port, _, runner, _ = setup()
    for i in range(500):
        queue.offer(Command("gradcam", {"id": f"g{i % 3}", "frame_id": "f1"}))
    queue.offer(Command("gradcam", {"id": "other", "frame_id": "gone"}))
    drain_all(runner)
    assert port.gradcams == 1
    ok = [r for r in port.replies if r[2]]
    assert sorted(r[1] for r in ok) == ["g0", "g1", "g2"] and ok[0][4]["bytes"] == 6
    missing = [r for r in port.replies if not r[2]]
    assert len(missing) == 1 and "not among the last 1 frames" in (missing[0][3] or "")


def test_gradcam_for_the_next_frame_waits_coalesced_and_expires() -> None:
    queue, port, handlers, runner, clock = setup()
    for i in range(300):
        queue.offer(Command("gradcam", {}))  # a flood without ids: one request
        if i % 100 == 0:
            drain_all(runner)  # some run between arrivals: several waiting groups
    queue.offer(Command("gradcam", {"id": "late"}))
    drain_all(runner)
    assert not port.replies and queue.owed >= 2  # waiting for a frame, slots held
    assert handlers.after_frame(Record("f2")) is True
    assert port.gradcams == 1  # one overlay for every waiting request
    assert [r[1] for r in port.replies] == [None, "late"]  # one answer per distinct id
    assert all(r[4]["frame_id"] == "f2" for r in port.replies)
    assert queue.owed == 0 and handlers.after_frame(Record("f3")) is False
    queue.offer(Command("gradcam", {"id": "slow"}))
    drain_all(runner)
    clock.now += 2
    queue.offer(Command("gradcam", {"id": "slower"}))  # more than a second later: waits on its own
    drain_all(runner)
    assert len(handlers.next_frame) == 2
    clock.now += 59
    handlers.expire(clock.now)
    assert port.replies[-1][1] == "slow" and len(handlers.next_frame) == 1
    clock.now += 2
    handlers.expire(clock.now)
    assert port.replies[-1][1] == "slower" and "no frame was inspected within 60 s" in (port.replies[-1][3] or "")
    assert queue.owed == 0


def test_the_runner_keeps_to_its_budget_pings_and_stops() -> None:
    queue, port, _, runner, clock = setup(reload_s=0.06)  # a reload "takes" 60 ms of the fake clock
    for i in range(10):
        queue.offer(Command("trigger", {"id": i}))
        queue.offer(Command("reload", {"id": i}))  # all coalesced into the first reload
    assert len(queue) == 11
    pings: list[float] = []
    assert runner.drain(lambda: pings.append(clock.now), lambda: False) == 2  # trigger 0, then the reload
    assert len(pings) == 2 and len(queue) == 9 and port.reloads == 1
    assert runner.drain(lambda: None, lambda: True) == 0  # a stop is asked: nothing more runs
    assert runner.drain(lambda: None, lambda: False) == 9 and queue.owed == 0


def test_a_failing_handler_is_answered_and_frees_its_slot() -> None:
    queue, port, _, runner, _ = setup()

    def boom() -> tuple[None, str, None]:
        raise RuntimeError("camera on fire")

    port.trigger_frame = boom  # type: ignore[method-assign]
    queue.offer(Command("trigger", {"id": "t"}))
    drain_all(runner)
    assert port.replies == [("trigger", "t", False, "internal error: RuntimeError: camera on fire", {})]
    assert queue.owed == 0


def test_reply_limiter_allows_a_burst_then_a_rate() -> None:
    clock = Clock()
    limiter = ReplyLimiter(burst=3, per_s=2.0, clock=clock)
    assert [limiter.allow() for _ in range(5)] == [True, True, True, False, False]
    clock.now += 0.5
    assert limiter.allow() and not limiter.allow()
    assert limiter.suppressed == 3


def test_real_time_budget_with_the_default_clock() -> None:
    queue = CommandQueue()
    port = Port()
    runner = CommandRunner(queue, CommandHandlers(port, queue), budget_s=0.01)

    def slow_trigger() -> tuple[None, str, None]:
        time.sleep(0.004)
        return None, "no frame", None

    port.trigger_frame = slow_trigger  # type: ignore[method-assign]
    for i in range(50):
        queue.offer(Command("trigger", {"id": i}))
    ran = runner.drain(lambda: None, lambda: False)
    assert 1 <= ran < 50 and len(queue) == 50 - ran
