"""Reloads do not keep old bundles alive (bench/results/flood.md: the flood's RSS growth is a plateau of freed
heap glibc keeps, not a leak), and a reload hands the freed heap back to the system."""

from __future__ import annotations

import gc
import json
import platform
import threading
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import agent.service as service
from agent.bundle import Bundle
from agent.capture import Frame
from agent.commands import Command
from agent.config import parse_config
from agent.runtime import TFLiteModel
from tests.builders import plain_part_images
from tests.unit.test_reload import FakeLink, FakeNotifier

RELOADS = 30


def live(kind: type) -> int:
    gc.collect()
    return sum(isinstance(o, kind) for o in gc.get_objects())


def real_agent(bundle: Path, tmp_path: Path) -> service.Agent:
    """The service with a real bundle, storage and command path; only the network and the camera are fakes."""
    (tmp_path / "in").mkdir()
    cfg = parse_config({"device_id": "cam1", "bundle": str(bundle), "capture": {"source": str(tmp_path / "in")},
                        "storage": {"dir": str(tmp_path / "state")}, "mqtt": {"host": "127.0.0.1"}},
                       check_files=False)
    agent = service.Agent(cfg, notifier=FakeNotifier())  # type: ignore[arg-type]
    link = FakeLink()
    link.connected = threading.Event()  # type: ignore[attr-defined]
    agent.link = link  # type: ignore[assignment]
    agent._open_storage()
    agent.deliverer = SimpleNamespace(wake=lambda: None)  # type: ignore[assignment]
    agent.source = SimpleNamespace(done=lambda frame: None,  # type: ignore[assignment]
                                   status=SimpleNamespace(state="up", error=None))
    agent.scorer = service.Scorer(service.load_agent_bundle(cfg))
    return agent


def run_command(agent: service.Agent, name: str, body: dict[str, Any]) -> None:
    agent.commands.offer(Command(name, body))
    agent.runner.drain(keepalive=lambda: None, should_stop=lambda: False)


def test_old_bundles_die_with_their_reload(tiny_bundle: Path, tmp_path: Path) -> None:
    """Frames, Grad-CAM requests (next frame and by id) and 30 reloads: no old bundle or interpreter lives on,
    and each is freed by its reference count at once (no cycle waits for the collector), so the trim after a
    reload finds its memory free."""
    models_before = live(TFLiteModel)
    bundles_before = live(Bundle)
    agent = real_agent(tiny_bundle, tmp_path)
    images = plain_part_images(4, seed=3)
    old: list[weakref.ref[Bundle]] = []
    n = 0

    def frame() -> None:
        nonlocal n
        assert agent._process(Frame(images[n % len(images)], f"f{n}", "test")) is not None
        n += 1

    gc.disable()
    try:
        for k in range(RELOADS):
            frame()
            run_command(agent, "gradcam", {"id": f"next{k}"})  # held until the next frame
            frame()
            run_command(agent, "gradcam", {"id": f"named{k}", "frame_id": f"f{n - 1}"})
            old.append(weakref.ref(agent.scorer.bundle))  # type: ignore[union-attr]
            run_command(agent, "reload", {"id": k})
            assert old[-1]() is None, f"the bundle replaced by reload {k + 1} is still alive"
    finally:
        gc.enable()
    results = [m for m in agent.link.sent if m.topic.endswith("/result")]  # type: ignore[attr-defined]
    assert len(results) == 3 * RELOADS
    assert all(json.loads(m.payload)["ok"] for m in results), [m.payload for m in results][:3]
    assert live(TFLiteModel) - models_before == 1
    assert live(Bundle) - bundles_before == 1
    agent.outbox.close()


def test_a_reload_releases_free_memory_only_when_it_swapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.unit.test_reload import make_agent

    agent, _, _ = make_agent(tmp_path)
    agent.link.connected = threading.Event()  # type: ignore[attr-defined]
    agent.outbox = SimpleNamespace(degraded=False, depth=lambda: 0)  # type: ignore[assignment]
    agent.source = SimpleNamespace(status=SimpleNamespace(state="up"))  # type: ignore[assignment]
    trims: list[int] = []
    monkeypatch.setattr(service, "release_free_memory", lambda: trims.append(1) or True)
    monkeypatch.setattr(service.Agent, "_swap_bundle", lambda self, why, **_: (False, "refused"))
    assert agent.reload_bundle("cmd/reload")[0] is False
    assert trims == []
    monkeypatch.setattr(service.Agent, "_swap_bundle", lambda self, why, **_: (True, "reloaded"))
    assert agent.reload_bundle("cmd/reload")[0] is True
    assert trims == [1]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_release_free_memory_trims_on_glibc() -> None:
    assert service.release_free_memory() is True
    assert service.release_free_memory() is True  # looked up once, callable again
