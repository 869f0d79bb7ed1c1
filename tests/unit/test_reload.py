"""Issue 13, item 1 (the service's part): a reload that fails in any way keeps the bundle in use, is answered
with the reason, is announced as ``reload_refused``, and READY=1 follows RELOADING=1 every time."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import agent.service as service
from agent.bundle import BundleError
from agent.config import parse_config
from agent.mqtt import Message


class FakeNotifier:
    watchdog_s = None

    def __init__(self) -> None:
        self.lines: list[str] = []

    def reloading(self) -> bool:
        self.lines.append("RELOADING=1")
        return True

    def ready(self, status: str = "") -> bool:
        self.lines.append("READY=1")
        return True


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def publish(self, msg: Message) -> int:
        self.sent.append(msg)
        return 1


def make_agent(tmp_path: Path) -> tuple[service.Agent, FakeNotifier, FakeLink]:
    (tmp_path / "in").mkdir(exist_ok=True)
    cfg = parse_config({"device_id": "cam1", "bundle": str(tmp_path), "capture": {"source": str(tmp_path / "in")},
                        "storage": {"dir": str(tmp_path / "state")}, "mqtt": {"host": "127.0.0.1"}},
                       check_files=False)
    notifier, link = FakeNotifier(), FakeLink()
    agent = service.Agent(cfg, notifier=notifier)  # type: ignore[arg-type]
    agent.link = link  # type: ignore[assignment]
    old = SimpleNamespace(name="old-model", manifest_sha256="ab" * 32, version="1", signer=None)
    agent.scorer = SimpleNamespace(bundle=old)  # type: ignore[assignment]
    return agent, notifier, link


def events(link: FakeLink) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in link.sent if m.topic.endswith("/event")]


@pytest.mark.parametrize("error", [BundleError("manifest.json: 'threshold.value' must be a finite number"),
                                   RuntimeError("something nobody foresaw")])
def test_a_failed_reload_keeps_the_bundle_and_sends_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          error: Exception) -> None:
    agent, notifier, link = make_agent(tmp_path)
    before = agent.scorer

    def refuse(cfg: Any, **_: Any) -> Any:
        raise error

    monkeypatch.setattr(service, "load_agent_bundle", refuse)
    ok, text, model = agent.reload_bundle("cmd/reload")
    assert ok is False and str(error) in text
    assert model == {"name": "old-model", "version": "1", "sha256": "ab" * 32, "signer": None}
    assert agent.scorer is before
    assert notifier.lines == ["RELOADING=1", "READY=1"]
    refused = [e for e in events(link) if e["event"] == "reload_refused"]
    assert len(refused) == 1 and str(error) in refused[0]["error"]


def test_an_exception_while_reporting_still_sends_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, notifier, link = make_agent(tmp_path)
    monkeypatch.setattr(service, "load_agent_bundle", lambda cfg, **_: (_ for _ in ()).throw(BundleError("bad")))

    def broken(msg: Message) -> int:
        raise ValueError("the link is broken")

    link.publish = broken  # type: ignore[method-assign]
    ok, text = agent._reload("SIGHUP")
    assert ok is False and "bad" in text
    assert notifier.lines == ["RELOADING=1", "READY=1"]


def test_a_non_finite_threshold_is_a_bundle_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, _, _ = make_agent(tmp_path)
    monkeypatch.setattr(service, "load_bundle", lambda path, num_threads=None: SimpleNamespace(threshold=float("nan")))
    with pytest.raises(BundleError, match=r"threshold\.value.*finite"):
        service.load_agent_bundle(agent.cfg)


def test_an_unexpected_loader_error_is_a_bundle_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, _, _ = make_agent(tmp_path)

    def boom(path: Any, num_threads: Any = None) -> Any:
        raise AttributeError("'list' object has no attribute 'get'")

    monkeypatch.setattr(service, "load_bundle", boom)
    with pytest.raises(BundleError, match=r"cannot be loaded \(AttributeError"):
        service.load_agent_bundle(agent.cfg)
