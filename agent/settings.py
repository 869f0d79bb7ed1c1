"""Settings changed at run time (``cmd/set``): threshold, max_fps, gradcam_policy, kept per box.

A setting overrides what the box would use otherwise: the bundle's threshold, the config's
``capture.max_fps`` and ``gradcam.policy``. A setting of null (or none sent) means "no override".
They live in ``<storage_dir>/settings.json``, written atomically, so they survive a restart.

A threshold only means something for the model it was chosen for (scores of another model have another
scale), so it is stored with that model's manifest sha256 and applies only while that model is in use.
Under another model it stays stored but is not applied; it applies again if its model comes back (a
rollback), and a new ``cmd/set threshold`` replaces it.

Everything here is pure apart from :func:`load_settings`, :func:`save_settings` and :class:`BoxSettings`,
which keeps them for the service (start, cmd/set, cmd/get, a new scorer) and reports what changed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.patches import finite_number
from agent.storage import write_atomic

if TYPE_CHECKING:
    from agent.bundle import Bundle
    from agent.config import AgentConfig
    from agent.scoring import Scorer

logger = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
FORMAT = 1
KEYS = ("threshold", "max_fps", "gradcam_policy")
GRADCAM_POLICIES = ("off", "on_command", "every_anomaly")
MAX_FPS_LIMIT = 1000.0  # a cap above this is no cap; a typo such as 10000 is refused rather than meaningless


class SettingsError(ValueError):
    """A ``cmd/set`` body or a settings file that cannot be used; the message says what and how to fix it."""


@dataclass(frozen=True)
class Settings:
    """The overrides in force; None for each one not set."""

    threshold: float | None = None
    threshold_model: str | None = None  # manifest sha256 of the model the threshold was set for
    max_fps: float | None = None
    gradcam_policy: str | None = None

    def threshold_for(self, model_sha256: str) -> float | None:
        """The threshold override for this model, or None (none set, or set for another model)."""
        if self.threshold is None or self.threshold_model != model_sha256:
            return None
        return self.threshold

    def to_json(self) -> dict[str, Any]:
        threshold = None
        if self.threshold is not None:
            threshold = {"value": self.threshold, "model_sha256": self.threshold_model}
        return {"format": FORMAT, "threshold": threshold, "max_fps": self.max_fps,
                "gradcam_policy": self.gradcam_policy}

    @classmethod
    def from_json(cls, data: Any) -> Settings:
        """Read what :meth:`to_json` wrote; SettingsError naming the first thing that is wrong."""
        if not isinstance(data, dict):
            raise SettingsError(f"must be a JSON object, not {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise SettingsError(f"'format' must be {FORMAT}, not {data.get('format')!r}")
        threshold = model = None
        t = data.get("threshold")
        if t is not None:
            if not isinstance(t, dict) or not isinstance(t.get("model_sha256"), str):
                raise SettingsError("'threshold' must be null or {\"value\": number, \"model_sha256\": \"...\"}")
            threshold = check_threshold(t.get("value"))
            model = t["model_sha256"]
        return cls(threshold=threshold, threshold_model=model, max_fps=check_max_fps(data.get("max_fps")),
                   gradcam_policy=check_gradcam_policy(data.get("gradcam_policy")))


# --- validation of single values (None passes: it clears the setting) ---


def check_threshold(value: Any) -> float | None:
    if value is None:
        return None
    v = finite_number(value)
    if v is None:
        raise SettingsError(f"'threshold' must be a finite number (or null to use the bundle's), not {value!r}")
    return v


def check_max_fps(value: Any) -> float | None:
    if value is None:
        return None
    v = finite_number(value)
    if v is None or not 0 < v <= MAX_FPS_LIMIT:
        raise SettingsError(f"'max_fps' must be a number above 0 and at most {MAX_FPS_LIMIT:g} (or null to use "
                            f"capture.max_fps from the config), not {value!r}")
    return v


def check_gradcam_policy(value: Any) -> str | None:
    if value is None:
        return None
    if value not in GRADCAM_POLICIES:
        raise SettingsError(f"'gradcam_policy' must be one of {', '.join(GRADCAM_POLICIES)} (or null to use "
                            f"gradcam.policy from the config), not {value!r}")
    return str(value)


_CHECKS = {"threshold": check_threshold, "max_fps": check_max_fps, "gradcam_policy": check_gradcam_policy}


def parse_changes(body: dict[str, Any]) -> dict[str, Any]:
    """The settings a ``cmd/set`` body changes, checked: {key: new value or None to clear}.

    ``id`` is the request id, not a setting. Raises SettingsError for an unknown key (naming the known
    ones), a bad value, or a body that changes nothing."""
    changes = {k: v for k, v in body.items() if k != "id"}
    unknown = sorted(k for k in changes if k not in KEYS)
    if unknown:
        raise SettingsError(f"unknown setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(KEYS)}")
    if not changes:
        raise SettingsError(f"nothing to set; send one or more of {', '.join(KEYS)} (null clears one)")
    problems = []
    checked: dict[str, Any] = {}
    for key, value in changes.items():
        try:
            checked[key] = _CHECKS[key](value)
        except SettingsError as exc:
            problems.append(str(exc))
    if problems:
        raise SettingsError("; ".join(problems))
    return checked


def apply_changes(settings: Settings, changes: dict[str, Any], model_sha256: str) -> Settings:
    """``settings`` with ``changes`` (from :func:`parse_changes`) made; a threshold is bound to the model."""
    out = settings
    if "threshold" in changes:
        value = changes["threshold"]
        out = replace(out, threshold=value, threshold_model=model_sha256 if value is not None else None)
    if "max_fps" in changes:
        out = replace(out, max_fps=changes["max_fps"])
    if "gradcam_policy" in changes:
        out = replace(out, gradcam_policy=changes["gradcam_policy"])
    return out


# --- what is in force ---


@dataclass(frozen=True)
class Effective:
    """The values the box uses now, and where each comes from."""

    threshold: float
    threshold_source: str  # "bundle" | "set"
    max_fps: float | None
    max_fps_source: str  # "config" | "set"
    gradcam_policy: str
    gradcam_policy_source: str  # "config" | "set"

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {
            "threshold": {"value": self.threshold, "source": self.threshold_source},
            "max_fps": {"value": self.max_fps, "source": self.max_fps_source},
            "gradcam_policy": {"value": self.gradcam_policy, "source": self.gradcam_policy_source},
        }

    def values(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "max_fps": self.max_fps, "gradcam_policy": self.gradcam_policy}


def effective(settings: Settings, *, bundle_threshold: float, model_sha256: str, config_max_fps: float | None,
              config_gradcam_policy: str) -> Effective:
    threshold = settings.threshold_for(model_sha256)
    return Effective(
        threshold=bundle_threshold if threshold is None else threshold,
        threshold_source="bundle" if threshold is None else "set",
        max_fps=config_max_fps if settings.max_fps is None else settings.max_fps,
        max_fps_source="config" if settings.max_fps is None else "set",
        gradcam_policy=config_gradcam_policy if settings.gradcam_policy is None else settings.gradcam_policy,
        gradcam_policy_source="config" if settings.gradcam_policy is None else "set",
    )


def differences(old: Effective, new: Effective) -> dict[str, dict[str, Any]]:
    """{key: {"old", "new"}} for every effective value that changed."""
    a, b = old.values(), new.values()
    return {k: {"old": a[k], "new": b[k]} for k in KEYS if a[k] != b[k]}


# --- the file ---


def settings_path(storage_dir: Path) -> Path:
    return Path(storage_dir) / SETTINGS_FILE


def load_settings(path: Path) -> tuple[Settings, str | None]:
    """(the settings in the file, None), or (no settings, why the file could not be used).

    A missing file is no settings and no problem. A damaged or unreadable one must not stop the box: it
    runs on its config and bundle values and the caller reports the problem (log and event)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Settings(), None
    except OSError as exc:
        return Settings(), f"{path} cannot be read ({type(exc).__name__}: {exc})"
    try:
        return Settings.from_json(json.loads(raw.decode("utf-8"))), None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Settings(), f"{path} is not valid JSON ({exc})"
    except SettingsError as exc:
        return Settings(), f"{path}: {exc}"


def save_settings(path: Path, settings: Settings) -> None:
    """Write atomically (a temporary file beside it, flushed to disk, renamed over it): a crash or power cut
    leaves the old file or the new one, never half of one. Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(settings.to_json(), indent=1, allow_nan=False) + "\n").encode("utf-8")
    write_atomic(path, data, sync=True)


# --- the settings of a running box ---


class BoxSettings:
    """The settings a running box keeps: read at start, changed by cmd/set, applied to each new scorer.

    ``scorer`` gives the scorer in use (its bundle's threshold is the default, its ``threshold_override`` is set
    here); ``event`` publishes an event, ``kept_event`` hands one to the MQTT client before the broker is up.
    Frame-loop thread, except :meth:`effective` and :meth:`stats` (any thread: the stored settings and the
    scorer are replaced whole, never changed)."""

    def __init__(self, cfg: AgentConfig, scorer: Callable[[], Scorer | None], event: Callable[..., None],
                 kept_event: Callable[..., None]) -> None:
        self.cfg = cfg
        self.stored = Settings()  # cmd/set overrides, persisted in <storage_dir>/settings.json
        self.path = settings_path(cfg.storage_dir)
        self.problem: str | None = None  # why settings.json could not be used at start
        self._scorer = scorer
        self._event = event
        self._kept_event = kept_event

    def load(self) -> None:
        """settings.json at start; a damaged or unreadable one is reported, and the box runs on its config and
        bundle values (the next cmd/set writes a good file over it)."""
        self.stored, self.problem = load_settings(self.path)
        if self.problem:
            logger.error("settings: %s; going on with the config's and the bundle's values (the next cmd/set "
                         "replaces the file)", self.problem)

    def start_events(self, bundle: Bundle) -> None:
        """Events for what :meth:`load` found, handed to the MQTT client to go out once it is connected."""
        if self.problem:
            self._kept_event("settings_unreadable", path=str(self.path), error=self.problem)
        self._threshold_dropped(bundle, kept=True)

    def threshold_for(self, model_sha256: str) -> float | None:
        """The threshold a new scorer for this model gets, or None (the bundle's)."""
        return self.stored.threshold_for(model_sha256)

    def effective(self) -> Effective:
        """What the box uses now."""
        scorer = self._scorer()
        assert scorer is not None
        return effective(self.stored, bundle_threshold=scorer.bundle.threshold,
                         model_sha256=scorer.bundle.manifest_sha256, config_max_fps=self.cfg.capture.max_fps,
                         config_gradcam_policy=self.cfg.gradcam.policy)

    def stats(self) -> dict[str, Any]:
        """The stats' "threshold" and "settings" entries; none before there is a scorer."""
        if self._scorer() is None:
            return {}
        eff = self.effective().as_dict()
        return {"threshold": eff["threshold"], "settings": eff}

    def _threshold_dropped(self, bundle: Bundle, kept: bool = False) -> bool:
        """Report a stored threshold that does not apply to ``bundle`` (set for another model); True if so."""
        s = self.stored
        if s.threshold is None or s.threshold_model == bundle.manifest_sha256:
            return False
        logger.warning("settings: the threshold %g was set for model %s, not for %s (%s) now in use: not applied",
                       s.threshold, (s.threshold_model or "")[:12], bundle.name, bundle.manifest_sha256[:12])
        detail = {"setting": "threshold", "value": s.threshold, "set_for": {"sha256": s.threshold_model},
                  "model": {"name": bundle.name, "sha256": bundle.manifest_sha256},
                  "reason": "set for another model; it applies again if that model comes back, or send cmd/set "
                            "threshold for this one", "threshold": bundle.threshold}
        (self._kept_event if kept else self._event)("setting_dropped", **detail)
        return True

    def after_switch(self, old: Bundle) -> None:
        """Call on the frame loop once the scorer in use has been replaced by one made with :meth:`threshold_for`
        (reload, install, rollback): says whether the stored threshold still applies."""
        scorer = self._scorer()
        assert scorer is not None
        new = scorer.bundle
        # a scorer kept from before (rollback) may carry an override the settings have changed since
        scorer.threshold_override = self.stored.threshold_for(new.manifest_sha256)
        if self._threshold_dropped(new):
            return
        if self.stored.threshold is not None and old.manifest_sha256 != new.manifest_sha256:
            self._event("setting_applied", setting="threshold", value=self.stored.threshold,
                        model={"name": new.name, "sha256": new.manifest_sha256})

    def change(self, body: dict[str, Any]) -> tuple[bool, str | None, dict[str, Any]]:
        """cmd/set: check, save, apply at once. (ok, error, data with the effective settings)."""
        scorer = self._scorer()
        assert scorer is not None
        try:
            changes = parse_changes(body)
        except SettingsError as exc:
            return False, str(exc), {"settings": self.effective().as_dict()}
        before = self.effective()
        new = apply_changes(self.stored, changes, scorer.bundle.manifest_sha256)
        try:
            save_settings(self.path, new)
        except (OSError, ValueError) as exc:
            logger.error("settings: cannot save %s (%s); the settings stay as they were", self.path, exc)
            return False, (f"cannot save {self.path} ({type(exc).__name__}: {exc}); nothing changed. "
                           "Give storage.dir a writable folder with free space"), {"settings": before.as_dict()}
        old_settings, self.stored = self.stored, new
        scorer.threshold_override = new.threshold_for(scorer.bundle.manifest_sha256)
        self.problem = None
        after = self.effective()
        changed = differences(before, after)
        if new != old_settings:
            logger.info("settings changed: %s", changed or "stored values only")
            self._event("settings_changed", changed=changed, settings=after.as_dict())
        return True, None, {"settings": after.as_dict(), "changed": changed}

    def report(self) -> dict[str, Any]:
        """cmd/get: the effective settings, where each comes from, and what is stored."""
        stored = self.stored.to_json()
        stored.pop("format")
        return {"settings": self.effective().as_dict(), "stored": stored}
