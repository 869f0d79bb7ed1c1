"""Frame sources, all through OpenCV: camera device, stream URL, video file, folder of images.

Each source opens, reads one frame at a time and closes; :class:`ManagedSource` wraps one and
keeps the service up when it fails: it reopens with exponential backoff and reports every change
of state (up, down, ended) through a callback, never raising into the frame loop.

Folder sources inspect every image file once, in name order: those present at start, then each
new one. The names already inspected are kept in a small append-only file in the storage
directory, so a restart neither repeats nor skips a file (a file being inspected when the agent
was killed is inspected again, with the same frame id).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from agent.config import AgentConfig, CaptureConfig
from agent.preprocess import IMAGE_SUFFIXES, ImageError, load_image

logger = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """The source cannot be opened, or stopped giving frames; it will be reopened."""


class EndOfSource(Exception):
    """A video file without ``loop`` reached its end."""


@dataclass(frozen=True)
class Frame:
    image: np.ndarray | None  # BGR / grey uint8 as OpenCV gives it; None for a bad frame
    frame_id: str
    source: str  # where it came from, for the verdict's "source" field
    error: str | None = None  # why a bad frame could not be read
    key: str | None = None  # folder sources: the file name, marked inspected once handled


def new_run_id() -> str:
    """Unique per agent start: UTC start time plus randomness, prefix of stream frame ids."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + secrets.token_hex(2)


def redact_url(url: str) -> str:
    """The URL without its password, for logs and payloads."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


class FrameSource(Protocol):
    kind: str
    name: str

    def open(self) -> None: ...

    def read(self, fresh: bool = False) -> Frame | None: ...

    def skip(self) -> None: ...

    def done(self, frame: Frame) -> None: ...

    def close(self) -> None: ...


class VideoCaptureSource:
    """A camera device, a stream URL or a video file, read with cv2.VideoCapture."""

    def __init__(self, kind: str, target: str | int, cfg: CaptureConfig, run_id: str) -> None:
        self.kind = kind
        self.target = target
        self.cfg = cfg
        self.run_id = run_id
        self.name = redact_url(str(target)) if kind == "stream" else str(target)
        self._cap: Any = None
        self._seq = 0
        self._index = 0  # frame index within the file, for video sources
        self._read_since_open = 0

    def _capture(self) -> Any:
        c = self.cfg
        if self.kind == "device":
            target = int(self.target) if str(self.target).isdigit() else str(self.target)
            return cv2.VideoCapture(target, cv2.CAP_V4L2)
        if self.kind == "stream":
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(c.open_timeout_s * 1000),
                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(c.read_timeout_s * 1000)]
            return cv2.VideoCapture(str(self.target), cv2.CAP_FFMPEG, params)
        return cv2.VideoCapture(str(self.target))

    def open(self) -> None:
        if self.kind == "video" and not Path(str(self.target)).is_file():
            raise SourceError(f"video file {self.target} does not exist")
        try:
            cap = self._capture()
        except cv2.error as exc:
            raise SourceError(f"OpenCV cannot open {self.name}: {exc}") from exc
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"OpenCV cannot open {self.name} (missing, busy, or an unsupported format)")
        if self.kind == "device":
            self._configure_device(cap)
        self._cap = cap
        self._index = 0
        self._read_since_open = 0

    def _configure_device(self, cap: Any) -> None:
        c = self.cfg
        settings = [(cv2.CAP_PROP_FRAME_WIDTH, c.width), (cv2.CAP_PROP_FRAME_HEIGHT, c.height),
                    (cv2.CAP_PROP_FPS, c.fps)]
        if c.mode == "trigger":
            settings.append((cv2.CAP_PROP_BUFFERSIZE, 1))  # fewer stale frames to drop per shot
        for prop, value in settings:
            if value is not None and not cap.set(prop, value):
                logger.warning("camera %s ignored setting %s=%s", self.name, prop, value)

    def read(self, fresh: bool = False) -> Frame | None:
        if self._cap is None:
            raise SourceError(f"{self.name} is not open")
        if fresh and self.kind in ("device", "stream"):
            for _ in range(self.cfg.trigger_flush_frames):
                self._cap.grab()
        try:
            ok, image = self._cap.read()
        except cv2.error as exc:
            raise SourceError(f"reading {self.name} failed: {exc}") from exc
        if not ok or image is None:
            return self._end_or_fail()
        self._read_since_open += 1
        self._seq += 1
        index = self._index
        self._index += 1
        source = f"{self.name}#{index}" if self.kind == "video" else self.name
        return Frame(image=image, frame_id=f"{self.run_id}-{self._seq:06d}", source=source)

    def _end_or_fail(self) -> Frame | None:
        if self.kind != "video":
            raise SourceError(f"{self.name} stopped giving frames")
        if self._read_since_open == 0:
            raise SourceError(f"video file {self.name} has no readable frame (corrupt or unsupported codec)")
        if not self.cfg.loop:
            raise EndOfSource(self.name)
        # Seeking back is not reliable for every container; reopening is.
        self.close()
        self.open()
        return None

    def skip(self) -> None:
        """Take a frame and drop it: a live camera or stream read too slowly serves ever older frames."""
        if self._cap is not None and self.kind in ("device", "stream") and not self._cap.grab():
            raise SourceError(f"{self.name} stopped giving frames")

    def done(self, frame: Frame) -> None:
        return None

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:64]


class FolderSource:
    """Every image file in a folder, once each, in name order; new files as they appear."""

    kind = "folder"

    def __init__(self, folder: str | Path, state_dir: str | Path, cfg: CaptureConfig) -> None:
        self.folder = Path(folder)
        self.name = str(self.folder)
        self.cfg = cfg
        digest = hashlib.sha256(str(self.folder.resolve()).encode()).hexdigest()[:12]
        self.state_file = Path(state_dir) / f"folder-{digest}.seen"
        self._seen: set[str] = set()
        self._pending: list[str] = []
        self._next_scan = 0.0
        self._log: Any = None

    def open(self) -> None:
        if not self.folder.is_dir():
            raise SourceError(f"folder {self.folder} does not exist (or is not a folder)")
        present = set(self._scan_names())
        self._seen = self._load_seen() & present
        self._compact()
        self._pending = []
        self._next_scan = 0.0
        logger.info("folder %s: %d image(s) present, %d already inspected before", self.folder, len(present),
                    len(self._seen))

    def _load_seen(self) -> set[str]:
        try:
            return set(self.state_file.read_text(encoding="utf-8").splitlines())
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise SourceError(f"cannot read the folder state {self.state_file}: {exc}") from exc

    def _compact(self) -> None:
        """Rewrite the state with only names still present, so it cannot grow without end."""
        tmp = self.state_file.with_suffix(".tmp")
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text("".join(f"{n}\n" for n in sorted(self._seen)), encoding="utf-8")
            os.replace(tmp, self.state_file)
            if self._log is not None:
                self._log.close()
            self._log = open(self.state_file, "a", encoding="utf-8")  # noqa: SIM115 - held open while the source is
        except OSError as exc:
            raise SourceError(f"cannot write the folder state {self.state_file}: {exc}") from exc

    def _scan_names(self) -> list[str]:
        try:
            with os.scandir(self.folder) as it:
                return sorted(
                    e.name for e in it
                    if not e.name.startswith(".") and "\n" not in e.name
                    and Path(e.name).suffix.lower() in IMAGE_SUFFIXES and e.is_file()
                )
        except OSError as exc:
            raise SourceError(f"cannot list folder {self.folder}: {exc.strerror or exc}") from exc

    def _rescan(self) -> None:
        now = time.time()
        fresh = []
        for name in self._scan_names():
            if name in self._seen:
                continue
            try:
                mtime = (self.folder / name).stat().st_mtime
            except FileNotFoundError:
                continue
            if now - mtime < self.cfg.settle_s:
                break  # still being written: wait for it rather than overtake it in name order
            fresh.append(name)
        self._pending = fresh

    def read(self, fresh: bool = False) -> Frame | None:
        if not self._pending and time.monotonic() >= self._next_scan:
            self._next_scan = time.monotonic() + self.cfg.poll_interval_s
            self._rescan()
        while self._pending:
            name = self._pending.pop(0)
            path = self.folder / name
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # removed since the scan: nothing to inspect
            except OSError as exc:
                raise SourceError(f"cannot read folder {self.folder}: {exc}") from exc
            frame_id = f"{_safe_id(Path(name).stem)}-{self._file_digest(name, st)}"
            try:
                image = load_image(path)
            except ImageError as exc:
                return Frame(image=None, frame_id=frame_id, source=str(path), error=str(exc), key=name)
            return Frame(image=image, frame_id=frame_id, source=str(path), key=name)
        return None

    @staticmethod
    def _file_digest(name: str, st: os.stat_result) -> str:
        # Same file, same id: a file inspected again after a crash repeats its id, never invents a new one.
        return hashlib.sha256(f"{name}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:10]

    def skip(self) -> None:
        return None  # files wait for us; nothing goes stale

    def done(self, frame: Frame) -> None:
        if frame.key is None or self._log is None:
            return
        self._seen.add(frame.key)
        self._log.write(frame.key + "\n")
        self._log.flush()
        os.fsync(self._log.fileno())

    def close(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None


def make_source(cfg: AgentConfig, run_id: str) -> FrameSource:
    kind = cfg.source_kind
    src = cfg.capture.source
    if kind == "folder":
        return FolderSource(str(src), cfg.storage_dir, cfg.capture)  # expanded once, by the config
    return VideoCaptureSource(kind, src, cfg.capture, run_id)


@dataclass
class SourceStatus:
    kind: str
    name: str
    state: str = "opening"  # opening | up | down | ended
    error: str | None = None
    failures: int = 0  # consecutive
    reopens: int = 0
    retry_in_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "state": self.state, "error": self.error,
                "reopens": self.reopens}


class ManagedSource:
    """A source that never raises: failures close it, report, and reopen it after a growing wait."""

    def __init__(self, source: FrameSource, cfg: CaptureConfig,
                 on_change: Callable[[SourceStatus], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.cfg = cfg
        self.on_change = on_change
        self.clock = clock
        self.status = SourceStatus(source.kind, source.name)
        self._open = False
        self._next_attempt = 0.0
        self.ever_up = False

    @property
    def up(self) -> bool:
        return self._open

    @property
    def ended(self) -> bool:
        return self.status.state == "ended"

    def backoff(self) -> float:
        n = max(0, self.status.failures - 1)
        return min(self.cfg.reopen_backoff_max_s, self.cfg.reopen_backoff_s * (2 ** min(n, 30)))

    def ensure_open(self) -> bool:
        if self._open:
            return True
        if self.ended or self.clock() < self._next_attempt:
            return False
        try:
            self.source.open()
        except SourceError as exc:
            self._fail(exc)
            return False
        except Exception as exc:  # an unexpected driver error is a failed open like any other
            logger.exception("opening source %s failed unexpectedly", self.status.name)
            self._fail(exc)
            return False
        self._open = True
        if self.ever_up:
            self.status.reopens += 1
        self.ever_up = True
        self._set("up", None)
        return True

    def read(self, fresh: bool = False) -> Frame | None:
        """The next frame, or None when there is none now (empty folder, waiting to reopen, ended)."""
        if not self.ensure_open():
            return None
        try:
            frame = self.source.read(fresh)
        except EndOfSource:
            logger.info("source %s ended (capture.loop is off); idle until stopped", self.status.name)
            self.close()
            self._set("ended", None)
            return None
        except SourceError as exc:
            self._fail(exc)
            return None
        except Exception as exc:  # whatever a driver throws, the service stays up and reopens the source
            logger.exception("source %s failed unexpectedly", self.status.name)
            self._fail(exc)
            return None
        if frame is not None and self.status.failures:
            self.status.failures = 0
        return frame

    @property
    def live(self) -> bool:
        """A camera or stream: frames keep coming whether or not we read them."""
        return self.source.kind in ("device", "stream")

    def skip(self) -> None:
        """Drop one frame of a live source (between inspections under max_fps); failures as in read."""
        if not self._open:
            return
        try:
            self.source.skip()
        except Exception as exc:  # the same boundary as read(): report, reopen later, never raise
            self._fail(exc)

    def done(self, frame: Frame) -> None:
        try:
            self.source.done(frame)
        except OSError as exc:
            # The frame was handled; only the "seen" mark is lost, so it may be inspected again later.
            logger.error("cannot record %s as inspected: %s", frame.key, exc)

    def close(self) -> None:
        if self._open:
            self.source.close()
        self._open = False

    def _fail(self, exc: Exception) -> None:
        self.close()
        self.status.failures += 1
        wait = self.backoff()
        self._next_attempt = self.clock() + wait
        self.status.retry_in_s = wait
        logger.warning("source %s failed: %s; retrying in %.1f s", self.status.name, exc, wait)
        self._set("down", str(exc))

    def _set(self, state: str, error: str | None) -> None:
        changed = state != self.status.state or error != self.status.error
        self.status.state = state
        self.status.error = error
        if state != "down":
            self.status.retry_in_s = None
        if changed and self.on_change is not None:
            self.on_change(self.status)
