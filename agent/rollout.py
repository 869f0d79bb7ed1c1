"""Bundles installed over MQTT (cmd/install, cmd/rollback): the orchestration around agent.install.

Chunks are taken on the frame-loop thread (a few ms each); the last one starts a worker thread that joins,
checks, stages, loads and shadow-scores the bundle with its own interpreter. The worker never touches the
scorer in use: it hands a ready Scorer back through a queue, and :meth:`Rollout.tick` (frame loop) has the
service switch it in between two frames, so verdicts keep flowing and none is lost. The first
``fleet.watch_frames`` verdicts after a switch decide whether the new bundle stays (:meth:`Rollout.watch_frame`);
``installed.json`` lets an installed bundle survive a restart (:meth:`Rollout.start_bundle`).

agent.install holds the pure parts; what this needs of the service comes as :class:`RolloutHooks`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.bundle import BundleError, model_info
from agent.install import (
    BUNDLES_DIR,
    INCOMING,
    INSTALLED_FILE,
    Installed,
    InstallError,
    JobOutcome,
    Reassembler,
    Shadow,
    Transfer,
    Watch,
    gate_problem,
    prune,
    read_installed,
    remove_tree,
    shadow_score,
    stage,
    write_installed,
)

if TYPE_CHECKING:
    from agent.bundle import Bundle
    from agent.commands import Pending
    from agent.config import AgentConfig
    from agent.scoring import Scorer
    from agent.service import KeptFrame

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutHooks:
    """What the rollout needs of the service (agent.service.Agent makes it). Each is called on the frame-loop
    thread, except those marked "worker too" (the install worker thread calls them as well)."""

    scorer: Callable[[], Scorer | None]  # the scorer in use (worker too: it is replaced whole, never changed)
    switch: Callable[[Scorer], None]  # put a scorer in, between two frames (settings, Grad-CAM cache, discovery)
    make_scorer: Callable[[Bundle], Scorer]  # a scorer with this box's settings (worker too)
    load_bundle: Callable[..., Bundle]  # load_agent_bundle(cfg, path=, current=, force=) (worker too)
    kept_frames: Callable[[], Sequence[KeptFrame]]  # the last inspected frames, to shadow-score
    event: Callable[..., None]  # publish an event: event(name, **detail) (worker too)
    kept_event: Callable[..., None]  # an event the MQTT client keeps until the broker is up (at start)
    reply: Callable[..., None]  # answer a held command: reply(pending, ok=, error=, **data)
    command_reply: Callable[[str, Any, bool, str | None, dict[str, Any]], None]  # answer a request id, no slot held
    wake: Callable[[], None]  # the frame loop has an outcome to apply (worker)
    release_free_memory: Callable[[], bool]  # after the previous bundle is let go


class Rollout:
    """Install, rollback and watch; lives in the service, driven from its frame loop."""

    def __init__(self, cfg: AgentConfig, hooks: RolloutHooks) -> None:
        self.cfg = cfg
        self.hooks = hooks
        self.bundles = cfg.storage_dir / BUNDLES_DIR
        self.reassembler = Reassembler(self.bundles / INCOMING, cfg.fleet.max_bundle_bytes)
        self.job_kind: str | None = None  # "install" or "rollback" while a worker runs
        self._job_results: queue.SimpleQueue[JobOutcome] = queue.SimpleQueue()
        self.installed: Installed | None = None  # installed.json: the bundle in use and the previous one
        self.watch: Watch | None = None  # the first frames after an install
        self._watch_from: Scorer | None = None  # the previous bundle, kept at hand while watching
        self._start_events: list[tuple[str, dict[str, Any]]] = []

    def _model(self) -> dict[str, Any]:
        scorer = self.hooks.scorer()
        return model_info(scorer.bundle if scorer else None)

    # --- start ---

    def start_bundle(self) -> Bundle:
        """The bundle to start with: the installed one (installed.json) when it still loads and the config's
        bundle is the one it was installed over, else cfg.bundle (with an install_fallback event). Raises
        BundleError / ImportError when cfg.bundle does not load either (exit 78)."""
        cfg = self.cfg
        state, problem = read_installed(self.bundles)
        why = problem
        if state is not None and state.config_bundle not in (None, cfg.bundle):
            why = (f"the config's bundle changed since the install (was {state.config_bundle}, now {cfg.bundle}): "
                   "the config wins")
        elif state is not None:
            try:
                bundle = self.hooks.load_bundle(path=state.current)
            except (BundleError, ImportError) as exc:
                why = f"the installed bundle {state.current} no longer loads: {exc}"
            else:
                self.installed = state
                logger.info("installed bundle %s in use (installed.json); previous: %s", state.current, state.previous)
                return bundle
        bundle = self.hooks.load_bundle()
        if why:
            logger.error("%s; starting with bundle %s", why, cfg.bundle)
            self._start_events.append(("install_fallback", {
                "error": why, "bundle": cfg.bundle, "installed": str(state.current) if state else None}))
            if state is not None:  # the installed one stays reachable with cmd/rollback
                self._save_installed(Installed(Path(cfg.bundle), state.current, cfg.bundle))
        return bundle

    def send_start_events(self) -> None:
        """Once the MQTT client exists: what start_bundle found, and leftovers of transfers cut by a restart."""
        for name, detail in self._start_events:
            self.hooks.kept_event(name, **detail)
        self._start_events.clear()
        with contextlib.suppress(OSError):
            self.reassembler.clear_leftovers()

    def _save_installed(self, state: Installed) -> str | None:
        """Write installed.json; None, or why it could not be written (the switch stands, a restart would not
        find it)."""
        try:
            write_installed(self.bundles, state)
        except OSError as exc:
            logger.error("cannot write %s/%s (%s); a restart goes back to the config's bundle", self.bundles,
                         INSTALLED_FILE, exc)
            return f"{INSTALLED_FILE} not written ({exc}); a restart would go back to {self.cfg.bundle}"
        self.installed = state
        return None

    def stats(self) -> dict[str, Any]:
        """The stats' "groups" and "install" entries (read from the stats and metrics threads)."""
        t = self.reassembler.current  # read once each: the loop may replace them meanwhile
        state = self.installed
        w = self.watch
        return {"groups": list(self.cfg.fleet.groups), "install": {
            "transfer": t.describe() if t else None,
            "job": self.job_kind,
            "watch": {"frames": w.frames, "seen": w.seen, "anomalies": w.anomalies} if w else None,
            "previous": str(state.previous) if state and state.previous else None,
        }}

    # --- commands (frame loop) ---

    def _refusal(self) -> str | None:
        """Why this box takes no install at all (its config), or None."""
        f = self.cfg.fleet
        if f.install == "off":
            return ("fleet.install is 'off' on this box: bundles are not installed over MQTT; set fleet.install: "
                    "signed (or any) in its config")
        if f.install == "signed" and not self.cfg.bundle_trust.public_keys:
            return ("fleet.install is 'signed' but bundle_trust.public_keys is empty, so no signature can be checked; "
                    "add the signing key's .pub to bundle_trust.public_keys (or set fleet.install: any)")
        return None

    def install_chunk(self, pending: Pending) -> str | None:
        """cmd/install: see agent.commands.AgentPort.install_chunk."""
        body = pending.command.body
        if self.reassembler.is_over(body["transfer"]):
            return None  # a late chunk of a transfer that is over: its answer was given
        refusal = self._refusal()
        if refusal:
            self.reassembler.refuse(body["transfer"])  # one answer per transfer, not one per chunk
            self._install_refused(refusal, transfer=body["transfer"])
            return refusal
        try:
            res = self.reassembler.add(body, pending.command.request_id)
        except InstallError as exc:
            self._install_refused(str(exc), transfer=body.get("transfer"))
            return str(exc)
        except OSError as exc:
            current = self.reassembler.current
            if current is not None:
                self.reassembler.drop(current)
            text = (f"cannot store the chunk under {self.bundles} ({type(exc).__name__}: {exc}); free disk space in "
                    "storage.dir and push again")
            self._install_refused(text, transfer=body.get("transfer"))
            return text
        if res.replaced is not None:
            self._transfer_failed(res.replaced, f"replaced by transfer {body['transfer']} before it was complete")
        t = res.transfer
        if t is None:
            return None  # a late chunk of a transfer that is over: its answer was given
        if not t.announced:
            t.announced = True
            self.hooks.event("install_started", transfer=t.transfer, chunks=t.chunks, bytes=t.total, sha256=t.sha256,
                             force=t.force, shadow=t.shadow, model=self._model())
        if res.status != "complete":
            return None
        if self.job_kind is not None:
            remove_tree(t.folder)
            text = f"busy: an {self.job_kind} is running on this box; push again once it has answered"
            self._install_refused(text, transfer=t.transfer)
            return text
        scorer = self.hooks.scorer()
        assert scorer is not None
        shadow_frames = self.cfg.fleet.shadow_frames
        frames = list(self.hooks.kept_frames())[-shadow_frames:] if shadow_frames else []
        pending.held = True
        self._start_job("install", pending, self._install_job, t, scorer.bundle, frames if t.shadow else [])
        return None

    def rollback_bundle(self, pending: Pending) -> str | None:
        """cmd/rollback: see agent.commands.AgentPort.rollback_bundle."""
        if self.job_kind is not None:
            return f"busy: an {self.job_kind} is running on this box; send cmd/rollback again once it has answered"
        if self._watch_from is not None:  # still watching a new bundle: the old one is at hand, switch now
            self._roll_back(self._watch_from, "cmd/rollback", pending)
            return None
        state = self.installed
        if state is None or state.previous is None:
            return "no previous bundle to go back to: nothing was installed on this box (cmd/install)"
        if not state.previous.is_dir():
            return f"the previous bundle {state.previous} is gone from the disk; install the bundle wanted instead"
        pending.held = True
        self._start_job("rollback", pending, self._rollback_job, state.previous)
        return None

    # --- the worker thread ---

    def _start_job(self, kind: str, pending: Pending, target: Any, *args: Any) -> None:
        self.job_kind = kind
        worker = threading.Thread(target=self._run_job, args=(kind, pending, target, args), name=f"yugami-{kind}",
                                  daemon=True)
        worker.start()

    def _run_job(self, kind: str, pending: Pending, target: Any, args: tuple[Any, ...]) -> None:
        """Worker thread: whatever happens, one outcome goes back to the frame loop."""
        try:
            outcome = target(*args)
        except Exception as exc:  # an install must never take the service down
            logger.exception("%s failed unexpectedly", kind)
            outcome = JobOutcome(kind, ok=False, error=f"{kind} failed: {type(exc).__name__}: {exc}")
        outcome.pending = pending
        self._job_results.put(outcome)
        self.hooks.wake()

    def _install_job(self, t: Transfer, current: Bundle, frames: list[KeptFrame]) -> JobOutcome:
        """Worker thread: join, check, stage, load, verify, shadow-score, gate."""
        fleet = self.cfg.fleet
        times: dict[str, float] = {"receive_s": round(time.monotonic() - t.started, 3)}
        t0 = time.monotonic()
        staged: Path | None = None
        shadow: Shadow | None = None
        try:
            staged = stage(t, self.bundles, fleet.max_bundle_bytes)
            times["stage_s"] = round(time.monotonic() - t0, 3)
            t1 = time.monotonic()
            bundle = self.hooks.load_bundle(path=staged, current=current, force=t.force)
            if fleet.install == "signed" and bundle.signer is None:
                raise InstallError(f"bundle {bundle.name} {bundle.version} carries no verified signature and "
                                   "fleet.install is 'signed'; sign it with yugami-keys sign BUNDLE --key KEY")
            if bundle.manifest_sha256 == current.manifest_sha256:  # pushed to a box that runs it: nothing to do
                if not self._protected(staged):
                    remove_tree(staged)
                return JobOutcome("install", ok=True, transfer=t, times=times)
            scorer = self.hooks.make_scorer(bundle)
            times["verify_s"] = round(time.monotonic() - t1, 3)
            self.hooks.event("install_verified", transfer=t.transfer, model=model_info(bundle), folder=staged.name)
            t2 = time.monotonic()
            shadow = shadow_score(lambda image: scorer.score(image)[0].verdict, frames)
            times["shadow_s"] = round(time.monotonic() - t2, 3)
            self.hooks.event("install_shadow", transfer=t.transfer, model=model_info(bundle),
                             shadow=shadow.as_dict(), max_anomaly_share=fleet.max_anomaly_share)
            problem = gate_problem(shadow, fleet.max_anomaly_share)
            if problem:
                raise InstallError(problem)
        except (InstallError, BundleError, ImportError, OSError) as exc:
            if staged is not None and not self._protected(staged):
                remove_tree(staged)
            return JobOutcome("install", ok=False, error=str(exc), transfer=t, shadow=shadow, times=times)
        times["total_s"] = round(time.monotonic() - t.started, 3)
        return JobOutcome("install", ok=True, scorer=scorer, path=staged, transfer=t, shadow=shadow, times=times)

    def _rollback_job(self, previous: Path) -> JobOutcome:
        """Worker thread: load the previous bundle (an older version by nature: forced; trust still applies)."""
        try:
            bundle = self.hooks.load_bundle(path=previous, force=True)
            scorer = self.hooks.make_scorer(bundle)
        except (BundleError, ImportError) as exc:
            return JobOutcome("rollback", ok=False, error=f"the previous bundle {previous} does not load: {exc}")
        return JobOutcome("rollback", ok=True, scorer=scorer, path=previous)

    def _protected(self, path: Path) -> bool:
        scorer = self.hooks.scorer()
        keep = {scorer.bundle.path if scorer else None}
        if self.installed is not None:
            keep |= {self.installed.current, self.installed.previous}
        return any(p is not None and Path(p).resolve() == path.resolve() for p in keep)

    # --- back on the frame loop ---

    def tick(self) -> None:
        """Each loop turn: apply a finished job, drop a stalled transfer."""
        while True:
            try:
                outcome = self._job_results.get_nowait()
            except queue.Empty:
                break
            self.job_kind = None
            if outcome.kind == "install":
                self._install_done(outcome)
            elif outcome.ok:
                assert outcome.scorer is not None
                self._roll_back(outcome.scorer, "cmd/rollback", outcome.pending)
            else:
                self.hooks.event("rollback_refused", error=outcome.error, model=self._model())
                self._answer(outcome.pending, ok=False, error=outcome.error)
        stalled = self.reassembler.expire()
        if stalled is not None:
            self._transfer_failed(stalled, f"transfer stalled: {len(stalled.received)} of {stalled.chunks} chunks "
                                           f"came, none for {self.reassembler.stall_s:g} s; push again")

    def _answer(self, pending: Pending | None, ok: bool, error: str | None = None, **data: Any) -> None:
        if pending is not None:
            self.hooks.reply(pending, ok=ok, error=error, **data)

    def _transfer_failed(self, t: Transfer, error: str) -> None:
        """A transfer that ended without its last chunk: its sender hears why (no reply slot was held)."""
        self._install_refused(error, transfer=t.transfer)
        self.hooks.command_reply("install", t.request_id, False, error, {"transfer": t.transfer})

    def _install_refused(self, error: str, transfer: Any = None, shadow: Shadow | None = None) -> None:
        logger.error("install refused: %s", error)
        self.hooks.event("install_refused", transfer=transfer, error=error,
                         shadow=shadow.as_dict() if shadow else None, model=self._model())

    def _install_done(self, outcome: JobOutcome) -> None:
        """Frame loop: switch to an installed bundle (or report why not) and answer the last chunk."""
        old_scorer = self.hooks.scorer()
        assert old_scorer is not None
        t = outcome.transfer
        shadow = outcome.shadow.as_dict() if outcome.shadow else None
        tid = t.transfer if t else None
        if not outcome.ok:
            self._install_refused(outcome.error or "refused", transfer=tid, shadow=outcome.shadow)
            self._answer(outcome.pending, ok=False, error=outcome.error, transfer=tid,
                         model=model_info(old_scorer.bundle), shadow=shadow, times=outcome.times)
            return
        if outcome.scorer is None:  # the very bundle in use
            self.hooks.event("installed", transfer=tid, model=model_info(old_scorer.bundle), unchanged=True)
            self._answer(outcome.pending, ok=True, model=model_info(old_scorer.bundle), unchanged=True,
                         transfer=tid, times=outcome.times)
            return
        assert outcome.path is not None
        old = old_scorer.bundle
        self.hooks.switch(outcome.scorer)
        new = outcome.scorer.bundle
        problem = self._save_installed(Installed(outcome.path, old.path, self.cfg.bundle))
        watch = self.cfg.fleet.watch_frames
        self._end_watch()
        if watch:
            self.watch, self._watch_from = Watch(watch, self.cfg.fleet.max_anomaly_share), old_scorer
        removed = prune(self.bundles, self.cfg.fleet.keep_bundles, [outcome.path, old.path])
        for path in removed:
            logger.info("removed the old installed bundle %s (fleet.keep_bundles)", path)
        del old_scorer
        if not watch:
            self.hooks.release_free_memory()
        logger.info("installed %s %s (%s), replacing %s %s", new.name, new.version, new.manifest_sha256[:12], old.name,
                    old.version)
        detail = {"transfer": tid, "model": model_info(new), "previous": model_info(old), "shadow": shadow,
                  "watch_frames": watch, "times": outcome.times}
        if problem:
            detail["warning"] = problem
        self.hooks.event("installed", **detail)
        self._answer(outcome.pending, ok=True, **detail)

    def _roll_back(self, scorer: Scorer, reason: str, pending: Pending | None) -> None:
        """Frame loop: back to ``scorer``'s bundle (the previous one); it becomes current, the one left previous."""
        current = self.hooks.scorer()
        assert current is not None
        old = current.bundle
        del current
        self._end_watch()
        self.hooks.switch(scorer)
        new = scorer.bundle
        problem = self._save_installed(Installed(new.path, old.path, self.cfg.bundle))
        self.hooks.release_free_memory()
        logger.warning("rolled back from %s %s to %s %s: %s", old.name, old.version, new.name, new.version, reason)
        detail = {"reason": reason, "model": model_info(new), "from": model_info(old)}
        if problem:
            detail["warning"] = problem
        self.hooks.event("rolled_back", **detail)
        self._answer(pending, ok=True, **detail)

    def after_reload(self, old: Bundle) -> None:
        """cmd/reload or SIGHUP loaded cfg.bundle over an installed one: that is the operator's choice, so it
        becomes current (the one left stays for cmd/rollback) and a watch in progress ends."""
        self._end_watch()
        scorer = self.hooks.scorer()
        if self.installed is not None and scorer is not None:
            self._save_installed(Installed(scorer.bundle.path, old.path, self.cfg.bundle))

    def _end_watch(self) -> None:
        self.watch = None
        self._watch_from = None

    def watch_frame(self, anomaly: bool) -> None:
        """After each verdict: the first fleet.watch_frames after a switch decide whether it stays."""
        if self.watch is None:
            return
        verdict = self.watch.add(anomaly)
        if verdict == "failed" and self._watch_from is not None:
            self._roll_back(self._watch_from, self.watch.reason(), None)
        elif verdict == "passed":
            logger.info("the new bundle passed its watch (%d of %d frames anomalous)", self.watch.anomalies,
                        self.watch.seen)
            self._end_watch()
            self.hooks.release_free_memory()  # the previous bundle's interpreter is no longer kept at hand
