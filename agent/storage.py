"""Evidence on disk: anomalous frames (and optionally a sample of normal ones) with their verdict.

Layout: ``<storage>/evidence/<YYYY-MM-DD>/<HHMMSS>_<frame id>.jpg`` plus ``.json`` beside it
(the verdict JSON, exactly as published). Retention keeps at most ``storage.max_files`` frames, at
most ``storage.max_bytes`` bytes (pictures + JSON) and none older than ``storage.max_age_days``; the
oldest go first. While the disk has less than ``storage.min_free_bytes`` free, no evidence is written
(counted as ``skipped``), so the outbox keeps room. A full or failing disk is logged and counted, never
fatal: evidence is a help, the verdict on MQTT is the product.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.config import StorageConfig
from agent.preprocess import load_image

logger = logging.getLogger(__name__)


class Evidence:
    def __init__(self, root: str | Path, cfg: StorageConfig) -> None:
        self.root = Path(root) / "evidence"
        self.cfg = cfg
        self.saved = 0
        self.errors = 0
        self.skipped = 0  # not written: the disk was below storage.min_free_bytes
        self.bytes = 0  # kept, pictures + JSON
        self._low_space = False
        self._normal_count = 0
        self._index: deque[tuple[float, Path, int]] = deque()  # (time saved, path without suffix, bytes), oldest first
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a read-only or full disk at start: saving tries again (and counts errors)
            logger.error("evidence folder %s cannot be created (%s); frames are not saved until it can be",
                         self.root, exc.strerror or exc)
            return
        self._load_index()
        self.prune()

    def _load_index(self) -> None:
        items = []
        for meta in self.root.glob("*/*.json"):
            base = meta.with_name(meta.name[: -len(".json")])
            try:
                items.append((meta.stat().st_mtime, base, _pair_bytes(base)))
            except FileNotFoundError:
                continue
        self._index = deque(sorted(items))
        self.bytes = sum(size for _, _, size in self._index)

    def __len__(self) -> int:
        return len(self._index)

    def entries(self) -> list[tuple[float, Path]]:
        """(time saved, path without suffix) of every kept frame, oldest first; from memory, no disk access
        (what cmd/collect_list and cmd/fetch look frames up in)."""
        return [(t, base) for t, base, _ in self._index]

    def find(self, frame_id: str) -> Path | None:
        """The kept picture of a verdict (``<day>/<HHMMSS>_<frame id>.<jpg|png>``), newest first; None when
        it is not (or no longer) kept. From memory, then one look at the disk for the suffix."""
        for _, base, _ in reversed(self._index):
            if base.name.partition("_")[2] == frame_id:
                for suffix in (".png", ".jpg"):
                    if _suffixed(base, suffix).is_file():
                        return _suffixed(base, suffix)
        return None

    def load(self, frame_id: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """(the picture as saved, its verdict JSON) of a kept frame, or None when it is not kept or unreadable."""
        image_path = self.find(frame_id)
        if image_path is None:
            return None
        meta = image_path.with_name(image_path.name[: -len(image_path.suffix)] + ".json")
        try:
            payload = json.loads(meta.read_text(encoding="utf-8"))
            image = load_image(image_path)
        except (OSError, ValueError) as exc:  # ImageError is a ValueError
            logger.warning("evidence for frame %s cannot be read (%s)", frame_id, exc)
            return None
        return (image, payload) if isinstance(payload, dict) else None

    def wants(self, verdict: str) -> bool:
        """Whether a frame with this verdict is to be kept (counts ok frames for the 1-in-N sample)."""
        if verdict == "anomaly":
            return self.cfg.save_anomalies
        n = self.cfg.save_normal_every
        if n <= 0:
            return False
        self._normal_count += 1
        return self._normal_count % n == 0

    def save(self, image: np.ndarray, payload: dict[str, Any], now: float | None = None) -> Path | None:
        """Write the frame and its verdict JSON; return the image path, or None when the disk refused."""
        now = time.time() if now is None else now
        moment = dt.datetime.fromtimestamp(now, tz=dt.timezone.utc)
        folder = self.root / moment.strftime("%Y-%m-%d")
        base = folder / f"{moment.strftime('%H%M%S')}_{payload['id']}"
        ext = "." + self.cfg.image_format
        try:
            ok, data = cv2.imencode(ext, image)
            if not ok:
                raise OSError(f"OpenCV could not encode the frame as {ext}")
            meta = json.dumps(payload, indent=1).encode("utf-8")
            size = len(data) + len(meta)
            if not self._room_for(size, payload):
                return None
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(_suffixed(base, ext), data.tobytes())
            # The JSON goes last: its presence marks a complete pair.
            write_atomic(_suffixed(base, ".json"), meta)
        except (OSError, cv2.error) as exc:
            self.errors += 1
            logger.error("cannot save evidence for frame %s in %s: %s", payload.get("id"), folder, exc)
            return None
        self._index.append((now, base, size))
        self.bytes += size
        self.saved += 1
        self.prune(now)
        return _suffixed(base, ext)

    def _room_for(self, size: int, payload: dict[str, Any]) -> bool:
        """False (counted, logged once per episode) while writing would leave less than min_free_bytes free."""
        free = shutil.disk_usage(self.root if self.root.exists() else self.root.parent).free
        low = free - size < self.cfg.min_free_bytes
        if low:
            self.skipped += 1
            if not self._low_space:
                logger.warning("evidence not saved (frame %s and later): %d bytes free in %s is under "
                               "storage.min_free_bytes (%d); the room is kept for the outbox", payload.get("id"),
                               free, self.root, self.cfg.min_free_bytes)
        elif self._low_space:
            logger.info("evidence is saved again: %d bytes free in %s", free, self.root)
        self._low_space = low
        return not low

    def prune(self, now: float | None = None) -> int:
        """Apply retention by count, bytes and age; return how many frames were removed."""
        now = time.time() if now is None else now
        removed = 0
        while self._index and self._over(now):
            _, base, size = self._index.popleft()
            self._remove(base)
            self.bytes -= size
            removed += 1
        return removed

    def _over(self, now: float) -> bool:
        max_age = self.cfg.max_age_days * 86400.0
        return (len(self._index) > self.cfg.max_files or self.bytes > self.cfg.max_bytes
                or now - self._index[0][0] > max_age)

    def _remove(self, base: Path) -> None:
        for suffix in (".jpg", ".png", ".json"):
            with contextlib.suppress(FileNotFoundError):
                _suffixed(base, suffix).unlink()
        with contextlib.suppress(OSError):
            base.parent.rmdir()  # only succeeds once the day's folder is empty


def _pair_bytes(base: Path) -> int:
    size = 0
    for suffix in (".jpg", ".png", ".json"):
        with contextlib.suppress(FileNotFoundError):
            size += _suffixed(base, suffix).stat().st_size
    return size


def _suffixed(base: Path, suffix: str) -> Path:
    # Not Path.with_suffix: frame ids may hold dots ("part.v2-1a2b"), which it would cut.
    return base.with_name(base.name + suffix)


def write_atomic(path: Path, data: bytes, sync: bool = False) -> None:
    """Write ``path`` through a temporary file beside it, renamed over it: a reader finds the old content or
    the new, never half. ``sync``: the data, then the rename, are flushed to the disk as well, so a crash or
    power cut also leaves one or the other (files read back at start: settings.json, installed.json).
    Raises OSError."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync:
        with contextlib.suppress(OSError):  # some file systems cannot sync a folder; the data is synced
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
