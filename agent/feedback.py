"""Operator feedback on the box: labelled frames, and the on-box bank extension.

``cmd/feedback`` names a verdict by its id (``frame_id``) and labels it ``good`` or ``defect``. The
frame (from ``Agent.kept_frames`` or the evidence folder) is kept under ``<storage>/feedback/``:

- ``<frame_id>.png``: the frame as the agent decoded it, lossless;
- ``<frame_id>.json``: ``{"frame_id", "label", "note", "ts", "device", "verdict": {...}, "extension"}``
  (written last: its presence marks a complete pair). ``yugami-fleet collect`` reads this layout through
  :func:`read_entries`; keep it stable.

A ``good`` label on a frame the model called ``anomaly`` (with ``feedback.bank_extension``) also adds
the frame's features, recomputed by the current model, to a small second bank the scorer searches after
the bundle's own (:class:`agent.scoring.ExtraBanks`): its GeM embedding row, and for patch / fused
bundles the cells of its patch grid that the bundle's patch bank does not already cover (distance above
``patch.map.floor``, a normal frame's typical worst cell; cells below it change no verdict). The same
false alarm then stops at once, before any retraining. The extension is persisted as
``<storage>/feedback/extension.npz`` (plain arrays, loaded without pickle) and bound to the model's
manifest sha256: another model does not use it. It holds at most ``feedback.max_extension`` frames
(oldest out).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.commands import FEEDBACK_LABELS
from agent.mqtt import utc_iso
from agent.patches import PatchBank
from agent.preprocess import ImageError
from agent.scoring import ExtraBanks, Scorer
from agent.storage import write_atomic

logger = logging.getLogger(__name__)

FEEDBACK_DIR = "feedback"
EXTENSION_FILE = "extension.npz"
LABELS = FEEDBACK_LABELS  # cmd/feedback checks its body against the same
MAX_ID_CHARS = 200  # ".json" / ".png" and a temp prefix must still fit a 255-byte file name


def feedback_dir(storage_dir: str | Path) -> Path:
    return Path(storage_dir) / FEEDBACK_DIR


def storable_id(frame_id: str) -> str | None:
    """Why ``frame_id`` cannot name a file in the feedback folder, or None when it can."""
    if not frame_id or len(frame_id.encode("utf-8")) > MAX_ID_CHARS:
        return f"frame id must be 1 to {MAX_ID_CHARS} bytes"
    if frame_id.startswith(".") or any(ch in frame_id for ch in "/\\\0") or not frame_id.isprintable():
        return "frame id cannot name a file (it starts with '.' or holds '/', '\\' or control characters)"
    return None


# --- the labelled frames ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedbackEntry:
    """One labelled frame as stored: what ``cmd/feedback_list`` and ``yugami-fleet collect`` read."""

    frame_id: str
    label: str
    note: str
    ts: str
    device: str
    verdict: dict[str, Any]
    extension: bool
    files: dict[str, Path] = field(default_factory=dict)  # file name -> path: the .png and the .json

    def as_dict(self) -> dict[str, Any]:
        """The entry's JSON document (without the file paths)."""
        return {"frame_id": self.frame_id, "label": self.label, "note": self.note, "ts": self.ts,
                "device": self.device, "verdict": self.verdict, "extension": self.extension}

    def summary(self) -> dict[str, Any]:
        """A short form for listings: the label and what the model said."""
        v = self.verdict
        return {"frame_id": self.frame_id, "label": self.label, "note": self.note, "ts": self.ts,
                "extension": self.extension, "verdict": v.get("verdict"), "score": v.get("score"),
                "threshold": v.get("threshold"), "model": (v.get("model") or {}).get("sha256")}


def _entry_from_file(meta: Path) -> FeedbackEntry | None:
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("feedback: %s cannot be read (%s); skipped", meta, exc)
        return None
    if not isinstance(doc, dict) or doc.get("label") not in LABELS or not isinstance(doc.get("frame_id"), str):
        logger.warning("feedback: %s is not a feedback entry; skipped", meta)
        return None
    fid = doc["frame_id"]
    image = meta.with_name(fid + ".png")
    files = {image.name: image, meta.name: meta} if image.is_file() else {meta.name: meta}
    verdict = doc.get("verdict")
    return FeedbackEntry(frame_id=fid, label=doc["label"], note=str(doc.get("note") or ""), ts=str(doc.get("ts", "")),
                         device=str(doc.get("device", "")), verdict=verdict if isinstance(verdict, dict) else {},
                         extension=bool(doc.get("extension")), files=files)


def read_entries(storage_dir: str | Path) -> list[FeedbackEntry]:
    """Every labelled frame under ``<storage_dir>/feedback/``, oldest first (by ``ts``, then id).

    The read API for other parts of the agent (``cmd/collect_list`` / ``cmd/fetch``): entries with their
    label, time and files, read from disk each call."""
    folder = feedback_dir(storage_dir)
    if not folder.is_dir():
        return []
    entries = [e for e in (_entry_from_file(m) for m in folder.glob("*.json")) if e is not None]
    return sorted(entries, key=lambda e: (e.ts, e.frame_id))


class FeedbackStore:
    """The labelled frames on disk, at most ``max_frames`` (the oldest label goes first)."""

    def __init__(self, storage_dir: str | Path, max_frames: int) -> None:
        self.dir = feedback_dir(storage_dir)
        self.max_frames = max_frames
        self._entries: dict[str, FeedbackEntry] = {e.frame_id: e for e in read_entries(storage_dir)}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, frame_id: str) -> FeedbackEntry | None:
        return self._entries.get(frame_id)

    def entries(self) -> list[FeedbackEntry]:
        """Oldest first."""
        return sorted(self._entries.values(), key=lambda e: (e.ts, e.frame_id))

    def counts(self) -> dict[str, int]:
        """Labels kept, by label. Any thread (stats, metrics, the MQTT client's on-connect): the values are
        copied in one step first, as the frame loop may add or drop an entry meanwhile."""
        out = dict.fromkeys(LABELS, 0)
        for e in tuple(self._entries.values()):
            out[e.label] += 1
        return out

    def add(self, entry: FeedbackEntry, image: np.ndarray) -> tuple[FeedbackEntry, list[FeedbackEntry]]:
        """Write the frame (PNG) and its entry (JSON, last); (the stored entry, entries dropped to keep the
        bound). Raises OSError when the disk refuses."""
        self.dir.mkdir(parents=True, exist_ok=True)
        png_path = self.dir / f"{entry.frame_id}.png"
        meta_path = self.dir / f"{entry.frame_id}.json"
        # A frame labelled again keeps the picture it was first kept with (from memory: lossless, where a
        # later label may come from the evidence JPEG).
        if entry.frame_id not in self._entries or not png_path.is_file():
            ok, png = cv2.imencode(".png", image)
            if not ok:
                raise OSError("OpenCV could not encode the frame as PNG")
            write_atomic(png_path, png.tobytes())
        write_atomic(meta_path, json.dumps(entry.as_dict(), indent=1).encode("utf-8"))
        stored = dataclasses.replace(entry, files={png_path.name: png_path, meta_path.name: meta_path})
        self._entries.pop(entry.frame_id, None)
        self._entries[entry.frame_id] = stored
        dropped = []
        while len(self._entries) > self.max_frames:
            oldest = self.entries()[0]
            self.remove(oldest.frame_id)
            dropped.append(oldest)
        return stored, dropped

    def mark(self, frame_id: str, extension: bool) -> None:
        """Rewrite an entry's ``extension`` flag (best effort: the listing reads the live extension)."""
        entry = self._entries.get(frame_id)
        if entry is None or entry.extension == extension:
            return
        updated = dataclasses.replace(entry, extension=extension)
        self._entries[frame_id] = updated
        try:
            write_atomic(self.dir / f"{frame_id}.json", json.dumps(updated.as_dict(), indent=1).encode("utf-8"))
        except OSError as exc:
            logger.warning("feedback: cannot update %s.json (%s)", frame_id, exc)

    def remove(self, frame_id: str) -> FeedbackEntry | None:
        entry = self._entries.pop(frame_id, None)
        if entry is None:
            return None
        # The JSON first: without it the pair is incomplete and no reader takes the picture.
        for name in (f"{frame_id}.json", f"{frame_id}.png"):
            with contextlib.suppress(FileNotFoundError):
                (self.dir / name).unlink()
        return entry


# --- the bank extension -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtensionFrame:
    frame_id: str
    added: float  # Unix time
    gem: np.ndarray  # (D,) float32, L2-normalised
    patch: np.ndarray  # (cells kept, Dp) float32; (0, 0) for bundles without patch scoring


class BankExtension:
    """Frames' features added to the normal banks on the box, bound to one model (manifest sha256)."""

    def __init__(self, path: Path, max_frames: int) -> None:
        self.path = path
        self.max_frames = max_frames
        self.model_sha256: str | None = None
        self.frames: list[ExtensionFrame] = []  # oldest first
        self.load_error: str | None = None

    def __len__(self) -> int:
        return len(self.frames)

    def __contains__(self, frame_id: object) -> bool:
        return any(f.frame_id == frame_id for f in self.frames)

    def banks(self) -> ExtraBanks | None:
        """What the scorer searches beside the bundle's banks; None when empty."""
        if not self.frames:
            return None
        gem = np.stack([f.gem for f in self.frames]).astype(np.float32)
        patches = [f.patch for f in self.frames if f.patch.size]
        patch = PatchBank.of(np.concatenate(patches)) if patches else None
        return ExtraBanks(gem=gem, patch=patch)

    def add(self, frame: ExtensionFrame, model_sha256: str) -> list[tuple[ExtensionFrame, str]]:
        """Add a frame's rows (replacing its earlier rows); the frames dropped, each with the reason:
        made with another model, or the oldest beyond ``max_frames``."""
        dropped: list[tuple[ExtensionFrame, str]] = []
        if self.model_sha256 != model_sha256:
            dropped = [(f, "made with another model") for f in self.frames if f.frame_id != frame.frame_id]
            self.frames = []
            self.model_sha256 = model_sha256
        self.frames = [f for f in self.frames if f.frame_id != frame.frame_id] + [frame]
        while len(self.frames) > self.max_frames:
            dropped.append((self.frames.pop(0), "feedback.max_extension"))
        return dropped

    def remove(self, frame_id: str) -> ExtensionFrame | None:
        found = next((f for f in self.frames if f.frame_id == frame_id), None)
        if found is not None:
            self.frames.remove(found)
        return found

    def save(self) -> None:
        """Write ``extension.npz`` atomically (numpy arrays only). Raises OSError when the disk refuses."""
        gem_dim = self.frames[0].gem.shape[0] if self.frames else 0
        patch_dim = max((f.patch.shape[1] for f in self.frames if f.patch.size), default=0)
        patch_rows = [f.patch for f in self.frames if f.patch.size]
        arrays = {
            "format": np.array(1, np.int32),
            "model_sha256": np.array(self.model_sha256 or ""),
            "frame_ids": np.array([f.frame_id for f in self.frames], dtype=str),
            "added": np.array([f.added for f in self.frames], np.float64),
            "gem": (np.stack([f.gem for f in self.frames]).astype(np.float32) if self.frames
                    else np.zeros((0, gem_dim), np.float32)),
            "patch": (np.concatenate(patch_rows).astype(np.float32) if patch_rows
                      else np.zeros((0, patch_dim), np.float32)),
            # patch row i belongs to frame patch_frame[i]
            "patch_frame": np.concatenate([np.full(f.patch.shape[0], i, np.int32) for i, f in enumerate(self.frames)]
                                          or [np.zeros(0, np.int32)]),
        }
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, buf.getvalue())

    def load(self) -> None:
        """Read ``extension.npz`` if there is one; a damaged file is logged and left empty (``load_error``)."""
        self.frames, self.model_sha256, self.load_error = [], None, None
        if not self.path.exists():
            return
        try:
            with np.load(self.path, allow_pickle=False) as z:
                ids = [str(x) for x in z["frame_ids"]]
                added, gem = z["added"].astype(np.float64), z["gem"].astype(np.float32)
                patch, owner = z["patch"].astype(np.float32), z["patch_frame"].astype(np.int64)
                sha = str(z["model_sha256"])
            n = len(ids)
            owners_ok = owner.shape == (patch.shape[0],) and (not owner.size or 0 <= owner.min() <= owner.max() < n)
            if gem.ndim != 2 or len(ids) != gem.shape[0] or len(added) != len(ids) or patch.ndim != 2 or not owners_ok:
                raise ValueError("the arrays do not agree in shape")
            if not (np.isfinite(gem).all() and np.isfinite(patch).all()):
                raise ValueError("it holds non-finite values")
        except (OSError, ValueError, KeyError, EOFError) as exc:
            self.load_error = f"{self.path} cannot be read ({type(exc).__name__}: {exc})"
            logger.error("feedback: %s; the bank extension starts empty (it is rewritten on the next feedback)",
                         self.load_error)
            return
        self.model_sha256 = sha or None
        empty = np.zeros((0, patch.shape[1]), np.float32)
        self.frames = [ExtensionFrame(fid, float(added[i]), gem[i], patch[owner == i] if patch.size else empty)
                       for i, fid in enumerate(ids)]


# --- the loop: what the agent's commands call -------------------------------------------------------


@dataclass(frozen=True)
class FrameRef:
    """A frame to label: the picture and its verdict, and where it was found ("recent" or "evidence")."""

    frame_id: str
    image: np.ndarray
    payload: dict[str, Any]
    origin: str


class FeedbackError(ValueError):
    """A feedback request that cannot be carried out; its text is the command's ``error``."""


def extension_features(scorer: Scorer, image: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(GeM row (D,), the patch cells to add (k, Dp)) of a frame under ``scorer``'s model.

    The cells kept are those farther than ``patch.map.floor`` (a normal frame's typical worst cell) from
    the bundle's own patch bank: the ones that made the alarm. All cells when the bundle has no floor."""
    vector, cells, distances = scorer.extension_features(image, name)
    if cells is None or distances is None:
        return vector, np.zeros((0, 0), np.float32)
    floor = scorer.bundle.map_floor
    keep = distances > floor if floor > 0 else np.ones(distances.shape, bool)
    return vector, np.ascontiguousarray(cells[keep], np.float32)


class FeedbackLoop:
    """Labelled frames and the bank extension, applied to whichever scorer the agent uses.

    Runs on the frame-loop thread (commands and :meth:`follow` per frame); ``event(name, **detail)``
    publishes an agent event."""

    def __init__(self, storage_dir: str | Path, cfg: Any, device: str, event: Callable[..., None]) -> None:
        self.cfg = cfg  # agent.config.FeedbackConfig
        self.device = device
        self._event = event
        self.store = FeedbackStore(storage_dir, cfg.max_frames)
        self.extension = BankExtension(feedback_dir(storage_dir) / EXTENSION_FILE, cfg.max_extension)
        self.extension.load()
        # weak: a bundle replaced by a reload must die with the swap (its memory is trimmed right after), not
        # live on here until the next frame
        self._followed: weakref.ref[Scorer] | None = None
        self.applied = False  # whether the scorer in use searches the extension

    # --- the scorer ---

    def follow(self, scorer: Scorer) -> None:
        """Give a new scorer (start, reload, install, rollback) the extension if it belongs to its model;
        otherwise say so once. Cheap when the scorer is the one already followed (called per frame)."""
        if self._followed is not None and self._followed() is scorer:
            return
        self._followed = weakref.ref(scorer)
        self._apply(announce=True)

    def _apply(self, announce: bool = False) -> None:
        scorer = self._followed() if self._followed is not None else None
        if scorer is None:
            return
        ext = self.extension
        sha = scorer.bundle.manifest_sha256
        if ext.frames and ext.model_sha256 != sha:
            scorer.extend(None)
            self.applied = False
            if announce:
                logger.warning("feedback: the bank extension (%d frames) belongs to model %s, not %s; not applied",
                               len(ext), (ext.model_sha256 or "?")[:12], sha[:12])
                self._event("bank_extension_not_applied", frames=len(ext), extension_model=ext.model_sha256,
                            model={"name": scorer.bundle.name, "sha256": sha},
                            reason="the extension was made with another model; label the frames again")
            return
        scorer.extend(ext.banks())
        self.applied = bool(ext.frames)
        if announce and ext.frames:
            logger.info("feedback: bank extension of %d frames applied to model %s", len(ext), sha[:12])
            self._event("bank_extension_applied", frames=len(ext), model={"name": scorer.bundle.name, "sha256": sha})
        if announce and ext.load_error:
            self._event("bank_extension_not_applied", frames=0, error=ext.load_error,
                        reason="the extension file is damaged; it is rewritten on the next feedback")

    # --- commands ---

    def label(self, scorer: Scorer, frame: FrameRef, label: str, note: str) -> dict[str, Any]:
        """Keep a labelled frame and, for a false alarm labelled good, extend the bank. The command's data."""
        self.follow(scorer)
        if label not in LABELS:
            raise FeedbackError(f"label must be one of {', '.join(LABELS)}, not {label!r}")
        why = storable_id(frame.frame_id)
        if why:
            raise FeedbackError(why)
        extend = label == "good" and frame.payload.get("verdict") == "anomaly" and self.cfg.bank_extension
        previous = self.store.get(frame.frame_id)
        entry = FeedbackEntry(frame_id=frame.frame_id, label=label, note=note, ts=utc_iso(), device=self.device,
                              verdict=frame.payload, extension=extend)
        try:
            _, dropped = self.store.add(entry, frame.image)
        except (OSError, cv2.error) as exc:
            raise FeedbackError(f"the frame cannot be kept in {self.store.dir} ({exc}); free some disk space "
                                "or fix the folder's permissions") from exc
        for old in dropped:
            self._forget(old.frame_id, reason="feedback.max_frames")
        data: dict[str, Any] = {"frame_id": frame.frame_id, "label": label, "origin": frame.origin,
                                "replaced": previous.label if previous else None, "extension": False}
        self._event("feedback_added", frame_id=frame.frame_id, label=label, note=note, origin=frame.origin,
                    verdict=frame.payload.get("verdict"), score=frame.payload.get("score"))
        if extend:
            data.update(self._extend(scorer, frame))
        elif frame.frame_id in self.extension:  # relabelled, or a good label on a frame called ok
            self._unextend(frame.frame_id, reason=f"relabelled {label}")
        if not extend:
            data["why_no_extension"] = ("feedback.bank_extension is false" if label == "good"
                                        and frame.payload.get("verdict") == "anomaly"
                                        else "only a good label on an anomaly verdict extends the bank")
        data["counts"] = self.counts()
        return data

    def _extend(self, scorer: Scorer, frame: FrameRef) -> dict[str, Any]:
        try:
            before, _ = scorer.score(frame.image, frame.frame_id)
            gem, cells = extension_features(scorer, frame.image, frame.frame_id)
        except ImageError as exc:
            self.store.mark(frame.frame_id, False)
            raise FeedbackError(f"the frame was kept with its label but cannot be embedded: {exc}") from exc
        sha = scorer.bundle.manifest_sha256
        dropped = self.extension.add(ExtensionFrame(frame.frame_id, time.time(), gem, cells), sha)
        for old, reason in dropped:
            self.store.mark(old.frame_id, False)
            self._event("bank_extension_dropped", frame_id=old.frame_id, reason=reason,
                        max_extension=self.extension.max_frames, extension_frames=len(self.extension))
        self._save_extension()
        self._apply()
        after, _ = scorer.score(frame.image, frame.frame_id)
        self._event("bank_extended", frame_id=frame.frame_id, frames=len(self.extension), gem_rows=1,
                    patch_rows=int(cells.shape[0]), model={"name": scorer.bundle.name, "sha256": sha},
                    score_before=_r(before.score), score_after=_r(after.score), threshold=_r(after.threshold))
        return {"extension": True, "extension_frames": len(self.extension), "patch_rows": int(cells.shape[0]),
                "score": {"before": _r(before.score), "after": _r(after.score), "threshold": _r(after.threshold),
                          "verdict_after": after.verdict}}

    def undo(self, frame_id: str) -> dict[str, Any]:
        """Forget a label (and the frame's extension rows); FeedbackError when there is none."""
        entry = self.store.get(frame_id)
        in_extension = frame_id in self.extension
        if entry is None and not in_extension:
            raise FeedbackError(f"no feedback for frame {frame_id!r}; cmd/feedback_list lists the labelled frames")
        self.store.remove(frame_id)
        if in_extension:
            self.extension.remove(frame_id)
            self._save_extension()
            self._apply()
        self._event("feedback_undone", frame_id=frame_id, label=entry.label if entry else None,
                    extension_removed=in_extension, extension_frames=len(self.extension))
        return {"frame_id": frame_id, "label": entry.label if entry else None, "extension_removed": in_extension,
                "counts": self.counts()}

    def listing(self, limit: int, label: str | None = None) -> dict[str, Any]:
        """The newest ``limit`` labelled frames (newest first), the counts and the extension's state."""
        entries = [e for e in self.store.entries() if label is None or e.label == label]
        items = []
        for e in reversed(entries[-limit:] if limit else []):
            item = e.summary()
            item["extension"] = e.frame_id in self.extension
            items.append(item)
        return {"items": items, "total": len(entries), "counts": self.counts(),
                "extension": {"frames": len(self.extension), "model": self.extension.model_sha256,
                              "applied": self.applied, "max_frames": self.extension.max_frames}}

    def counts(self) -> dict[str, int]:
        """``stats.feedback``: labels kept, and frames in the bank extension."""
        return {**self.store.counts(), "extension_frames": len(self.extension)}

    # --- internals ---

    def _forget(self, frame_id: str, reason: str) -> None:
        if frame_id in self.extension:
            self._unextend(frame_id, reason)
        self._event("feedback_dropped", frame_id=frame_id, reason=reason, max_frames=self.store.max_frames)

    def _unextend(self, frame_id: str, reason: str) -> None:
        self.extension.remove(frame_id)
        self.store.mark(frame_id, False)
        self._save_extension()
        self._apply()
        self._event("bank_extension_dropped", frame_id=frame_id, reason=reason, extension_frames=len(self.extension))

    def _save_extension(self) -> None:
        try:
            self.extension.save()
        except OSError as exc:  # applied in memory all the same; the next change tries to write it again
            logger.error("feedback: cannot write %s (%s); the extension is used but lost at a restart",
                         self.extension.path, exc)
            self._event("bank_extension_not_saved", error=str(exc), path=str(self.extension.path))


def _r(x: float) -> float:
    return round(float(x), 6) + 0.0  # + 0.0: 1 - cos of a frame with itself may round to -0.0
